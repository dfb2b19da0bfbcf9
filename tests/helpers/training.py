"""The instant-training config on a tiny copy of the embedded shapes dataset."""
import json
import os

from detectron2.engine import default_argument_parser

from conditional_detr.data.shapes import STUFF_CATEGORIES, ShapesParams, register_shapes_datasets, register_shapes_panoptic_datasets
from conditional_detr.engine import get_config

from .paths import INSTANT_CONFIG

TINY_SHAPES = ShapesParams(image_size=(64, 64), num_train=16, num_val=8, object_size=(10, 40), max_objects=3)


TINY_PANOPTIC_SHAPES = TINY_SHAPES.replace(stuff=STUFF_CATEGORIES)
# the things then the stuff classes of shapes_panoptic_*
PANOPTIC_NUM_CLASSES = len(TINY_SHAPES.categories) + len(STUFF_CATEGORIES)


def register_tiny_shapes(root):
    """shapes_train/val under `root`, and shapes_panoptic_train/val beside it (`root`_panoptic)."""
    register_shapes_datasets(root=root, params=TINY_SHAPES)
    register_shapes_panoptic_datasets(root=f"{root}_panoptic", params=TINY_PANOPTIC_SHAPES)


def instant_opts(output_dir, *opts):
    return ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(output_dir), *map(str, opts)]


def instant_cfg(output_dir, *opts):
    return get_config(INSTANT_CONFIG, instant_opts(output_dir, *opts))


def cli_args(*argv, config_file=INSTANT_CONFIG):
    """train_net's arguments for a config (the instant test's unless told)."""
    return default_argument_parser().parse_args(["--config-file", config_file, *map(str, argv)])


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]
