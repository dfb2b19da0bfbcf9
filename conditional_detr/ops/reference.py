"""
Pure-PyTorch versions of the compiled ops (conditional cross-attention, the conditional
spatial query, multi-scale deformable attention, hashed dropout): the runtime fallback of the
compiled ops and the oracle they are tested against.
"""
import math

import torch
import torch.nn.functional as F


def sine_embedding(reference_points, dim=256, temperature=10000.0):
    """
    The official `gen_sineembed_for_position`: each of y and x gets dim / 2 channels,
    sin and cos interleaved, y first.

    Args:
        reference_points: [..., 2] normalized (x, y).
    Returns:
        [..., dim]
    """
    if dim % 4 != 0:
        raise ValueError(f"sine embedding dim must be a multiple of 4, got {dim}")
    half = dim // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=reference_points.device)
    dim_t = temperature ** (2 * (dim_t // 2) / half)
    scaled = reference_points.float() * (2 * math.pi)
    pos_x = scaled[..., 0, None] / dim_t
    pos_y = scaled[..., 1, None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((pos_y, pos_x), dim=-1).to(reference_points.dtype)


def conditional_spatial_query(reference_points, query_scale):
    """
    λq ⊙ sinusoidal(reference points), the conditional spatial query before its
    projection (paper eq. 3).

    Args:
        reference_points: [num_queries, batch, 2] normalized (x, y).
        query_scale: [num_queries, batch, dim] λq, or None for identity (first layer).
    """
    if query_scale is None:
        return sine_embedding(reference_points)
    return sine_embedding(reference_points, query_scale.shape[-1]) * query_scale


def conditional_cross_attention(
    q_content, q_spatial, k_content, k_spatial, value, key_padding_mask, num_heads,
    dropout_p=0.0, training=False,
):
    """
    Per head: softmax(scale * (q_c . k_c + q_p . k_p) + mask) . v, which equals the
    official attention over per-head concatenations [q_c, q_p] and [k_c, k_p].

    Args:
        q_content, q_spatial: [num_queries, batch, dim]
        k_content, k_spatial: [num_keys, batch, dim]
        value: [num_keys, batch, value_dim]
        key_padding_mask: [batch, num_keys] bool, True at padding, or None.
    Returns:
        [num_queries, batch, value_dim], the heads concatenated (before out_proj).
    """
    num_queries, batch, dim = q_content.shape
    num_keys = k_content.shape[0]
    head_dim = dim // num_heads
    value_head_dim = value.shape[-1] // num_heads
    # the concatenated query per head has 2 * head_dim channels, as in the official code
    scale = (2 * head_dim) ** -0.5

    def heads(x, length, channels):
        # [length, batch, heads * channels] -> [batch * heads, length, channels]
        return x.reshape(length, batch * num_heads, channels).transpose(0, 1)

    q = torch.cat(
        [heads(q_content, num_queries, head_dim), heads(q_spatial, num_queries, head_dim)], dim=-1
    ) * scale
    k = torch.cat([heads(k_content, num_keys, head_dim), heads(k_spatial, num_keys, head_dim)], dim=-1)
    v = heads(value, num_keys, value_head_dim)

    logits = torch.bmm(q, k.transpose(1, 2))  # [batch * heads, num_queries, num_keys]
    if key_padding_mask is not None:
        logits = logits.view(batch, num_heads, num_queries, num_keys)
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        logits = logits.view(batch * num_heads, num_queries, num_keys)
    weights = torch.softmax(logits, dim=-1)
    if key_padding_mask is not None:
        # a batch element whose keys are all padding attends to nothing (zeros, not NaN)
        fully_padded = key_padding_mask.all(dim=1).repeat_interleave(num_heads)
        weights = weights.masked_fill(fully_padded[:, None, None], 0.0)
    weights = F.dropout(weights, p=dropout_p, training=training)

    out = torch.bmm(weights, v)  # [batch * heads, num_queries, value_head_dim]
    return out.transpose(0, 1).reshape(num_queries, batch, num_heads * value_head_dim)


def multi_scale_deformable_attention(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """
    Deformable DETR's multi-scale deformable attention core: per head, the attention-weighted
    sum of the value maps sampled bilinearly at each level's points, as grid_sample with
    align_corners=False and zero padding (location x in [0, 1] reads pixel coordinate
    x * W - 0.5; neighbours outside the map read zero).

    Args:
        value: [N, S, heads, C], the levels' [H, W] maps flattened and concatenated along S.
        spatial_shapes: [L, 2] int64 (H, W) per level.
        level_start_index: [L] int64, where each level starts along S (unused here: the
            levels are taken in order; kept for the compiled op's signature).
        sampling_locations: [N, Lq, heads, L, P, 2] normalized (x, y).
        attention_weights: [N, Lq, heads, L, P], already normalized over L x P.
    Returns:
        [N, Lq, heads * C], head-major.
    """
    batch, _, num_heads, channels = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # sizes as 0-dim tensors, not Python numbers: a traced export keeps them symbolic
    shapes = [(spatial_shapes[level, 0], spatial_shapes[level, 1]) for level in range(spatial_shapes.shape[0])]
    levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] coordinates
    sampled = []
    for level, (height, width) in enumerate(shapes):
        # [N, H*W, heads, C] -> [N * heads, C, H, W]
        value_map = levels[level].permute(0, 2, 3, 1).reshape(
            batch * num_heads, channels, height, width
        )
        # [N, Lq, heads, P, 2] -> [N * heads, Lq, P, 2]
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(
            value_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        ))  # [N * heads, C, Lq, P]
    # [N, Lq, heads, L, P] -> [N * heads, 1, Lq, L * P]
    weights = attention_weights.transpose(1, 2).reshape(
        batch * num_heads, 1, num_queries, num_levels * num_points
    )
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [N * heads, C, Lq]
    return out.view(batch, num_heads * channels, num_queries).transpose(1, 2).contiguous()


def _as_int64(constant):
    # a 64-bit unsigned constant as the int64 with the same bits
    return constant - (1 << 64) if constant >= 1 << 63 else constant


def _shift_right(z, bits):
    # logical shift of int64 bit patterns: torch's >> on int64 is arithmetic
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def dropout_keep_mask(rng_state, shape, p, device=None):
    """
    The compiled kernels' dropout decision for every element of `shape` (row-major flat
    index i): keep when the upper 32 bits of splitmix64's finalizer of seed + (i + 1) * golden
    ratio are at least p * 2^32. int64 arithmetic wraps as the kernels' uint64 does.
    """
    seed = int(rng_state.reshape(-1)[0])  # int64, as the kernels read it
    count = math.prod(shape)
    z = torch.arange(1, count + 1, dtype=torch.int64, device=device) * _as_int64(0x9E3779B97F4A7C15)
    z = z + seed
    z = (z ^ _shift_right(z, 30)) * _as_int64(0xBF58476D1CE4E5B9)
    z = (z ^ _shift_right(z, 27)) * _as_int64(0x94D049BB133111EB)
    z = z ^ _shift_right(z, 31)
    threshold = min(int(p * 2**32), 2**32 - 1)
    return (_shift_right(z, 32) >= threshold).view(shape)


def hashed_dropout(input, p, rng_state):
    """The compiled `dropout` op: input * keep / (1 - p) with `dropout_keep_mask`'s keep."""
    keep = dropout_keep_mask(rng_state, tuple(input.shape), p, input.device)
    return input * keep.to(input.dtype) * (1.0 / (1.0 - p))
