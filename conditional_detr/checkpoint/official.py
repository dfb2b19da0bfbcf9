"""
Official Conditional DETR (Atten4Vis/ConditionalDETR), DETR (facebookresearch/detr) and
Deformable DETR (fundamentalvision/Deformable-DETR) checkpoints, `{"model": state_dict}`, as
state dicts of this project's `ConditionalDETR`, `DETR` and `DeformableDETR`; the format is
told by the keys. The checkpointer converts on load; `tools/convert_official` writes a
converted file.

The transformer and heads keep their names; the torchvision ResNet becomes
detectron2's ResNet; the 91 COCO-id class logits become detectron2's 80 contiguous
COCO classes unless the source's own count is asked for. DETR's last, "no object" logit
stays last.
"""
import argparse
import re
from dataclasses import dataclass

import torch
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .class_heads import (
    ClassMappingError, MissingClassHeadError, class_head_keys, coco_class_names, coco_contiguous_to_category_id,
    coco_panoptic_names, proposal_head_keys,
)

OFFICIAL_BACKBONE_PREFIX = "backbone.0.body."


def convert_backbone_key(key):
    """torchvision ResNet names -> detectron2 ResNet names."""
    key = key[len(OFFICIAL_BACKBONE_PREFIX):]
    if key.startswith(("conv1.", "bn1.")):
        return "backbone.stem." + key.replace("bn1.", "conv1.norm.")
    match = re.match(r"layer(\d)\.(\d+)\.(.*)", key)
    if match is None:
        raise KeyError(f"unexpected backbone key {OFFICIAL_BACKBONE_PREFIX + key!r}")
    stage, block, rest = match.groups()
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"backbone.res{int(stage) + 1}.{block}.{rest}"


def to_official_backbone_key(key):
    """detectron2 ResNet names -> torchvision ResNet names: `convert_backbone_key` undone."""
    key = key[len("backbone."):]
    if key.startswith("stem.conv1."):
        rest = key[len("stem.conv1."):]
        return OFFICIAL_BACKBONE_PREFIX + ("bn1." + rest[len("norm."):] if rest.startswith("norm.") else "conv1." + rest)
    match = re.match(r"res(\d)\.(\d+)\.(.*)", key)
    if match is None:
        raise KeyError(f"unexpected backbone key {'backbone.' + key!r}")
    stage, block, rest = match.groups()
    rest = rest.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
    rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
    return f"{OFFICIAL_BACKBONE_PREFIX}layer{int(stage) - 1}.{block}.{rest}"


def is_official_state_dict(state_dict):
    return any(k.startswith(OFFICIAL_BACKBONE_PREFIX) for k in state_dict)


def official_format(state_dict):
    """
    "deformable_detr" for fundamentalvision/Deformable-DETR, whose attention predicts
    `sampling_offsets`; "detr" for facebookresearch/detr, whose decoder cross-attention is
    a standard `multihead_attn`; else "conditional_detr".
    """
    if any(".sampling_offsets." in k for k in state_dict):
        return "deformable_detr"
    return "detr" if any(".multihead_attn." in k for k in state_dict) else "conditional_detr"


@dataclass(frozen=True)
class OfficialFormat:
    """
    The state dicts of one official repository: the interface of every format of the
    registry (`formats.py`): `name`, `architecture` (the meta-architecture it loads into),
    `recognizes(state_dict)`, `check_meta(meta, filename, cfg=None)` (refuse a model the project
    cannot represent, or, given the model's config, one of another configuration), `convert(state_dict, num_classes)` and `class_names(num_classes)`.
    """

    name: str
    architecture: str
    repository: str

    def recognizes(self, state_dict):
        return is_official_state_dict(state_dict) and official_format(state_dict) == self.name

    @staticmethod
    def check_meta(meta, filename, cfg=None):
        """The official files hold no description of their model beyond the weights."""

    def convert(self, state_dict, num_classes=80):
        return convert_state_dict(state_dict, num_classes)

    class_names = staticmethod(coco_class_names)


CONDITIONAL_DETR = OfficialFormat("conditional_detr", "ConditionalDETR", "Atten4Vis/ConditionalDETR")
DETR = OfficialFormat("detr", "DETR", "facebookresearch/detr")
DEFORMABLE_DETR = OfficialFormat("deformable_detr", "DeformableDETR", "fundamentalvision/Deformable-DETR")

# DETR's segmentation model (`DETRsegm`): the detector under "detr.", beside its mask head
PANOPTIC_PREFIX = "detr."
MASK_HEAD_PREFIXES = ("bbox_attention.", "mask_head.")


