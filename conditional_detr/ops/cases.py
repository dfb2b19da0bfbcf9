"""
One small case of every compiled op (odd sizes, padding, points outside the maps), shared by
the first-use check (`self_check`), its tests and scripts/exercise_cuda_ops.py, which runs
them under compute-sanitizer. Each case, given `make(*shape, scale, shift)` (random leaf
tensors of the device and dtype under test) and the device, returns `run(impl, tensors)` and
the tensors whose gradients are compared.
"""
import torch

__all__ = ["CASES", "CHECKED_OPS"]


def cross_attention_case(make, device):
    from . import conditional_cross_attention

    queries, keys, batch, channels, heads = 5, 19, 2, 32, 4
    tensors = [make(length, batch, channels, scale=2, shift=-1) for length in (queries, queries, keys, keys, keys)]
    mask = torch.zeros(batch, keys, dtype=torch.bool, device=device)
    mask[1, -6:] = True
    return lambda impl, t: conditional_cross_attention(*t, mask, heads, impl=impl), tensors


def spatial_query_case(make, device):
    from . import conditional_spatial_query

    tensors = [make(5, 2, 2), make(5, 2, 32, scale=2, shift=-1)]
    return lambda impl, t: conditional_spatial_query(t[0], t[1], impl=impl), tensors


def deformable_attention_case(make, device):
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


def dropout_case(make, device):
    from . import reference

    rng_state = torch.tensor([20211010], dtype=torch.int64)

    def run(impl, t):
        if impl == "compiled":
            return torch.ops.conditional_detr.dropout(t[0], 0.3, rng_state)
        return reference.hashed_dropout(t[0], 0.3, rng_state)

    return run, [make(3, 7, 37, scale=2, shift=-1)]


CASES = {
    "conditional_cross_attention": cross_attention_case,
    "conditional_spatial_query": spatial_query_case,
    "multi_scale_deformable_attention": deformable_attention_case,
    "dropout": dropout_case,
}
CHECKED_OPS = tuple(CASES)
