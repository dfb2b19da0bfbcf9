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

from .cases import CASES, CHECKED_OPS

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

    run, tensors = CASES[op_name](make, device)
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
