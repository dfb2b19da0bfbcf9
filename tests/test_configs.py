"""
Every config loads; the COCO configs hold the official schedules and recipes; typed and
unknown keys are named.
"""
import glob
import math
import os
import re

import pytest
import yaml

from conditional_detr.config import RENAMED_KEYS
from conditional_detr.engine import get_config

from helpers.paths import CONFIGS as CONFIG_DIR, INSTANT_CONFIG

ALL_CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True))
COCO_CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "COCO-Detection", "*.yaml")))
# Conditional DETR's and DETR's: one feature map, and the same recipe but for the losses
SINGLE_LEVEL_COCO_CONFIGS = [p for p in COCO_CONFIGS if not os.path.basename(p).startswith("deformable_")]
DEFORMABLE_COCO_CONFIGS = [p for p in COCO_CONFIGS if os.path.basename(p).startswith("deformable_")]

COCO_TRAIN2017_IMAGES = 118287


def test_configs_found():
    names = {os.path.relpath(p, CONFIG_DIR) for p in ALL_CONFIGS}
    for method, schedules in (("conditional_detr", (50, 75, 108)), ("detr", (50, 500))):
        assert {
            f"COCO-Detection/{method}_R_{backbone}_{epochs}ep.yaml"
            for backbone in ("50", "50_DC5", "101", "101_DC5")
            for epochs in schedules
        } <= names
    assert {
        f"COCO-Detection/deformable_detr_R_50{variant}_50ep.yaml" for variant in ("", "_refine", "_two_stage")
    } <= names
    assert len(COCO_CONFIGS) == 12 + 8 + 3
    assert {
        f"COCO-PanopticSegmentation/{name}_panoptic.yaml" for name in (
            "detr_R_50", "detr_R_50_DC5", "detr_R_101", "conditional_detr_R_50", "deformable_detr_R_50_refine",
        )
    } <= names
    assert {
        "Base-SetPrediction.yaml",
        "Base-ConditionalDETR.yaml",
        "Base-DETR.yaml",
        "Base-DeformableDETR.yaml",
        "quick_schedules/conditional_detr_shapes.yaml",
        "quick_schedules/conditional_detr_groups_shapes.yaml",
        "quick_schedules/conditional_detr_instant_test.yaml",
        "quick_schedules/deformable_detr_shapes.yaml",
        "quick_schedules/deformable_detr_instant_test.yaml",
    } <= names


@pytest.mark.parametrize("detector", ["ConditionalDETR", "DETR", "DeformableDETR"])
def test_each_detector_base_extends_only_the_shared_one(detector):
    with open(os.path.join(CONFIG_DIR, f"Base-{detector}.yaml")) as f:
        assert yaml.safe_load(f)["_BASE_"] == "Base-SetPrediction.yaml"


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: os.path.relpath(p, CONFIG_DIR))
def test_config_loads(path):
    cfg = get_config(path)
    name = os.path.basename(path).lower()
    if name == "base-setprediction.yaml":
        assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"  # detectron2's default: a base, not a model
    elif name.startswith(("detr_", "base-detr")):
        assert cfg.MODEL.META_ARCHITECTURE == "DETR"
    elif name.startswith(("deformable_detr_", "base-deformabledetr")):
        assert cfg.MODEL.META_ARCHITECTURE == "DeformableDETR"
    else:
        assert cfg.MODEL.META_ARCHITECTURE == "ConditionalDETR"
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.SOLVER.OPTIMIZER == "ADAMW"
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert all(step < cfg.SOLVER.MAX_ITER for step in cfg.SOLVER.STEPS)
    assert cfg.MODEL.DEVICE in ("cpu", "cuda")  # "auto" is resolved


@pytest.mark.parametrize("path", SINGLE_LEVEL_COCO_CONFIGS, ids=os.path.basename)
def test_coco_schedule_matches_the_official_one(path):
    name = os.path.basename(path)
    method, depth, dc5, epochs = re.fullmatch(
        r"(conditional_detr|detr)_R_(\d+)(_DC5)?_(\d+)ep\.yaml", name
    ).groups()
    epochs = int(epochs)
    cfg = get_config(path)

    assert cfg.MODEL.RESNETS.DEPTH == int(depth)
    assert cfg.MODEL.RESNETS.RES5_DILATION == (2 if dc5 else 1)
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.MODEL.RESNETS.OUT_FEATURES == ["res5"]
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)
    assert cfg.SOLVER.BASE_LR == 1e-4 and cfg.SOLVER.WEIGHT_DECAY == 1e-4
    assert cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 0.1
    assert cfg.SOLVER.WARMUP_ITERS == 0
    assert not cfg.SOLVER.AMP.ENABLED

    # 8 processes; the official DC5 runs use 1 image per process, the others 2.
    per_process = 1 if dc5 else 2
    assert cfg.SOLVER.IMS_PER_BATCH == 8 * per_process
    iters_per_epoch = math.ceil(COCO_TRAIN2017_IMAGES / 8) // per_process
    # Conditional DETR's schedules, and DETR's 50 and 500 epochs (its lr_drop 40 and 400)
    drop_epoch = {"conditional_detr": {50: 40, 75: 60, 108: 80}, "detr": {50: 40, 500: 400}}[method][epochs]
    assert cfg.SOLVER.MAX_ITER == epochs * iters_per_epoch
    assert cfg.SOLVER.STEPS == (drop_epoch * iters_per_epoch,)
    assert cfg.SOLVER.CHECKPOINT_PERIOD == iters_per_epoch


