"""
detectron2's ResNet made to compute exactly what the official implementation's
torchvision ResNet computes, and the padding masks of its feature maps.
"""
import torch
import torch.nn.functional as F
from torch import nn
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import (
    BasicBlock,
    BasicStem,
    BottleneckBlock,
    DeformBottleneckBlock,
    ResNet,
)

from .box_ops import image_sizes_tensor
from .norms import trainable_batchnorm_in_float32


def build_resnet_like_torchvision(cfg, input_shape=None, num_features=1, extra_features=()):
    """
    Build the backbone of `cfg` (detectron2's own keys) and return it with the names
    of the `num_features` feature maps the transformer reads (MODEL.RESNETS.OUT_FEATURES),
    finest first. The backbone returns `extra_features` too (the mask head's res2-res4):
    the same network, more of its stages' outputs.

    With `RES5_DILATION` 2 (DC5), torchvision keeps dilation 1 in the 3x3 conv of
    the first res5 block and dilates only the later blocks, while detectron2 dilates
    every block; the first block is set back to torchvision's definition so that
    official DC5 weights give official outputs.
    """
    transformer_features = list(cfg.MODEL.RESNETS.OUT_FEATURES)
    if len(transformer_features) != num_features:
        raise ValueError(
            f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE} reads {num_features} feature "
            f"map(s); MODEL.RESNETS.OUT_FEATURES must name as many stages, got {transformer_features}"
        )
    if set(extra_features) - set(transformer_features):
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.RESNETS.OUT_FEATURES = sorted(set(transformer_features) | set(extra_features))
    backbone = build_backbone(cfg, input_shape)
    out_features = backbone.output_shape()
    if cfg.MODEL.BACKBONE.FOLD_FROZEN_BATCHNORM:
        fold_frozen_batchnorm(backbone)
    trainable_batchnorm_in_float32(backbone, keep=norms_read_only_by_convolutions(backbone))
    if cfg.MODEL.RESNETS.RES5_DILATION > 1:
        first_block = backbone.res5[0]
        if isinstance(first_block, BottleneckBlock):
            first_block.conv2.dilation = (1, 1)
            first_block.conv2.padding = (1, 1)
    feature_names = sorted(transformer_features, key=lambda name: out_features[name].stride)
    return backbone, feature_names


def features_with_padding_masks(backbone, images):
    """
    Every feature map `backbone` returns for the batch `images` (an ImageList), with the
    official padding mask at its size: {name: (features [batch, C, h, w], mask [batch, h, w])}.
    """
    padded_size = images.tensor.shape[-2:]
    return {
        name: (feature, feature_padding_mask(images.image_sizes, padded_size, feature.shape[-2:], feature.device))
        for name, feature in backbone(images.tensor).items()
    }


# BatchNorms that accumulate their statistics in float32 for a bfloat16 input, on one
# process and across processes; detectron2's NaiveSyncBatchNorm averages them in the input's dtype.
_STATISTICS_IN_FLOAT32 = (nn.BatchNorm2d, nn.SyncBatchNorm)


def norms_read_only_by_convolutions(backbone):
    """
    The trainable BatchNorms of a detectron2 ResNet whose output reaches nothing but
    convolutions, through ReLU (and the stem's max-pooling): those inside a block, and the
    stem's when the first block projects its shortcut. The others start or join the
    residual stream. A deformable block's first norm feeds the deformable convolution,
    which autocast does not cast, and stays in float32 for it.
    """
    if not isinstance(backbone, ResNet):
        return []
    norms = []
    for block in backbone.modules():
        if isinstance(block, BasicBlock):
            norms.append(block.conv1.norm)
        elif isinstance(block, BottleneckBlock):
            norms += [block.conv1.norm, block.conv2.norm]
        elif isinstance(block, DeformBottleneckBlock):
            norms.append(block.conv2.norm)
    first_block = backbone.stages[0][0] if backbone.stages else None
    if isinstance(backbone.stem, BasicStem) and getattr(first_block, "shortcut", None) is not None:
        norms.append(backbone.stem.conv1.norm)
    return [norm for norm in norms if type(norm) in _STATISTICS_IN_FLOAT32]


class FrozenBatchNormFoldedConv2d(Conv2d):
    """
    A detectron2 Conv2d whose FrozenBatchNorm2d is folded into the convolution: one
    convolution with weight * scale and the norm's shift as bias, the same parameters,
    buffers and state dict. It saves the normalization's passes over the feature map
    (the largest cost of a bfloat16 ResNet on a CPU after the convolutions themselves);
    gradients reach the weight through the product as they would through the norm.
    """

    def forward(self, x):
        norm = self.norm
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias * scale
        weight = self.weight * scale.view(-1, 1, 1, 1)
        x = F.conv2d(x, weight, shift, self.stride, self.padding, self.dilation, self.groups)
        return self.activation(x) if self.activation is not None else x


def fold_frozen_batchnorm(module):
    """Folds every FrozenBatchNorm2d that follows a detectron2 Conv2d in `module` into it."""
    for conv in module.modules():
        if type(conv) is Conv2d and isinstance(conv.norm, FrozenBatchNorm2d):
            conv.__class__ = FrozenBatchNormFoldedConv2d
    return module


def feature_padding_mask(image_sizes, padded_size, feature_size, device=None):
    """
    The official mask: True at padded pixels of the batch tensor, brought to the
    feature map's size by nearest-neighbour interpolation. Computed without a loop over the
    images, so that a traced export keeps its batch size and image sizes dynamic.

    Args:
        image_sizes: (h, w) of the unpadded images: a list of pairs, or a [batch, 2] tensor.
        padded_size: (H, W) of the padded batch tensor.
        feature_size: (h, w) of the feature map.
        device: of the mask, when `image_sizes` is a list.
    Returns:
        [batch, h, w] bool
    """
    sizes = image_sizes_tensor(image_sizes, device)
    rows = torch.arange(padded_size[0], device=sizes.device)
    columns = torch.arange(padded_size[1], device=sizes.device)
    mask = (rows[None, :, None] >= sizes[:, 0, None, None]) | (columns[None, None, :] >= sizes[:, 1, None, None])
    return F.interpolate(mask[None].float(), size=tuple(feature_size)).to(torch.bool)[0]
