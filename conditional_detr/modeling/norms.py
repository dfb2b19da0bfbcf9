"""
Normalizations computed in float32 under autocast, with the state dicts of torch's.

CUDA's autocast computes LayerNorm and GroupNorm in float32; the CPU's keeps a bfloat16
input in bfloat16, and with it the residual stream that the normalization's output
starts (the whole encoder's, after a bfloat16 input projection). BatchNorm is left in
the input's dtype by both; in float32, a backbone trained from scratch under bf16
autocast came closer to its float32 accuracy (README, the embedded demo).
"""
import torch
from torch import nn

__all__ = ["LayerNorm", "GroupNorm", "BatchNorm2d", "trainable_batchnorm_in_float32"]


class _Float32UnderAutocast:
    def forward(self, x):
        if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class LayerNorm(_Float32UnderAutocast, nn.LayerNorm):
    pass


class GroupNorm(_Float32UnderAutocast, nn.GroupNorm):
    pass


class BatchNorm2d(_Float32UnderAutocast, nn.BatchNorm2d):
    pass


def trainable_batchnorm_in_float32(module):
    """Every nn.BatchNorm2d of `module` computed in float32 under autocast (same state dict)."""
    for norm in module.modules():
        if type(norm) is nn.BatchNorm2d:
            norm.__class__ = BatchNorm2d
    return module
