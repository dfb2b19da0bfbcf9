"""
Tiny models, batches and predictions: the instant config's model with overrides, a
Deformable DETR of the tiny fixture's architecture, and random set predictions.
"""
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conditional_detr.engine import get_config

from .official import deformable_resnet_cfg, shrink_to_tiny_fixture
from .paths import INSTANT_CONFIG

HIDDEN_DIM, NHEADS, NUM_QUERIES = 64, 4, 10
_CONDITIONAL_DETR_KEYS = ("REFERENCE_POINTS", "SPATIAL_QUERY", "TRANSFORMATION", "BOX_OFFSET")


def detector_node(key):
    return "CONDITIONAL_DETR" if key in _CONDITIONAL_DETR_KEYS else "DETR"


def tiny_model(**overrides):
    """The instant config's model; an override without a dot is a key of MODEL.CONDITIONAL_DETR or MODEL.DETR."""
    opts = ["MODEL.DEVICE", "cpu"]
    for key, value in overrides.items():
        opts += [key if "." in key else f"MODEL.{detector_node(key)}.{key}", str(value)]
    torch.manual_seed(0)
    return build_model(get_config(INSTANT_CONFIG, opts))


def tiny_batch(seed=0):
    """Two training images of different sizes, one with two boxes and one with none."""
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for h, w, n in ((48, 64, 2), (56, 40, 0)):
        instances = Instances((h, w))
        xy = torch.rand(n, 2, generator=generator) * torch.tensor([w / 2, h / 2])
        instances.gt_boxes = Boxes(torch.cat([xy, xy + torch.tensor([w / 3, h / 3])], dim=1))
        instances.gt_classes = torch.randint(0, 5, (n,), generator=generator)
        image = torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8).float()
        batch.append({"image": image, "instances": instances})
    return batch


def tiny_deformable_cfg(variant="two_stage", **overrides):
    """Deformable DETR of the tiny fixture's architecture at width 64, 5 classes and 6 queries."""
    cfg = shrink_to_tiny_fixture(deformable_resnet_cfg(18, 5, variant), num_queries=6)
    cfg.MODEL.DETR.HIDDEN_DIM = 64
    cfg.MODEL.DETR.NHEADS = 4
    cfg.MODEL.DETR.DIM_FEEDFORWARD = 64
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


NUM_CLASSES = 5  # of random_outputs and random_targets


def random_outputs(batch, num_queries=7, num_layers=2, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def layer():
        boxes = torch.rand(batch, num_queries, 4, generator=generator) * 0.5 + 0.25
        return {
            "pred_logits": torch.randn(batch, num_queries, NUM_CLASSES, generator=generator),
            "pred_boxes": boxes,
        }

    outputs = layer()
    outputs["aux_outputs"] = [layer() for _ in range(num_layers - 1)]
    return outputs


def random_targets(counts, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "labels": torch.randint(0, NUM_CLASSES, (n,), generator=generator),
            "boxes": torch.rand(n, 4, generator=generator) * 0.4 + 0.3,
        }
        for n in counts
    ]
