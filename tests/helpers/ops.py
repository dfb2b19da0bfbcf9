"""Inputs of the compiled ops, the devices they run on, and how to compare their results."""
import numpy as np
import pytest
import torch

from conditional_detr import ops

requires_ops = pytest.mark.skipif(
    not ops.has_ops(), reason=f"compiled ops unavailable: {ops.unavailable_reason('cpu')}"
)
CUDA_SKIP_REASON = (
    "no CUDA device" if not torch.cuda.is_available()
    else f"compiled CUDA ops unavailable: {ops.unavailable_reason('cuda')}"
)
requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.has_ops_for("cuda")), reason=CUDA_SKIP_REASON
)
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def attention_inputs(num_queries, num_keys, batch, channels, device, dtype=torch.float32,
                     value_channels=None, seed=0, requires_grad=True):
    generator = torch.Generator().manual_seed(seed)
    value_channels = value_channels or channels

    def make(*shape):
        t = torch.randn(*shape, generator=generator, dtype=torch.float64)
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return [
        make(num_queries, batch, channels), make(num_queries, batch, channels),
        make(num_keys, batch, channels), make(num_keys, batch, channels),
        make(num_keys, batch, value_channels),
    ]


def padding_mask(batch, num_keys, device, fully_padded=()):
    # each batch element pads a different tail; the listed ones pad every key
    mask = torch.zeros(batch, num_keys, dtype=torch.bool)
    for b in range(batch):
        mask[b, num_keys - (b * 3) % max(num_keys, 1):] = b > 0
    for b in fully_padded:
        mask[b] = True
    return mask.to(device)


def detached_copy(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def max_error(value, target):
    return (value.double() - target.double()).abs().max().item()


def dropout_keep_mask(seed, count, p):
    """The kernels' keep decision for flat element indices [0, count), in numpy."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (np.arange(count, dtype=np.uint64) + np.uint64(1)) * np.uint64(
            0x9E3779B97F4A7C15
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    bits = (z >> np.uint64(32)).astype(np.uint64)
    return torch.from_numpy(bits >= np.uint64(min(p * 2**32, 2**32 - 1)))


def assert_compiles_without_graph_break(module, inputs):
    """torch.compile(fullgraph=True) gives the eager outputs and parameter gradients, in one graph."""
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    torch.testing.assert_close(out, module(*inputs))
    out.sum().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    module(*inputs).sum().backward()
    for g, p in zip(grads, module.parameters()):
        torch.testing.assert_close(g, p.grad)
    assert torch._dynamo.explain(module)(*inputs).graph_break_count == 0


def assert_flash_attention_rule(dtype, exact, exact_grads, plain, plain_grads, out, grads, floor=1e-6):
    """
    FlashAttention's rule: against an exact reference, a kernel's error may be at most 2x
    (forward) and 3x (gradients) the error of the plain PyTorch computation at its dtype.
    """
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert max_error(out, exact) <= 2 * max_error(plain, exact) + floor
    for g, p, e in zip(grads, plain_grads, exact_grads):
        assert max_error(g, e) <= 3 * max_error(p, e) + floor

