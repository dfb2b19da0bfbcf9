"""
Normalizations computed in float32 under autocast, with the state dicts of torch's.

CUDA's autocast computes LayerNorm and GroupNorm in float32; the CPU's keeps a bfloat16
input in bfloat16, and with it the residual stream that the normalization's output
starts (the whole encoder's, after a bfloat16 input projection). BatchNorm is left in
the input's dtype by both; in float32, a backbone trained from scratch under bf16
autocast came closer to its float32 accuracy (docs/demo.md). A BatchNorm
whose output reaches nothing but a convolution (through ReLU) can stay in the input's
dtype at no cost in accuracy: its statistics are accumulated in float32 either way, and
the convolution would round a float32 output to that dtype; it saves two casts of the
feature map each way.
"""
import warnings

import torch
from detectron2.layers import NaiveSyncBatchNorm as _NaiveSyncBatchNorm
from torch import nn

__all__ = [
    "LayerNorm", "GroupNorm", "BatchNorm2d", "SyncBatchNorm", "NaiveSyncBatchNorm",
    "trainable_batchnorm_in_float32",
]


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


class SyncBatchNorm(_Float32UnderAutocast, nn.SyncBatchNorm):
    pass


class NaiveSyncBatchNorm(_Float32UnderAutocast, _NaiveSyncBatchNorm):
    pass


# MODEL.RESNETS.NORM "BN", "SyncBN" and "naiveSyncBN" of detectron2's get_norm
_IN_FLOAT32 = {
    nn.BatchNorm2d: BatchNorm2d,
    nn.SyncBatchNorm: SyncBatchNorm,
    _NaiveSyncBatchNorm: NaiveSyncBatchNorm,
}


def trainable_batchnorm_in_float32(module, keep=()):
    """
    Every BatchNorm of `module` (detectron2's "BN", "SyncBN" and "naiveSyncBN") computed in
    float32 under autocast, with the same state dict, except those in `keep`, left in the
    input's dtype; another BatchNorm subclass stays as it is, with a warning that autocast
    will run it in its own dtype.
    """
    keep = set(keep)
    for norm in module.modules():
        if isinstance(norm, _Float32UnderAutocast) or norm in keep:
            continue
        if type(norm) in _IN_FLOAT32:
            norm.__class__ = _IN_FLOAT32[type(norm)]
        elif isinstance(norm, nn.modules.batchnorm._BatchNorm):
            warnings.warn(
                f"{type(norm).__name__} has no float32 version: under autocast (SOLVER.AMP) it runs "
                "in the autocast dtype"
            )
    return module