@pytest.mark.parametrize("path", DEFORMABLE_COCO_CONFIGS, ids=os.path.basename)
def test_deformable_detr_configs_have_the_official_recipe(path):
    variant = re.fullmatch(r"deformable_detr_R_50(_refine|_two_stage)?_50ep\.yaml", os.path.basename(path)).group(1)
    cfg = get_config(path)
    args, deformable = cfg.MODEL.DETR, cfg.MODEL.DEFORMABLE_DETR
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.RESNETS.OUT_FEATURES == ["res3", "res4", "res5"]
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    assert (deformable.NUM_FEATURE_LEVELS, deformable.ENC_N_POINTS, deformable.DEC_N_POINTS) == (4, 4, 4)
    assert deformable.WITH_BOX_REFINE == (variant is not None)
    assert deformable.TWO_STAGE == (variant == "_two_stage")
    assert (args.ENC_LAYERS, args.DEC_LAYERS, args.HIDDEN_DIM, args.NHEADS) == (6, 6, 256, 8)
    assert args.DIM_FEEDFORWARD == 1024 and args.DROPOUT == 0.1 and args.NUM_OBJECT_QUERIES == 300
    assert args.CLASS_LOSS == "focal" and args.FOCAL_ALPHA == 0.25
    assert (args.CLASS_COST, args.L1_COST, args.GIOU_COST) == (2, 5, 2)
    assert (args.CLASS_WEIGHT, args.L1_WEIGHT, args.GIOU_WEIGHT) == (2, 5, 2)
    # AdamW lr 2e-4; backbone, sampling offsets and reference points x0.1
    assert cfg.SOLVER.BASE_LR == 2e-4 and cfg.SOLVER.WEIGHT_DECAY == 1e-4
    assert cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1 and deformable.LINEAR_PROJ_LR_MULTIPLIER == 0.1
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 0.1
    # 8 processes x 2 images, 50 epochs with the drop at 40
    iters_per_epoch = math.ceil(COCO_TRAIN2017_IMAGES / 8) // 2
    assert cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.SOLVER.MAX_ITER == 50 * iters_per_epoch
    assert cfg.SOLVER.STEPS == (40 * iters_per_epoch,)


def test_detr_config_has_the_official_detr_recipe():
    cfg = get_config(os.path.join(CONFIG_DIR, "Base-DETR.yaml"))
    args = cfg.MODEL.DETR
    assert cfg.MODEL.META_ARCHITECTURE == "DETR"
    assert args.NUM_OBJECT_QUERIES == 100 and args.NUM_CLASSES == 80
    assert args.CLASS_LOSS == "softmax" and args.NO_OBJECT_WEIGHT == 0.1
    assert (args.CLASS_COST, args.L1_COST, args.GIOU_COST) == (1, 5, 2)
    assert (args.CLASS_WEIGHT, args.L1_WEIGHT, args.GIOU_WEIGHT) == (1, 5, 2)
    assert args.DEEP_SUPERVISION and args.DROPOUT == 0.1
    assert (args.ENC_LAYERS, args.DEC_LAYERS, args.HIDDEN_DIM, args.NHEADS) == (6, 6, 256, 8)


def test_base_config_matches_detr_augmentation():
    cfg = get_config(os.path.join(CONFIG_DIR, "Base-ConditionalDETR.yaml"))
    assert cfg.INPUT.MIN_SIZE_TRAIN == tuple(range(480, 801, 32))
    assert cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    assert cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute_range"
    assert tuple(cfg.INPUT.CROP.SIZE) == (384, 600)
    assert tuple(cfg.INPUT.CROP.RESIZE_BEFORE_CROP) == (400, 500, 600)
    assert cfg.INPUT.CROP.PROB == 0.5
    assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.280, 103.530]
    assert cfg.MODEL.PIXEL_STD == [58.395, 57.120, 57.375]
    assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS is False


