"""
The one place that knows whether the compiled ops (`conditional_detr._C`) are usable, on
which devices, and if not, why. Loading also registers their fake (meta) kernels and
autograd formulas, which live in Python as in PyTorch's extension template.
"""
import torch

__all__ = ["cpu_vector_level", "has_ops", "has_ops_for", "unavailable_reason"]

_loaded = False
# the level of the CPU kernels' vector loops, fixed for the process (None: not built)
_cpu_vector_level = None
# device type -> None when the compiled ops run there, else the reason they do not
_reasons = {"cpu": "the extension has not been loaded yet", "cuda": "the extension has not been loaded yet"}


def _load():
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        from conditional_detr import _C  # noqa: F401  (loading registers the operators)
    except ModuleNotFoundError as e:
        if e.name not in ("conditional_detr._C",):
            reason = f"importing conditional_detr._C failed: {e}"
        else:
            reason = (
                "conditional_detr._C is not built; build it with "
                "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`"
            )
        _reasons.update(cpu=reason, cuda=reason)
        return
    except (ImportError, OSError) as e:
        # typically an undefined symbol: built against another torch than the one running
        reason = f"importing conditional_detr._C failed (rebuild it against torch {torch.__version__}): {e}"
        _reasons.update(cpu=reason, cuda=reason)
        return

    _register_fake_kernels()
    _register_autograd()
    _reasons["cpu"] = None
    _reasons["cuda"] = _cuda_problem()
    global _cpu_vector_level
    _cpu_vector_level = torch.ops.conditional_detr.cpu_vector_level()


def _cuda_problem():
    compiled = torch.ops.conditional_detr.cuda_version()
    if compiled < 0:
        return "conditional_detr._C was built without CUDA kernels (no CUDA toolkit at build time, or FORCE_CUDA=0)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA support"
    compiled_major = compiled // 1000
    torch_major = int(torch.version.cuda.split(".")[0])
    if compiled_major != torch_major:
        return (
            f"conditional_detr._C was built with CUDA {compiled_major}.{compiled % 1000 // 10} "
            f"but torch uses CUDA {torch.version.cuda}; rebuild the extension"
        )
    if not torch._C._dispatch_has_kernel_for_dispatch_key("conditional_detr::conditional_cross_attention", "CUDA"):
        return "conditional_detr._C has no CUDA kernels registered"
    return None


def has_ops():
    """Whether the compiled extension loaded (its CPU kernels are then always there)."""
    _load()
    return _reasons["cpu"] is None


def has_ops_for(device_type):
    """Whether the compiled ops run on tensors of this device type ("cpu", "cuda", ...)."""
    _load()
    return _reasons.get(device_type, "no compiled kernels for this device type") is None


def unavailable_reason(device_type="cpu"):
    """Why the compiled ops cannot run on `device_type`, or None when they can."""
    _load()
    return _reasons.get(device_type, f"the extension has no kernels for device type {device_type!r}")


