"""
Train Conditional DETR on the embedded synthetic shapes dataset, evaluate it with
the COCO API, and draw its predictions on a few validation images.

    python -m conditional_detr.tools.shapes_demo [--output-dir output/demo]
        [--config-file configs/quick_schedules/conditional_detr_groups_shapes.yaml] [KEY VALUE ...]

Everything goes to the output folder: the training log and metrics (log.txt,
metrics.json, TensorBoard events), the checkpoints, the COCO detections, the
pictures (visualizations/*.png: ground truth left, predictions right) and
results.json with the bbox metrics and the training time. A panoptic model's config on the
panoptic shapes adds PQ / SQ / RQ and mask AP, and draws panoptic segmentations;
`make panoptic-demo` trains Deformable DETR's boxes first (--box-stage
configs/quick_schedules/deformable_detr_panoptic_shapes_boxes.yaml), then its mask head alone
(--config-file configs/quick_schedules/deformable_detr_panoptic_shapes.yaml). The GPU is used when
there is one (MODEL.DEVICE "auto"). The demo's config trains under bfloat16 autocast
(SOLVER.AMP); on a device without native bfloat16 arithmetic, where it would be emulated
and slower, the demo trains in float32 instead and says so.
"""

import argparse
import json
import logging
import math
import os
import time

import numpy as np
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.engine import default_setup
from detectron2.utils.logger import create_small_table

try:
    from detectron2.utils.visualizer import Visualizer
except ImportError as e:
    raise ImportError(
        f"detectron2's Visualizer needs OpenCV (pip install opencv-python-headless): {e}"
    ) from e

from .. import data  # noqa: F401 (registers shapes_train / shapes_val)
from ..data.dataset_mapper import DetrDatasetMapper
from ..engine import Trainer, get_config
from .benchmarking import instruction_sets, processor_name

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(_REPO, "configs", "quick_schedules", "conditional_detr_groups_shapes.yaml")
BBOX_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
PANOPTIC_METRICS = tuple(f"{m}{part}" for part in ("", "_th", "_st") for m in ("PQ", "SQ", "RQ"))

logger = logging.getLogger("detectron2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file", default=DEFAULT_CONFIG, metavar="FILE", help="path to config file"
    )
    parser.add_argument("--output-dir", default="output/demo", help="where everything is written")
    parser.add_argument(
        "--box-stage", metavar="FILE",
        help="a detector's config trained first (into OUTPUT_DIR/box_stage; the overrides apply to "
        "it too), whose final weights --config-file's model starts from: boxes, then masks",
    )
    parser.add_argument("--num-images", type=int, default=8, help="validation images to draw")
    parser.add_argument(
        "--score-threshold", type=float, default=0.5, help="least score of a drawn detection"
    )
    parser.add_argument(
        "opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    return parser.parse_args(argv)


def _finite_or_none(value):
    # COCO reports NaN for an area range without objects; JSON has no NaN.
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def draw_predictions(cfg, model, dataset_name, num_images, score_threshold, output_dir):
    """
    Save ground truth and predictions side by side for the first images of a dataset: the
    panoptic segmentation where the model gives one, else the instances above the threshold.
    """
    os.makedirs(output_dir, exist_ok=True)
    metadata = MetadataCatalog.get(dataset_name)
    mapper = DetrDatasetMapper(cfg, is_train=False)
    paths = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for dataset_dict in DatasetCatalog.get(dataset_name)[:num_images]:
            output = model([mapper(dataset_dict)])[0]
            image = utils.read_image(dataset_dict["file_name"], format="RGB")
            # The images are small: drawn at twice their size so that the labels stay legible.
            truth = (
                Visualizer(image, metadata, scale=2.0).draw_dataset_dict(dataset_dict).get_image()
            )
            drawing = Visualizer(image, metadata, scale=2.0)
            if "panoptic_seg" in output:
                segment_ids, segments = output["panoptic_seg"]
                drawing = drawing.draw_panoptic_seg(segment_ids.to("cpu"), segments)
            else:
                instances = output["instances"].to("cpu")
                drawing = drawing.draw_instance_predictions(instances[instances.scores >= score_threshold])
            predicted = drawing.get_image()
            gap = np.full((truth.shape[0], 8, 3), 255, dtype=np.uint8)
            path = os.path.join(
                output_dir,
                os.path.splitext(os.path.basename(dataset_dict["file_name"]))[0] + ".png",
            )
            Image.fromarray(np.concatenate([truth, gap, predicted], axis=1)).save(path)
            paths.append(path)
    model.train(was_training)
    return paths


def train_timed(cfg):
    """Train `cfg` without evaluating (the demo evaluates once, after): (trainer, seconds of training)."""
    train_cfg = cfg.clone()
    train_cfg.defrost()
    train_cfg.DATASETS.TEST = ()
    train_cfg.TEST.EVAL_PERIOD = 0
    train_cfg.freeze()
    trainer = Trainer(train_cfg)
    trainer.resume_or_load(resume=False)
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def train_box_stage(args, output_dir):
    """--box-stage's detector trained into `output_dir`/box_stage: (its final weights, its part of results.json)."""
    cfg = get_config(args.box_stage, args.opts + ["OUTPUT_DIR", os.path.join(output_dir, "box_stage")])
    precision_note = bfloat16_only_where_native(cfg)
    if precision_note:
        logger.warning(precision_note)
    _, seconds = train_timed(cfg)
    summary = {
        "box_stage_config": os.path.abspath(args.box_stage),
        "box_stage_iterations": cfg.SOLVER.MAX_ITER,
        "box_stage_seconds": round(seconds, 1),
    }
    return os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), summary


