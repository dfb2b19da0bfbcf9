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

from .class_heads import COCO_CLASS_NAMES
from .official import OFFICIAL_BACKBONE_PREFIX, convert_backbone_key

__all__ = ["CONDITIONAL_DETR", "DETR", "MMDetectionFormat"]

# (pattern, replacement) in order; the first that matches renames the key. What the detectors share:
_COMMON_RENAMES = [
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


def _rename(key, renames):
    if key.startswith("backbone."):
        return convert_backbone_key(OFFICIAL_BACKBONE_PREFIX + key[len("backbone."):])
    for pattern, replacement in renames:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return None


class MMDetectionFormat:
    """One MMDetection detector's state dicts: the interface of the formats of `formats.py`."""

    repository = "open-mmlab/mmdetection"

    def __init__(self, name, architecture, marker, renames):
        self.name, self.architecture, self._marker, self._renames = name, architecture, marker, renames

    def __repr__(self):
        return f"MMDetectionFormat({self.name!r})"

    def recognizes(self, state_dict):
        return "bbox_head.fc_cls.weight" in state_dict and self._marker in state_dict

    def convert(self, state_dict, num_classes=80):
        # DETR's softmax head ends with "no object"
        classes = state_dict["bbox_head.fc_cls.weight"].shape[0] - (1 if self.architecture == "DETR" else 0)
        if num_classes is not None and num_classes != classes:
            raise ValueError(
                f"cannot map MMDetection's {classes} classes to {num_classes}: its heads keep their classes"
            )
        converted = {}
        for key, value in state_dict.items():
            if key.endswith("num_batches_tracked"):
                continue  # frozen batch norm has no counter
            renamed = _rename(key, self._renames)
            if renamed is None:
                # a module the project's model lacks (a normalized neck, deformable convolutions,
                # another head): loading the rest would give a model that computes something else
                raise ValueError(
                    f"MMDetection's {self.architecture} here has {key!r}, a part this project's "
                    f"{self.architecture} does not have; it cannot load this checkpoint"
                )
            converted[renamed] = value.float() if value.is_floating_point() else value
        return converted

    @staticmethod
    def class_names(num_classes):
        """MMDetection's COCO classes, in detectron2's order, where the checkpoint names none."""
        return COCO_CLASS_NAMES if num_classes == len(COCO_CLASS_NAMES) else None


CONDITIONAL_DETR = MMDetectionFormat(
    "mmdet_conditional_detr", "ConditionalDETR", "decoder.layers.0.cross_attn.qpos_sine_proj.weight",
    _CONDITIONAL_DETR_RENAMES,
)
DETR = MMDetectionFormat(
    "mmdet_detr", "DETR", "decoder.layers.0.cross_attn.attn.in_proj_weight", _DETR_RENAMES
)
