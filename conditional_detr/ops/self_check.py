"""
"auto" trusts a compiled op on a device type and dtype only once it has seen it agree with
the PyTorch reference there: the first time it would run the op on them, one small random
case (odd sizes, padding, points outside the maps) goes through both, forward and backward.
On a disagreement it warns once, naming the op, device, dtype and error, and runs the
reference from then on for that op, device and dtype; an explicit impl="compiled" is never
second-guessed. The check takes milliseconds, once per op, device type and dtype, and runs
eagerly even when the first use is inside torch.jit.trace or torch.compile, so that a traced
or compiled model decides as an eager one does.
"""
import warnings

import torch

__all__ = ["CHECKED_OPS", "disagreement", "forget", "trusted"]

# largest error allowed, relative to the largest reference value, of the output and gradients
# (the sine query's reference computes in float32 whatever the dtype)
TOLERANCES = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}

# (op name, device type, dtype) -> None when the compiled op agrees, else the error found
_verdicts = {}


def forget():
    """Forget every verdict: the next use of each op checks it again."""
    _verdicts.clear()


def trusted(op_name, device, dtype):
    """Whether "auto" may run the compiled `op_name` on `device` (type) with `dtype` inputs."""
    key = (op_name, device.type, dtype)
    if key not in _verdicts:
        _verdicts[key] = _disagreement_outside_tracing(op_name, device, dtype)
        if _verdicts[key] is not None:
            warnings.warn(
                f"conditional_detr: the compiled {op_name} disagrees with the PyTorch reference on "
                f"{device.type} in {dtype} ({_verdicts[key]}); OPS_IMPL 'auto' uses the reference "
                "there from now on",
                RuntimeWarning,
                stacklevel=3,
            )
    return _verdicts[key] is None


@torch.compiler.disable
def _disagreement_outside_tracing(op_name, device, dtype):
    """`disagreement`, run eagerly: torch.compile does not trace into it, and a torch.jit.trace
    in progress is paused, so that the check's own ops stay out of the traced graph."""
    tracing_state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        return disagreement(op_name, device, dtype)
    finally:
        torch._C._set_tracing_state(tracing_state)


def disagreement(op_name, device, dtype):
    """None when the compiled op agrees with the reference on a small case, else what differs."""
    generator = torch.Generator().manual_seed(0)

    def make(*shape, scale=1.0, shift=0.0):
        t = torch.rand(*shape, generator=generator) * scale + shift
        return t.to(device=device, dtype=dtype).requires_grad_()

    run, tensors = _CASES[op_name](make, device)
    tolerance = TOLERANCES.get(dtype, 1e-4)
    reference_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        try:
            ours = _output_and_grads(run, "compiled", tensors)
        except RuntimeError as e:
            return f"it failed: {str(e).splitlines()[0]}"
        expected = _output_and_grads(run, "pytorch", [t.detach().to(reference_dtype).requires_grad_() for t in tensors])
    for name, a, b in zip(("output", *(f"gradient {i}" for i in range(len(tensors)))), ours, expected):
        error = ((a.to(b.dtype) - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()
        if not error <= tolerance:  # NaN fails too
            return f"{name}: largest error {error:.3g} of the largest reference value, allowed {tolerance:g}"
    return None


def _output_and_grads(run, impl, tensors):
    out = run(impl, tensors)
    grad = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=torch.float32).view_as(out)
    return [out, *torch.autograd.grad(out, tensors, grad.to(out.dtype))]


def _cross_attention_case(make, device):
    from . import conditional_cross_attention

    queries, keys, batch, channels, heads = 5, 19, 2, 32, 4
    tensors = [make(length, batch, channels, scale=2, shift=-1) for length in (queries, queries, keys, keys, keys)]
    mask = torch.zeros(batch, keys, dtype=torch.bool, device=device)
    mask[1, -6:] = True
    return lambda impl, t: conditional_cross_attention(*t, mask, heads, impl=impl), tensors


def _spatial_query_case(make, device):
    from . import conditional_spatial_query

    tensors = [make(5, 2, 2), make(5, 2, 32, scale=2, shift=-1)]
    return lambda impl, t: conditional_spatial_query(t[0], t[1], impl=impl), tensors


def _deformable_attention_case(make, device):
    from . import multi_scale_deformable_attention

    shapes = torch.tensor([[3, 5], [2, 1]], device=device)
    start = torch.tensor([0, 15], device=device)
    batch, queries, heads, channels, levels, points = 2, 4, 2, 8, 2, 3
    value = make(batch, 17, heads, channels, scale=2, shift=-1)
    locations = make(batch, queries, heads, levels, points, 2, scale=1.4, shift=-0.2)  # some outside
    weights = make(batch, queries, heads, levels, points)
    return (
        lambda impl, t: multi_scale_deformable_attention(t[0], shapes, start, t[1], t[2], impl=impl),
        [value, locations, weights],
    )


def _dropout_case(make, device):
    from . import reference

    rng_state = torch.tensor([20211010], dtype=torch.int64)

    def run(impl, t):
        if impl == "compiled":
            return torch.ops.conditional_detr.dropout(t[0], 0.3, rng_state)
        return reference.hashed_dropout(t[0], 0.3, rng_state)

    return run, [make(3, 7, 37, scale=2, shift=-1)]


_CASES = {
    "conditional_cross_attention": _cross_attention_case,
    "conditional_spatial_query": _spatial_query_case,
    "multi_scale_deformable_attention": _deformable_attention_case,
    "dropout": _dropout_case,
}
CHECKED_OPS = tuple(_CASES)
