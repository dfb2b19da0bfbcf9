"""
Public ops: conditional cross-attention, the conditional spatial query, multi-scale
deformable attention and dropout. `impl` picks the implementation:
"pytorch" (reference), "compiled" (the `conditional_detr._C` extension) or
"auto" (compiled when it is built for the tensors' device, the op's limits hold and, checked
once per op, device type and dtype, it agrees with the reference there: see `self_check`).
Every op takes that decision from `use_compiled`.
"""
import functools

import torch
import torch.nn.functional as F

from . import reference, self_check
from ._extension import cpu_vector_level, has_ops, has_ops_for, unavailable_reason

__all__ = [
    "IMPLEMENTATIONS",
    "conditional_cross_attention",
    "conditional_spatial_query",
    "cpu_vector_level",
    "dropout",
    "fvcore_handles",
    "has_ops",
    "has_ops_for",
    "multi_scale_deformable_attention",
    "set_implementation",
    "unavailable_reason",
    "use_compiled",
]

IMPLEMENTATIONS = ("auto", "compiled", "pytorch")

# the sine embedding width when there is no λq to take it from, as in the official model
_DEFAULT_SINE_DIM = 256


def _check_impl(impl):
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"MODEL.DETR.OPS_IMPL must be one of {IMPLEMENTATIONS}, got {impl!r}")


# the CUDA attention kernels keep a head's channels in registers, up to this many
_CUDA_MAX_HEAD_DIM = 64
# ops whose CPU kernels, built for baseline x86-64 (a CPU without AVX2, or torch held there by
# ATEN_CPU_CAPABILITY), are slower than the PyTorch path (the attention's forward 22 against
# 13 ms at R50's shapes, docs/ops.md#instruction-set-levels): "auto" takes the PyTorch path there
_SLOWER_AT_BASELINE = ("conditional_cross_attention",)


def use_compiled(op_name, impl, tensor, head_dim=None):
    """
    Whether `op_name` runs compiled on `tensor`'s device and dtype, the one decision of every
    op: "pytorch" never; "compiled" always, or a RuntimeError naming the op and why it cannot;
    "auto" where the extension is built for the device, the op's limits hold (`head_dim`:
    the attention's channels per head), its CPU kernel is the faster path at the CPU's
    instruction set level, and its first-use agreement check passed.
    """
    _check_impl(impl)
    if impl == "pytorch":
        return False
    reason = _why_not_compiled(tensor, head_dim)
    if reason is not None:
        if impl == "compiled":
            raise RuntimeError(f"{op_name}(impl='compiled') cannot run on {tensor.device.type}: {reason}")
        return False
    if impl == "compiled":
        return True
    if op_name in _SLOWER_AT_BASELINE and tensor.device.type == "cpu" and cpu_vector_level() == "baseline":
        return False
    # "auto" runs a compiled op where it has seen it agree with the reference
    return self_check.trusted(op_name, tensor.device, tensor.dtype)


def set_implementation(module, impl):
    """`impl` for every op `module` runs: each of its parts with an `ops_impl` attribute takes it."""
    _check_impl(impl)
    for part in module.modules():
        if hasattr(part, "ops_impl"):
            part.ops_impl = impl


def _why_not_compiled(tensor, head_dim):
    if not has_ops_for(tensor.device.type):
        return unavailable_reason(tensor.device.type)
    if tensor.is_cuda and head_dim is not None and head_dim > _CUDA_MAX_HEAD_DIM:
        return f"the CUDA kernel keeps at most {_CUDA_MAX_HEAD_DIM} channels per head, got {head_dim}"
    return None


def conditional_spatial_query(reference_points, query_scale=None, impl="auto"):
    """
    λq ⊙ sinusoidal(reference points), see `reference.conditional_spatial_query`.

    Args:
        reference_points: [num_queries, batch, 2] normalized (x, y).
        query_scale: [num_queries, batch, dim] λq, or None for identity (dim 256).
    """
    if not use_compiled("conditional_spatial_query", impl, reference_points):
        return reference.conditional_spatial_query(reference_points, query_scale)
    if query_scale is None:
        return torch.ops.conditional_detr.conditional_spatial_query(reference_points, None, _DEFAULT_SINE_DIM)
    dtype = torch.promote_types(reference_points.dtype, query_scale.dtype)
    return torch.ops.conditional_detr.conditional_spatial_query(
        reference_points.to(dtype), query_scale.to(dtype), query_scale.shape[-1]
    )


