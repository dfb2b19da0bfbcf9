"""
Runs every compiled op forward and backward once per dtype on small CUDA inputs with odd
sizes, padding and points outside the maps, and compares each with the PyTorch reference:
the program compute-sanitizer watches (memcheck, racecheck) in scripts/gpu_checks.sh.
Exits 1 when an op disagrees with the reference, 0 otherwise; without a CUDA device it
says so and exits 0.

    python scripts/exercise_cuda_ops.py
"""
import sys

import torch

from conditional_detr import ops

# forward / gradient tolerance of the compiled op against the fp32 reference, per dtype
TOLERANCES = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def attention_inputs(dtype, generator):
    num_queries, num_keys, batch, channels = 37, 301, 2, 256

    def make(length):
        return torch.randn(length, batch, channels, generator=generator).cuda().to(dtype).requires_grad_()

    tensors = [make(num_queries), make(num_queries), make(num_keys), make(num_keys), make(num_keys)]
    mask = torch.zeros(batch, num_keys, dtype=torch.bool)
    mask[1, -57:] = True  # the second image padded
    return tensors, mask.cuda()


def deformable_inputs(dtype, generator):
    shapes = torch.tensor([[13, 17], [7, 9], [4, 5], [1, 3]])
    batch, queries, heads, channels, points = 2, 29, 8, 32, 4
    total = int(shapes.prod(1).sum())
    value = torch.randn(batch, total, heads, channels, generator=generator)
    # about a fifth of the points outside the maps
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    tensors = [t.cuda().to(dtype).requires_grad_() for t in (value, locations, weights)]
    return tensors, shapes.cuda(), start.cuda()


def compare(name, dtype, run, tensors):
    """Largest error of the compiled op's output and input gradients, relative to the reference's scale."""
    errors = []
    reference_tensors = [t.detach().float().requires_grad_() for t in tensors]
    out = run("compiled", tensors)
    expected = run("pytorch", reference_tensors)
    grad = torch.randn_like(expected)
    grads = torch.autograd.grad(out, tensors, grad.to(out.dtype))
    expected_grads = torch.autograd.grad(expected, reference_tensors, grad)
    for ours, theirs in [(out, expected), *zip(grads, expected_grads)]:
        scale = theirs.abs().max().clamp(min=1e-6)
        errors.append(((ours.float() - theirs).abs().max() / scale).item())
    worst = max(errors)
    ok = worst <= TOLERANCES[dtype]
    print(f"{name:<34} {str(dtype):<15} largest relative error {worst:.2e} {'ok' if ok else 'MISMATCH'}")
    return ok


def main():
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to exercise")
        return 0
    if not ops.has_ops_for("cuda"):
        print(f"compiled CUDA ops unavailable: {ops.unavailable_reason('cuda')}")
        return 1
    generator = torch.Generator().manual_seed(0)
    ok = True
    for dtype in TOLERANCES:
        tensors, mask = attention_inputs(dtype, generator)
        ok &= compare(
            "conditional_cross_attention", dtype,
            lambda impl, t: ops.conditional_cross_attention(*t, mask, 8, impl=impl), tensors,
        )
        points = torch.rand(37, 2, 2, generator=generator).cuda().to(dtype).requires_grad_()
        scale = torch.randn(37, 2, 256, generator=generator).cuda().to(dtype).requires_grad_()
        ok &= compare(
            "conditional_spatial_query", dtype,
            lambda impl, t: ops.conditional_spatial_query(t[0], t[1], impl=impl), [points, scale],
        )
        tensors, shapes, start = deformable_inputs(dtype, generator)
        ok &= compare(
            "multi_scale_deformable_attention", dtype,
            lambda impl, t: ops.multi_scale_deformable_attention(t[0], shapes, start, t[1], t[2], impl=impl),
            tensors,
        )
    torch.cuda.synchronize()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
