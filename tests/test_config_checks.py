"""Bad input: config values that cannot work stop at build time, naming key and value."""
import os
import re

import pytest
import torch
from detectron2.modeling import build_model

from conditional_detr.config import DETECTOR_NODES
from conditional_detr.config_checks import check_device
from conditional_detr.engine import get_config

from helpers.paths import QUICK_SCHEDULES

CONFIGS = {
    "ConditionalDETR": "conditional_detr_instant_test.yaml",
    "DETR": "conditional_detr_instant_test.yaml",
    "DeformableDETR": "deformable_detr_instant_test.yaml",
}

pytestmark = pytest.mark.usefixtures("one_thread")


def build(architecture, *opts):
    config = os.path.join(QUICK_SCHEDULES, CONFIGS[architecture])
    cfg = get_config(config, ["MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", architecture, *map(str, opts)])
    return build_model(cfg)


@pytest.mark.parametrize("architecture", list(CONFIGS))
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("NHEADS", 3, r"NHEADS 3 does not divide MODEL.DETR.HIDDEN_DIM 64"),
        ("NHEADS", 0, r"NHEADS must be >= 1, got 0"),
        ("HIDDEN_DIM", 66, r"HIDDEN_DIM must be a multiple of 4, got 66"),
        ("NUM_OBJECT_QUERIES", 0, r"NUM_OBJECT_QUERIES must be >= 1, got 0"),
        ("NUM_CLASSES", -1, r"NUM_CLASSES must be >= 1, got -1"),
        ("ENC_LAYERS", -1, r"ENC_LAYERS must be >= 0, got -1"),
        ("DEC_LAYERS", 0, r"DEC_LAYERS must be >= 1, got 0"),
        ("DIM_FEEDFORWARD", 0, r"DIM_FEEDFORWARD must be >= 1, got 0"),
        ("DROPOUT", 1.0, r"DROPOUT must be < 1.0, got 1.0"),
        ("FOCAL_ALPHA", 1.5, r"FOCAL_ALPHA must be <= 1.0, got 1.5"),
        ("GIOU_WEIGHT", -2.0, r"GIOU_WEIGHT must be >= 0.0, got -2.0"),
        ("NO_OBJECT_WEIGHT", 0.0, r"NO_OBJECT_WEIGHT must be > 0.0, got 0.0"),
    ],
)
def test_bad_values_stop_at_build_time(architecture, key, value, message):
    with pytest.raises(ValueError, match=r"MODEL\.DETR\." + message):
        build(architecture, f"MODEL.DETR.{key}", value)


@pytest.mark.parametrize("architecture", list(CONFIGS))
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("TEST.DETECTIONS_PER_IMAGE", 0, r"TEST\.DETECTIONS_PER_IMAGE must be >= 1, got 0"),
    ],
)
def test_bad_values_of_other_nodes_stop_at_build_time(architecture, key, value, message):
    with pytest.raises(ValueError, match=message):
        build(architecture, key, value)


def test_an_encoder_free_model_still_builds():
    assert len(build("DETR", "MODEL.DETR.ENC_LAYERS", 0).transformer.encoder.layers) == 0


def without_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_cuda_device_without_a_gpu_names_the_key(monkeypatch):
    without_gpus(monkeypatch)
    with pytest.raises(ValueError, match=r"MODEL\.DEVICE 'cuda', but this machine has no CUDA device; set MODEL\.DEVICE cpu"):
        build("ConditionalDETR", "MODEL.DEVICE", "cuda")
    check_device("cpu", num_processes=8)  # CPU workers need no GPU


def test_more_processes_than_gpus_names_the_flag(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:0", num_processes=2)
    with pytest.raises(ValueError, match=r"--num-gpus 8 with MODEL\.DEVICE 'cuda', but this machine has 2 CUDA"):
        check_device("cuda", num_processes=8)


DETECTOR_ONLY_KEYS = [
    ("MODEL.CONDITIONAL_DETR.REFERENCE_POINTS", "learned", "ConditionalDETR"),
    ("MODEL.CONDITIONAL_DETR.SPATIAL_QUERY", "CSQ-T", "ConditionalDETR"),
    ("MODEL.CONDITIONAL_DETR.TRANSFORMATION", "full", "ConditionalDETR"),
    ("MODEL.CONDITIONAL_DETR.BOX_OFFSET", False, "ConditionalDETR"),
    ("MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS", 3, "DeformableDETR"),
    ("MODEL.DEFORMABLE_DETR.ENC_N_POINTS", 2, "DeformableDETR"),
    ("MODEL.DEFORMABLE_DETR.DEC_N_POINTS", 2, "DeformableDETR"),
    ("MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", True, "DeformableDETR"),
    ("MODEL.DEFORMABLE_DETR.TWO_STAGE", True, "DeformableDETR"),
    ("MODEL.DEFORMABLE_DETR.LINEAR_PROJ_LR_MULTIPLIER", 0.5, "DeformableDETR"),
]


FOREIGN_KEYS = [
    (architecture, key, value, owner)
    for architecture in CONFIGS for key, value, owner in DETECTOR_ONLY_KEYS if architecture != owner
]


@pytest.mark.parametrize("architecture, key, value, owner", FOREIGN_KEYS, ids=[f"{a}-{k}" for a, k, _, _ in FOREIGN_KEYS])
def test_a_key_of_another_detector_is_refused(architecture, key, value, owner):
    with pytest.raises(ValueError, match=rf"{re.escape(key)} is .*, but {architecture} does not read it: it is a key of {owner} only"):
        build(architecture, key, value)


def test_every_detector_only_key_is_covered():
    cfg = get_config()
    covered = {key for key, _, _ in DETECTOR_ONLY_KEYS}
    assert covered == {f"MODEL.{node}.{key}" for node in DETECTOR_NODES for key in cfg.MODEL[node]}