def conditional_cross_attention(
    q_content, q_spatial, k_content, k_spatial, value, key_padding_mask, num_heads,
    dropout_p=0.0, training=False, impl="auto",
):
    """
    Per head: softmax(scale * (q_c . k_c + q_p . k_p) + mask) . v, see
    `reference.conditional_cross_attention` for shapes.
    """
    head_dim = max(q_content.shape[-1], value.shape[-1]) // num_heads
    if not use_compiled("conditional_cross_attention", impl, q_content, head_dim):
        return reference.conditional_cross_attention(
            q_content, q_spatial, k_content, k_spatial, value, key_padding_mask, num_heads,
            dropout_p, training,
        )
    tensors = (q_content, q_spatial, k_content, k_spatial, value)
    # under autocast the projections may disagree in dtype: compute in the promoted one
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    tensors = [t.to(dtype) for t in tensors]
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask.to(torch.bool)
    p = float(dropout_p) if training else 0.0
    # drawn from torch's default generator, so torch.manual_seed makes dropout reproducible;
    # the kernels hash it with each element's index, forward and backward alike
    rng_state = torch.randint(0, 2**62, (1,), dtype=torch.int64) if p > 0 else None
    out, _ = torch.ops.conditional_detr.conditional_cross_attention(
        *tensors, key_padding_mask, num_heads, p, rng_state
    )
    return out


def dropout(input, p, training=True, impl="auto"):
    """
    Dropout whose mask is a hash of a seed and each element's index: the compiled kernel
    regenerates it in backward instead of storing it, and hashing is several times faster
    on a CPU than torch's Bernoulli draws. The seed comes from torch's default generator, so
    torch.manual_seed makes it reproducible. Without the compiled op it is F.dropout: the
    same distribution from torch's own generator.
    """
    _check_impl(impl)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return input
    if p == 1.0 or not use_compiled("dropout", impl, input):
        return F.dropout(input, p, training=True)
    rng_state = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    return torch.ops.conditional_detr.dropout(input, float(p), rng_state)


def multi_scale_deformable_attention(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl="auto"
):
    """
    Deformable DETR's multi-scale deformable attention core, see
    `reference.multi_scale_deformable_attention`.

    Args:
        value: [N, S, heads, C], the levels' maps flattened and concatenated along S.
        spatial_shapes: [L, 2] int64 (H, W); level_start_index: [L] int64.
        sampling_locations: [N, Lq, heads, L, P, 2] normalized (x, y).
        attention_weights: [N, Lq, heads, L, P], normalized over L x P.
    Returns:
        [N, Lq, heads * C], head-major.
    """
    if not use_compiled("multi_scale_deformable_attention", impl, value):
        return reference.multi_scale_deformable_attention(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    # under autocast the value projection and the locations may differ in dtype: compute in
    # the promoted one (low-precision locations would move the samples)
    dtype = functools.reduce(
        torch.promote_types, [value.dtype, sampling_locations.dtype, attention_weights.dtype]
    )
    return torch.ops.conditional_detr.multi_scale_deformable_attention(
        value.to(dtype), spatial_shapes.to(value.device, torch.int64),
        level_start_index.to(value.device, torch.int64), sampling_locations.to(dtype),
        attention_weights.to(dtype),
    )


def _attention_flops(inputs, outputs):
    from fvcore.nn.jit_handles import get_shape

    # as fvcore counts the reference's two bmm: one multiply-add per flop,
    # [Q, 2 * head_dim] x [2 * head_dim, K] and [Q, K] x [K, value_head_dim] per head
    num_queries, batch, channels = get_shape(inputs[0])
    num_keys = get_shape(inputs[2])[0]
    value_channels = get_shape(inputs[4])[2]
    return batch * num_queries * num_keys * (2 * channels + value_channels)


def _no_flops(inputs, outputs):
    # the reference's elementwise sin/cos/mul are not counted by fvcore either
    return 0


def fvcore_handles():
    """{op name: fvcore handle} for the compiled ops, counting what fvcore counts on the reference
    path; pass them to `FlopCountAnalysis(...).set_op_handle(**fvcore_handles())`."""
    return {
        "conditional_detr::conditional_cross_attention": _attention_flops,
        "conditional_detr::conditional_spatial_query": _no_flops,
        # fvcore counts neither the reference's grid_sample nor its weighted sum
        "conditional_detr::multi_scale_deformable_attention": _no_flops,
    }