@dataclass(frozen=True)
class OfficialPanopticFormat(OfficialFormat):
    """
    The released DETR panoptic checkpoints (detr-r50-panoptic and the others): a DETR
    checkpoint under "detr." and the mask head (`bbox_attention.*`, `mask_head.*`), whose
    names are this project's. Their 250 class ids (COCO panoptic's, "no object" last) load
    as they are into a model of 250 classes, or become detectron2's 133 COCO panoptic
    categories (80 things, 53 stuff, in COCO_CATEGORIES' order), as 91 ids become 80 classes
    for detection.
    """

    def recognizes(self, state_dict):
        return any(k.startswith(PANOPTIC_PREFIX + OFFICIAL_BACKBONE_PREFIX) for k in state_dict) and any(
            k.startswith(MASK_HEAD_PREFIXES) for k in state_dict
        )

    def convert(self, state_dict, num_classes=80):
        detector = {k[len(PANOPTIC_PREFIX):]: v for k, v in state_dict.items() if k.startswith(PANOPTIC_PREFIX)}
        if num_classes == len(COCO_CATEGORIES):
            converted = convert_state_dict(detector, None)
            rows = [c["id"] for c in COCO_CATEGORIES] + [converted["class_embed.weight"].shape[0] - 1]  # "no object" last
            for key in class_head_keys(converted):
                converted[key] = converted[key][rows].clone()
        else:
            converted = convert_state_dict(detector, num_classes)
        for key, value in state_dict.items():
            if key.startswith(MASK_HEAD_PREFIXES):
                converted[key] = value.float() if value.is_floating_point() else value
            elif not key.startswith(PANOPTIC_PREFIX):
                raise ValueError(f"{key!r}: a part of neither the detector ('detr.') nor the mask head")
        return converted

    def class_names(self, num_classes):
        if num_classes == len(COCO_CATEGORIES):
            return tuple(c["name"] for c in COCO_CATEGORIES)
        return coco_panoptic_names() if num_classes == len(coco_panoptic_names()) else coco_class_names(num_classes)


DETR_PANOPTIC = OfficialPanopticFormat("detr_panoptic", "DETR", "facebookresearch/detr")


def convert_state_dict(state_dict, num_classes=80):
    """
    Args:
        state_dict: official Conditional DETR, DETR or Deformable DETR state dict (91 class
            logits indexed by COCO id; DETR has a 92nd, "no object").
        num_classes: foreground classes to keep: 80 (detectron2's contiguous COCO
            classes) or the source's own count (None: the source's).
    Returns:
        a float32 state dict for `ConditionalDETR`, `DETR` or `DeformableDETR`.
    """
    converted = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue  # frozen batch norm has no counter
        if key.startswith(OFFICIAL_BACKBONE_PREFIX):
            key = convert_backbone_key(key)
        if value.is_floating_point():
            value = value.float()
        converted[key] = value

    no_object = 1 if official_format(state_dict) == "detr" else 0
    class_keys = class_head_keys(converted)
    if not class_keys:
        raise MissingClassHeadError("no class head ('class_embed' weight and bias) in the state dict")
    source_classes = converted[class_keys[0]].shape[0] - no_object
    if num_classes is not None and num_classes != source_classes:
        category_ids = coco_contiguous_to_category_id()
        if num_classes != len(category_ids) or source_classes <= max(category_ids):
            raise ClassMappingError(
                f"cannot map {source_classes} class logits to {num_classes} classes: only the "
                f"COCO mapping (91 COCO-id logits -> 80 contiguous classes) is known"
            )
        rows = category_ids + [source_classes] * no_object
        proposal_keys = proposal_head_keys(converted)
        for key in class_keys:
            # the proposal head keeps its foreground logit first; its other rows are
            # never positives, any 79 of them do
            head_rows = [0] + category_ids[1:] if key in proposal_keys else rows
            converted[key] = converted[key][head_rows].clone()
    return converted


def convert_torchvision_resnet(state_dict):
    """
    An ImageNet ResNet state dict of torchvision (the official models' initialization)
    -> the `backbone.*` weights of this project's models; the classifier is dropped.
    """
    converted = {}
    for key, value in state_dict.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        converted[convert_backbone_key(OFFICIAL_BACKBONE_PREFIX + key)] = value.float()
    if "backbone.stem.conv1.weight" not in converted:
        raise ValueError("not a torchvision ResNet state dict (no 'conv1.weight')")
    return converted


def read_file(path):
    """A checkpoint file's contents, read without running code from it."""
    # official checkpoints pickle their argparse.Namespace next to the weights
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_official_checkpoint(path):
    checkpoint = read_file(path)
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not is_official_state_dict(state_dict):
        raise ValueError(
            f"{path}: not an official Conditional DETR, DETR or Deformable DETR checkpoint (expected a "
            "'model' state dict "
            f"with keys starting with {OFFICIAL_BACKBONE_PREFIX!r})"
        )
    return state_dict
