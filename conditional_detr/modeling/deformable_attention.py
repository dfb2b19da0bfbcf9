"""
Deformable DETR's multi-scale deformable attention as a module: each query predicts a
few sampling offsets around its reference point on every feature level and a weight
for each of them; the op (`ops.multi_scale_deformable_attention`) samples the value
maps bilinearly there and sums the weighted samples.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class MultiScaleDeformableAttention(nn.Module):
    """
    The official MSDeformAttn under its parameter names: `sampling_offsets`,
    `attention_weights`, `value_proj` and `output_proj`.
    """

    ops_impl = "auto"  # the model's MODEL.DETR.OPS_IMPL, set by ops.set_implementation

    def __init__(self, d_model=256, num_levels=4, num_heads=8, num_points=4):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model {d_model} must be divisible by the head count {num_heads}")
        self.d_model = d_model
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points

        self.sampling_offsets = nn.Linear(d_model, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(d_model, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        # every head starts looking in its own direction, point i at distance i + 1,
        # with uniform weights
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.constant_(projection.bias, 0.0)

    def forward(self, query, reference_points, value, spatial_shapes, level_start_index, padding_mask=None):
        """
        Args:
            query: [batch, num_queries, d_model], positions included.
            reference_points: [batch, num_queries, num_levels, 2] normalized (x, y) points,
                or [..., 4] (cx, cy, w, h) boxes, whose size scales the offsets.
            value: [batch, sum of H*W, d_model] the flattened feature levels.
            spatial_shapes: [num_levels, 2] int64 (H, W); level_start_index: [num_levels].
            padding_mask: [batch, sum of H*W] bool, True at padding, which reads as zeros.
        Returns:
            [batch, num_queries, d_model]
        """
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], heads, self.d_model // heads)

        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = F.softmax(weights, -1).view(batch, num_queries, heads, levels, points)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: (W, H) normalizes (x, y)
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # offsets are fractions of half the reference box, spread over the points
            centres, sizes = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
            locations = centres + offsets / points * sizes * 0.5
        else:
            raise ValueError(f"reference_points must end with 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        out = ops.multi_scale_deformable_attention(
            value, spatial_shapes, level_start_index, locations, weights, impl=self.ops_impl
        )
        return self.output_proj(out)
