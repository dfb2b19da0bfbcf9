"""The official implementations' reference outputs, and configs of their architectures."""
import json
import sys
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from conditional_detr import add_conditional_detr_config

from .paths import REFERENCE_DIR, SCRIPTS


def fixture_script():
    """scripts/make_reference_fixtures.py as a module (a script beside the package, imported
    only when asked for: its folder goes on the import path then)."""
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    import make_reference_fixtures

    return make_reference_fixtures


def reference_file(name):
    """
    The path of a reference output; the calling test skips where it is missing, naming the
    file and the command that writes it.
    """
    path = Path(REFERENCE_DIR) / name
    if not path.exists():
        flag, repository = fixture_script().writer_of(name)
        pytest.skip(
            f"official reference output {name} not found in {REFERENCE_DIR}: write it with "
            f"`python scripts/make_reference_fixtures.py --{flag} <checkout of {repository}> --output DIR` "
            "and set CONDITIONAL_DETR_REFERENCE=DIR (docs/fidelity.md)"
        )
    return path


def official_keys(name):
    """{key: torch.Size} of a reference `*_keys.txt`: every key and shape of a full-size official checkpoint."""
    shapes = {}
    for line in reference_file(name).read_text().splitlines():
        key, shape = line.split("\t")
        shapes[key] = torch.Size(json.loads(shape))
    return shapes


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
    cfg.MODEL.DETR.NUM_CLASSES = num_classes
    return cfg


def tiny_fixture_cfg(ops_impl="pytorch"):
    cfg = shrink_to_tiny_fixture(resnet_cfg(depth=18, num_classes=91), num_queries=30)
    cfg.MODEL.DETR.OPS_IMPL = ops_impl
    return cfg


def shrink_to_tiny_fixture(cfg, num_queries):
    """The architecture of the tiny fixtures (their *_args.json)."""
    args = cfg.MODEL.DETR
    args.NUM_OBJECT_QUERIES = num_queries
    args.ENC_LAYERS = 2
    args.DEC_LAYERS = 3
    args.DIM_FEEDFORWARD = 512
    args.DROPOUT = 0.0
    return cfg


def detr_resnet_cfg(depth=50, num_classes=91, dilation=1):
    """A config with the official DETR model: its decoder, 100 queries and softmax recipe."""
    cfg = resnet_cfg(depth, num_classes, dilation)
    cfg.MODEL.META_ARCHITECTURE = "DETR"
    args = cfg.MODEL.DETR
    args.NUM_OBJECT_QUERIES = 100
    args.CLASS_LOSS = "softmax"
    args.NO_OBJECT_WEIGHT = 0.1
    args.CLASS_COST = 1.0
    args.CLASS_WEIGHT = 1.0
    return cfg


def tiny_detr_fixture_cfg():
    return shrink_to_tiny_fixture(detr_resnet_cfg(depth=18, num_classes=91), num_queries=20)


def load_converted(checkpoint, cfg):
    """The model of `cfg` in eval mode with a converted checkpoint, every key matching."""
    model = build_model(cfg).eval()
    incompatible = DetectionCheckpointer(model)._load_model(
        {"model": torch.load(checkpoint, map_location="cpu")["model"], "matching_heuristics": False}
    )
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes
    return model


def run(model, reference_io):
    """The output dict of the model on the reference images, run as one batch."""
    inputs = [{"image": image} for image in reference_io["images_uint8_rgb"]]
    with torch.no_grad():
        return model.forward_outputs(model.preprocess_image(inputs))


def layers(outputs):
    """The outputs of every decoder layer, the last one last."""
    return outputs["aux_outputs"] + [{"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}]


def postprocessed(model, reference_io):
    """detectron2's post-processed detections of the reference images at their own size."""
    inputs = [
        {"image": image, "height": image.shape[1], "width": image.shape[2]}
        for image in reference_io["images_uint8_rgb"]
    ]
    with torch.no_grad():
        return model(inputs)


def assert_same_detections(instances, official, image_size):
    """Equal up to the order of tied scores: each detection pairs with an official one."""
    h, w = image_size
    official_boxes = official["boxes"].clone()
    official_boxes[:, 0::2] = official_boxes[:, 0::2].clamp(0, w)
    official_boxes[:, 1::2] = official_boxes[:, 1::2].clamp(0, h)
    assert len(instances) == len(official["scores"])
    torch.testing.assert_close(instances.scores, official["scores"], atol=1e-4, rtol=0)
    unmatched = set(range(len(official_boxes)))
    for box, score, label in zip(instances.pred_boxes.tensor, instances.scores, instances.pred_classes):
        match = next(
            (
                j for j in unmatched
                if official["labels"][j] == label
                and abs(official["scores"][j] - score) < 1e-4
                and (official_boxes[j] - box).abs().max() < 1e-3
            ),
            None,
        )
        assert match is not None, f"no official detection for label {label}, score {score}, box {box}"
        unmatched.remove(match)


def assert_same_losses(model, outputs, reference_io):
    """Every official loss term within 1e-5 relative, with the official weights."""
    losses = model.criterion(outputs, reference_io["targets_coco_ids"])
    assert set(losses) == set(reference_io["losses"])
    for name, value in reference_io["losses"].items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name
    assert model.criterion.weight_dict == reference_io["weight_dict"]


DEFORMABLE_VARIANTS = ("plain", "refine", "two_stage")


def deformable_resnet_cfg(depth=50, num_classes=91, variant="plain"):
    """A config with the official Deformable DETR model (official defaults) of `variant`."""
    cfg = resnet_cfg(depth, num_classes)
    cfg.MODEL.META_ARCHITECTURE = "DeformableDETR"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.DETR.DIM_FEEDFORWARD = 1024
    cfg.MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE = variant in ("refine", "two_stage")
    cfg.MODEL.DEFORMABLE_DETR.TWO_STAGE = variant == "two_stage"
    return cfg


def tiny_deformable_fixture_cfg(variant, ops_impl="pytorch"):
    cfg = shrink_to_tiny_fixture(deformable_resnet_cfg(18, 91, variant), num_queries=30)
    cfg.MODEL.DETR.OPS_IMPL = ops_impl
    return cfg
