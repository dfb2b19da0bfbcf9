"""
MMDetection 3.x checkpoints, `{"meta": ..., "state_dict": ...}`, of its `ConditionalDETR` and
`DETR`, as state dicts of this project's models of those names; recognized by their keys.

MMDetection's models compute what this project's do: a torchvision-style ResNet
(`style='pytorch'`), RGB images normalized with ImageNet's mean and std in 0-255, sine
positions normalized without offset, the official decoders and box parametrization. Their
modules are named differently, and their heads hold MMDetection's 80 COCO classes (DETR's
with "no object" last), in the order of detectron2's 80 contiguous ones (the checkpoint's
`meta` may name them).
"""
import re

import torch

from .class_heads import ClassMappingError
from .foreign import ForeignFormat
from .official import OFFICIAL_BACKBONE_PREFIX, convert_state_dict

__all__ = ["CONDITIONAL_DETR", "DEFORMABLE_DETR", "DETR", "MMDetectionFormat"]

# the data preprocessor of MMDetection's configs: ImageNet's statistics in 0-255, as MODEL.PIXEL_MEAN / STD here
_PIXEL_MEAN = [123.675, 116.28, 103.53]
_PIXEL_STD = [58.395, 57.12, 57.375]

# (pattern, replacement) in order; the first that matches renames the key. What the detectors share:
_COMMON_RENAMES = [
    (r"^backbone\.", OFFICIAL_BACKBONE_PREFIX),
    (r"^neck\.convs\.0\.conv\.", "input_proj."),
    (r"^query_embedding\.", "query_embed."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.attn\.", r"transformer.encoder.layers.\1.self_attn."),
    (r"^(en|de)coder\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"transformer.\1coder.layers.\2.linear1."),
    (r"^(en|de)coder\.layers\.(\d+)\.ffn\.layers\.1\.", r"transformer.\1coder.layers.\2.linear2."),
    (r"^(en|de)coder\.layers\.(\d+)\.norms\.(\d)\.", lambda m: f"transformer.{m[1]}coder.layers.{m[2]}.norm{int(m[3]) + 1}."),
    (r"^decoder\.post_norm\.", "transformer.decoder.norm."),
    (r"^bbox_head\.fc_cls\.", "class_embed."),
    (r"^bbox_head\.reg_ffn\.layers\.0\.0\.", "bbox_embed.layers.0."),
    (r"^bbox_head\.reg_ffn\.layers\.1\.", "bbox_embed.layers.1."),
    (r"^bbox_head\.fc_reg\.", "bbox_embed.layers.2."),
]
# Conditional DETR's decoder: its attention's projections one by one
_CONDITIONAL_DETR_RENAMES = [
    (r"^decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.decoder.layers.\1.self_attn.out_proj."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.(\w+_proj)\.", r"transformer.decoder.layers.\1.sa_\2."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.out_proj\.", r"transformer.decoder.layers.\1.cross_attn.out_proj."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.(\w+_proj)\.", r"transformer.decoder.layers.\1.ca_\2."),
    (r"^decoder\.(query_scale|ref_point_head)\.", r"transformer.decoder.\1."),
] + _COMMON_RENAMES
# DETR's decoder: torch's multi-head attention in both
_DETR_RENAMES = [
    (r"^decoder\.layers\.(\d+)\.self_attn\.attn\.", r"transformer.decoder.layers.\1.self_attn."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.attn\.", r"transformer.decoder.layers.\1.multihead_attn."),
] + _COMMON_RENAMES

# Deformable DETR: a ChannelMapper with GroupNorms as input projections, deformable attention,
# the decoder's norms in the official order (self-attention norm2, cross-attention norm1), one
# head per decoder layer (and one for the two-stage proposals)
_DEFORMABLE_DETR_RENAMES = [
    (r"^neck\.convs\.(\d+)\.conv\.", r"input_proj.\1.0."),
    (r"^neck\.convs\.(\d+)\.gn\.", r"input_proj.\1.1."),
    (r"^level_embed$", "transformer.level_embed"),
    (r"^reference_points_fc\.", "transformer.reference_points."),
    (r"^memory_trans_fc\.", "transformer.enc_output."),
    (r"^memory_trans_norm\.", "transformer.enc_output_norm."),
    (r"^pos_trans_fc\.", "transformer.pos_trans."),
    (r"^pos_trans_norm\.", "transformer.pos_trans_norm."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(?!attn\.)", r"transformer.encoder.layers.\1.self_attn."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.attn\.", r"transformer.decoder.layers.\1.self_attn."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.", r"transformer.decoder.layers.\1.cross_attn."),
    (r"^decoder\.layers\.(\d+)\.norms\.(\d)\.", lambda m: f"transformer.decoder.layers.{m[1]}.norm{(2, 1, 3)[int(m[2])]}."),
    (r"^bbox_head\.cls_branches\.(\d+)\.", r"class_embed.\1."),
    (r"^bbox_head\.reg_branches\.(\d+)\.(\d)\.", lambda m: f"bbox_embed.{m[1]}.layers.{int(m[2]) // 2}."),
] + _COMMON_RENAMES


def _complete_deformable_detr(state_dict, converted):
    """
    What the official layout has and MMDetection's leaves implicit: zero biases of the input
    projections (a GroupNorm follows them there), and the heads listed under the decoder too,
    where box refinement gives each layer its own and two-stage uses the class heads there.
    """
    for key in [k for k in converted if k.startswith("input_proj.") and k.endswith(".0.weight")]:
        converted.setdefault(key[: -len("weight")] + "bias", converted[key].new_zeros(converted[key].shape[0]))
    # without refinement every layer shares one head; with it, trained heads differ
    refine = not torch.equal(state_dict["bbox_head.reg_branches.0.0.weight"], state_dict["bbox_head.reg_branches.1.0.weight"])
    two_stage = "memory_trans_fc.weight" in state_dict
    for key in list(converted):
        if (refine and key.startswith("bbox_embed.")) or (two_stage and key.startswith("class_embed.")):
            converted["transformer.decoder." + key] = converted[key]
    return converted


class MMDetectionFormat(ForeignFormat):
    """One MMDetection detector's state dicts."""

    repository = "open-mmlab/mmdetection"
    source = "MMDetection"

    def __init__(self, name, architecture, marker, renames, complete=None):
        super().__init__(name, architecture, (marker,), renames)
        self._complete = complete

    def check_meta(self, meta, filename, cfg=None):
        """
        Refuse, by name, a model whose saved config (`meta["cfg"]`, where MMDetection's runner
        keeps it) computes something this project's does not: a Caffe-style ResNet, BGR input,
        another image normalization, or another offset of the sine positions.
        """
        config = meta.get("cfg") if isinstance(meta, dict) else None
        if not isinstance(config, str):
            return  # released files may hold no config: the weights alone then
        expected_offset = -0.5 if self.architecture == "DeformableDETR" else 0.0
        differences = []
        if re.search(r"style\s*=\s*['\"]caffe['\"]", config):
            differences.append("a Caffe-style ResNet (style='caffe', the stride in the 1x1 convolutions)")
        if re.search(r"bgr_to_rgb\s*=\s*False", config):
            differences.append("BGR input images (bgr_to_rgb=False)")
        for name, expected in (("mean", _PIXEL_MEAN), ("std", _PIXEL_STD)):
            match = re.search(rf"\b{name}\s*=\s*\[([^\]]*)\]", config)
            values = [v.strip() for v in match[1].split(",") if v.strip()] if match else []
            if values and [round(float(v), 3) for v in values] != expected:
                differences.append(f"the image normalization {name}=[{', '.join(values)}]")
        match = re.search(r"positional_encoding\s*=\s*dict\(([^)]*)\)", config)
        offset = re.search(r"offset\s*=\s*(-?[\d.]+)", match[1]) if match else None
        if match and (float(offset[1]) if offset else 0.0) != expected_offset:
            differences.append(f"sine positions with offset={offset[1] if offset else 0.0} (this {self.architecture}'s: {expected_offset})")
        if differences:
            raise ValueError(
                f"{filename}: MMDetection's {self.architecture} here computes something this project's does "
                f"not: {'; '.join(differences)}"
            )

    def convert(self, state_dict, num_classes=80):
        head = "bbox_head.fc_cls.weight" if "bbox_head.fc_cls.weight" in state_dict else "bbox_head.cls_branches.0.weight"
        # DETR's softmax head ends with "no object"
        classes = state_dict[head].shape[0] - (1 if self.architecture == "DETR" else 0)
        if num_classes is not None and num_classes != classes:
            raise ClassMappingError(
                f"cannot map MMDetection's {classes} classes to {num_classes}: its heads keep their classes"
            )
        # the neck's extra (stride-2) convolutions follow its lateral ones, as input projections do
        laterals = len({k.split(".")[2] for k in state_dict if k.startswith("neck.convs.")})
        state_dict = {
            re.sub(r"^neck\.extra_convs\.(\d+)\.", lambda m: f"neck.convs.{laterals + int(m[1])}.", k): v
            for k, v in state_dict.items()
        }
        renamed = self.rename(state_dict)
        if self._complete:
            renamed = self._complete(state_dict, renamed)
        # its classes are detectron2's 80 in order: the official conversion keeps the rows
        return convert_state_dict(renamed, num_classes)


CONDITIONAL_DETR = MMDetectionFormat(
    "mmdet_conditional_detr", "ConditionalDETR", "decoder.layers.0.cross_attn.qpos_sine_proj.weight",
    _CONDITIONAL_DETR_RENAMES,
)
DETR = MMDetectionFormat(
    "mmdet_detr", "DETR", "decoder.layers.0.cross_attn.attn.in_proj_weight", _DETR_RENAMES
)
DEFORMABLE_DETR = MMDetectionFormat(
    "mmdet_deformable_detr", "DeformableDETR", "bbox_head.cls_branches.0.weight", _DEFORMABLE_DETR_RENAMES,
    _complete_deformable_detr,
)