def test_quick_schedules_use_the_embedded_dataset():
    for name in (
        "conditional_detr_shapes.yaml", "conditional_detr_groups_shapes.yaml", "conditional_detr_instant_test.yaml",
        "deformable_detr_shapes.yaml", "deformable_detr_instant_test.yaml",
    ):
        cfg = get_config(os.path.join(CONFIG_DIR, "quick_schedules", name))
        assert cfg.DATASETS.TRAIN == ("shapes_train",) and cfg.DATASETS.TEST == ("shapes_val",)
        assert cfg.MODEL.WEIGHTS == ""
        assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == 64
        assert cfg.MODEL.DETR.NUM_CLASSES == 5


def test_the_demo_trains_query_groups_and_the_convergence_study_the_papers_models():
    from conditional_detr.tools.convergence import DEFAULT_SYSTEMS
    from conditional_detr.tools.shapes_demo import DEFAULT_CONFIG

    demo = get_config(DEFAULT_CONFIG)
    assert demo.MODEL.DETR.QUERY_GROUPS == 4
    assert demo.SOLVER.AMP.ENABLED and demo.SOLVER.AMP.PRECISION == "bfloat16"
    for system in DEFAULT_SYSTEMS:
        cfg = get_config(system.split("=", 1)[1])
        assert cfg.MODEL.DETR.QUERY_GROUPS == 1, system
        # otherwise the demo's settings
        assert cfg.SOLVER.MAX_ITER == demo.SOLVER.MAX_ITER and cfg.SEED == demo.SEED


def test_auto_device_is_resolved(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_config(opts=["MODEL.DEVICE", "auto"]).MODEL.DEVICE == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_config(opts=["MODEL.DEVICE", "auto"]).MODEL.DEVICE == "cuda"


def test_wrong_type_on_command_line_names_key_and_value():
    with pytest.raises(ValueError) as e:
        get_config(
            os.path.join(CONFIG_DIR, "Base-ConditionalDETR.yaml"), ["SOLVER.MAX_ITER", "many"]
        )
    message = str(e.value)
    assert "SOLVER.MAX_ITER" in message and "many" in message


def test_wrong_type_in_yaml_names_key_and_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "_BASE_": os.path.join(CONFIG_DIR, "Base-ConditionalDETR.yaml"),
                "MODEL": {"DETR": {"NUM_OBJECT_QUERIES": "three hundred"}},
            }
        )
    )
    with pytest.raises(ValueError) as e:
        get_config(str(path))
    message = str(e.value)
    assert "MODEL.DETR.NUM_OBJECT_QUERIES" in message and "three hundred" in message


def test_unknown_key_is_named():
    # yacs reports an unknown key on the command line by an AssertionError.
    with pytest.raises((KeyError, AssertionError), match="SOLVER.BACKBONE_MULTIPLER"):
        get_config(opts=["SOLVER.BACKBONE_MULTIPLER", "0.1"])


@pytest.mark.parametrize(
    "old, new",
    [
        ("MODEL.CONDITIONAL_DETR.NUM_CLASSES", "MODEL.DETR.NUM_CLASSES"),
        ("MODEL.CONDITIONAL_DETR.EOS_COEF", "MODEL.DETR.NO_OBJECT_WEIGHT"),
        ("MODEL.CONDITIONAL_DETR.NUM_TOPK", "TEST.DETECTIONS_PER_IMAGE"),
        ("MODEL.CONDITIONAL_DETR.CHECKPOINT_CLASS_HEAD", "MODEL.WEIGHTS_CLASS_HEAD"),
    ],
)
def test_old_names_are_answered_with_the_new(tmp_path, old, new):
    message = rf"{re.escape(old)} was renamed to {re.escape(new)}"
    with pytest.raises(KeyError, match=message):
        get_config(INSTANT_CONFIG, [old, "1"])
    node, key = old.rsplit(".", 1)
    nested = {key: 1}
    for part in reversed(node.split(".")):
        nested = {part: nested}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"_BASE_": INSTANT_CONFIG, **nested}))
    with pytest.raises(KeyError, match=message):
        get_config(str(path))


def test_every_renamed_key_names_an_existing_key():
    cfg = get_config(INSTANT_CONFIG)
    for old, new in RENAMED_KEYS.items():
        node = cfg
        for part in new.split("."):
            node = node[part]  # KeyError where the table points nowhere
        assert old.rsplit(".", 1)[-1] not in cfg.MODEL.CONDITIONAL_DETR
