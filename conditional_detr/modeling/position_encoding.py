import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """
    DETR's sine position encoding of a padded feature map, normalized over the
    unpadded extent of each image so that padding does not shift positions.
    Deformable DETR measures positions from pixel centres: `offset` 0.5.
    """

    def __init__(self, num_pos_feats=128, temperature=10000, scale=2 * math.pi, offset=0.0):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self.offset = offset

    def forward(self, mask):
        """
        Args:
            mask: [batch, H, W] bool, True at padding.
        Returns:
            [batch, 2 * num_pos_feats, H, W], y channels first.
        """
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