def cpu_vector_level():
    """
    The instruction set level the compiled CPU kernels run at: "x86-64-v4" (AVX-512),
    "x86-64-v3" (AVX2) or "baseline", the CPU's highest capped where torch is held lower
    (ATEN_CPU_CAPABILITY); None when the extension is not built.
    """
    _load()
    return _cpu_vector_level


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fake_kernels():
    @torch.library.register_fake("conditional_detr::conditional_spatial_query")
    def _(reference_points, query_scale, dim):
        torch._check(reference_points.shape[-1] == 2, lambda: "reference_points must be [..., 2]")
        return reference_points.new_empty((*reference_points.shape[:-1], dim))

    @torch.library.register_fake("conditional_detr::_conditional_spatial_query_backward")
    def _(grad, reference_points, query_scale, dim):
        grad_scale = (
            reference_points.new_empty(query_scale.shape) if query_scale is not None
            else reference_points.new_empty((0,))
        )
        return reference_points.new_empty(reference_points.shape), grad_scale

    @torch.library.register_fake("conditional_detr::conditional_cross_attention")
    def _(q_content, q_spatial, k_content, k_spatial, value, key_padding_mask, num_heads,
          dropout_p, rng_state):
        num_queries, batch, _ = q_content.shape
        out = q_content.new_empty((num_queries, batch, value.shape[2]))
        lse = q_content.new_empty((batch, num_heads, num_queries), dtype=_lse_dtype(q_content.dtype))
        return out, lse

    @torch.library.register_fake("conditional_detr::_conditional_cross_attention_backward")
    def _(grad_out, q_content, q_spatial, k_content, k_spatial, value, key_padding_mask, out, lse,
          num_heads, dropout_p, rng_state):
        return tuple(t.new_empty(t.shape) for t in (q_content, q_spatial, k_content, k_spatial, value))

    @torch.library.register_fake("conditional_detr::multi_scale_deformable_attention")
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        batch, _, num_heads, channels = value.shape
        torch._check(sampling_locations.dim() == 6, lambda: "sampling_locations must be 6-d")
        return value.new_empty((batch, sampling_locations.shape[1], num_heads * channels))

    @torch.library.register_fake("conditional_detr::_multi_scale_deformable_attention_backward")
    def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
          attention_weights):
        return tuple(value.new_empty(t.shape) for t in (value, sampling_locations, attention_weights))

    @torch.library.register_fake("conditional_detr::dropout")
    def _(input, p, rng_state):
        return input.new_empty(input.shape)


def _register_autograd():
    def sine_query_setup(ctx, inputs, output):
        reference_points, query_scale, dim = inputs
        ctx.save_for_backward(reference_points, query_scale)
        ctx.dim = dim

    def sine_query_backward(ctx, grad):
        reference_points, query_scale = ctx.saved_tensors
        grad_points, grad_scale = torch.ops.conditional_detr._conditional_spatial_query_backward(
            grad, reference_points, query_scale, ctx.dim
        )
        return grad_points, (grad_scale if query_scale is not None else None), None

    torch.library.register_autograd(
        "conditional_detr::conditional_spatial_query", sine_query_backward, setup_context=sine_query_setup
    )

    def attention_setup(ctx, inputs, output):
        (q_content, q_spatial, k_content, k_spatial, value, key_padding_mask, num_heads,
         dropout_p, rng_state) = inputs
        out, lse = output
        ctx.save_for_backward(q_content, q_spatial, k_content, k_spatial, value, key_padding_mask,
                              out, lse, rng_state)
        ctx.num_heads = num_heads
        ctx.dropout_p = dropout_p
        ctx.mark_non_differentiable(lse)

    def attention_backward(ctx, grad_out, grad_lse):
        (q_content, q_spatial, k_content, k_spatial, value, key_padding_mask, out, lse,
         rng_state) = ctx.saved_tensors
        grads = torch.ops.conditional_detr._conditional_cross_attention_backward(
            grad_out, q_content, q_spatial, k_content, k_spatial, value, key_padding_mask, out, lse,
            ctx.num_heads, ctx.dropout_p, rng_state,
        )
        return (*grads, None, None, None, None)

    torch.library.register_autograd(
        "conditional_detr::conditional_cross_attention", attention_backward, setup_context=attention_setup
    )

    def deformable_attention_setup(ctx, inputs, output):
        # the inputs are all that backward needs: it resamples the values
        ctx.save_for_backward(*inputs)

    def deformable_attention_backward(ctx, grad_output):
        grads = torch.ops.conditional_detr._multi_scale_deformable_attention_backward(
            grad_output, *ctx.saved_tensors
        )
        grad_value, grad_locations, grad_weights = grads
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd(
        "conditional_detr::multi_scale_deformable_attention", deformable_attention_backward,
        setup_context=deformable_attention_setup,
    )

    def dropout_setup(ctx, inputs, output):
        _, ctx.p, rng_state = inputs
        ctx.save_for_backward(rng_state)

    def dropout_backward(ctx, grad):
        # the same mask, regenerated from the seed
        (rng_state,) = ctx.saved_tensors
        return torch.ops.conditional_detr.dropout(grad, ctx.p, rng_state), None, None

    torch.library.register_autograd(
        "conditional_detr::dropout", dropout_backward, setup_context=dropout_setup
    )


# registration (fake kernels, autograd) belongs at import, not inside a traced first call
_load()