def panoptic_summary(evaluation):
    """A panoptic model's PQ / SQ / RQ (all, things, stuff) and mask AP for results.json, or nothing."""
    if "panoptic_seg" not in evaluation:
        return {}
    return {
        "panoptic": {k: _finite_or_none(evaluation["panoptic_seg"][k]) for k in PANOPTIC_METRICS},
        "segm": {k: _finite_or_none(evaluation["segm"].get(k)) for k in BBOX_METRICS},
    }


def native_bfloat16(device):
    """Whether `device` has bfloat16 arithmetic: a CPU with AVX-512 BF16 or AMX, a GPU of compute capability >= 8.0."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # torch held below AVX-512 (ATEN_CPU_CAPABILITY=avx2) computes bfloat16 without those instructions
        if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
            return False
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def bfloat16_only_where_native(cfg):
    """Turns bfloat16 SOLVER.AMP off on a device without native bfloat16; returns why, or None."""
    device = torch.device(cfg.MODEL.DEVICE)
    if cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.AMP.PRECISION == "bfloat16" and not native_bfloat16(device):
        cfg.SOLVER.AMP.ENABLED = False
        return f"{device} has no native bfloat16 arithmetic: training in float32 (SOLVER.AMP.ENABLED False)"
    return None


def main(argv=None):
    args = parse_args(argv)
    cfg = get_config(args.config_file, args.opts + ["OUTPUT_DIR", args.output_dir])
    precision_note = bfloat16_only_where_native(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    if precision_note:
        logger.warning(precision_note)
    if len(cfg.DATASETS.TEST) != 1:
        raise ValueError(f"the demo evaluates one dataset, got DATASETS.TEST={cfg.DATASETS.TEST}")
    dataset_name = cfg.DATASETS.TEST[0]

    box_stage = {}
    if args.box_stage:
        weights, box_stage = train_box_stage(args, cfg.OUTPUT_DIR)
        cfg.defrost()
        cfg.MODEL.WEIGHTS = weights
        cfg.freeze()
    trainer, train_seconds = train_timed(cfg)

    DatasetCatalog.get(dataset_name)  # generated now if needed, not while evaluation is timed
    start = time.perf_counter()
    evaluation = Trainer.test(cfg, trainer.model)
    eval_seconds = time.perf_counter() - start
    results = evaluation["bbox"]

    pictures = draw_predictions(
        cfg,
        trainer.model,
        dataset_name,
        args.num_images,
        args.score_threshold,
        os.path.join(cfg.OUTPUT_DIR, "visualizations"),
    )

    summary = {
        "dataset": dataset_name,
        "bbox": {k: _finite_or_none(results.get(k)) for k in BBOX_METRICS},
        "bbox_per_category": {
            k[len("AP-") :]: _finite_or_none(v) for k, v in results.items() if k.startswith("AP-")
        },
        **panoptic_summary(evaluation),
        **box_stage,
        "train_seconds": round(train_seconds + box_stage.get("box_stage_seconds", 0), 1),
        "eval_seconds": round(eval_seconds, 1),
        "iterations": cfg.SOLVER.MAX_ITER,
        "images_per_batch": cfg.SOLVER.IMS_PER_BATCH,
        "device": cfg.MODEL.DEVICE,
        "processor": processor_name(cfg.MODEL.DEVICE),
        # what the speed depends on: the CPU's vector instructions, and any cap on their use
        **instruction_sets(cfg.MODEL.DEVICE),
        "training_precision": cfg.SOLVER.AMP.PRECISION if cfg.SOLVER.AMP.ENABLED else "float32",
        "torch_threads": torch.get_num_threads(),
        "config_file": os.path.abspath(args.config_file),
        "visualizations": [os.path.relpath(p, cfg.OUTPUT_DIR) for p in pictures],
    }
    with open(os.path.join(cfg.OUTPUT_DIR, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)

    print(
        f"\nBounding-box AP on {dataset_name}, after {cfg.SOLVER.MAX_ITER} iterations "
        f"in {summary['train_seconds'] / 60:.1f} min of training on {cfg.MODEL.DEVICE}:"
    )
    print(create_small_table({k: results.get(k, float("nan")) for k in BBOX_METRICS}))
    if "panoptic_seg" in evaluation:
        print(f"Panoptic quality (all, things, stuff) and mask AP on {dataset_name}:")
        print(create_small_table({k: summary["panoptic"][k] for k in PANOPTIC_METRICS}))
        print(create_small_table({f"mask {k}": summary["segm"][k] for k in BBOX_METRICS}))
    print(
        f"Predictions drawn in {os.path.join(cfg.OUTPUT_DIR, 'visualizations')}; "
        f"metrics in {os.path.join(cfg.OUTPUT_DIR, 'results.json')}"
    )
    return summary


if __name__ == "__main__":
    main()
