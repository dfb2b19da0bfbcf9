"""Shared helpers for tests against the official implementation's reference outputs."""
import os
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg

from conditional_detr import add_conditional_detr_config

REFERENCE_DIR = Path(
    os.environ.get("CONDITIONAL_DETR_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference")
)


def reference_file(name):
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.skip(f"official reference output {path} not found (set CONDITIONAL_DETR_REFERENCE)")
    return path


def resnet_cfg(depth=50, num_classes=91, dilation=1):
    """A config with the official model's architecture and ResNet definition."""
    cfg = get_cfg()
    add_conditional_detr_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "ConditionalDETR"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.RES5_DILATION = dilation
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]
    cfg.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.CONDITIONAL_DETR.NUM_CLASSES = num_classes
    return cfg


def tiny_fixture_cfg(attention_impl="pytorch"):
    cfg = resnet_cfg(depth=18, num_classes=91)
    args = cfg.MODEL.CONDITIONAL_DETR
    args.NUM_OBJECT_QUERIES = 30
    args.ENC_LAYERS = 2
    args.DEC_LAYERS = 3
    args.DIM_FEEDFORWARD = 512
    args.DROPOUT = 0.0
    args.ATTENTION_IMPL = attention_impl
    return cfg
