"""
Draw a Conditional DETR model's detections on images.

    python -m conditional_detr.tools.demo --config-file FILE --input IMG_OR_FOLDER [...]
        --output DIR [--confidence-threshold 0.5] [KEY VALUE ...]   e.g. MODEL.WEIGHTS W

Each image is drawn with detectron2's Visualizer, class names from the metadata of
DATASETS.TEST[0], and saved under DIR with its own name (PNG unless it was a JPEG);
DIR/predictions.json lists the drawn detections in the image's pixels (XYXY boxes).
"""

import argparse
import json
import logging
import os

import torch
from PIL import Image

from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger

try:
    from detectron2.utils.visualizer import Visualizer
except ImportError as e:
    raise ImportError(
        f"detectron2's Visualizer needs OpenCV (pip install opencv-python-headless): {e}"
    ) from e

from ..engine import get_config
from .inference import build_eval_model, list_images, model_input, read_image, to_rgb

logger = logging.getLogger("detectron2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files and/or folders of images"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the drawings")
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5, help="least score of a drawn detection"
    )
    parser.add_argument(
        "opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.confidence_threshold <= 1.0:
        parser.error(f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}")
    return args


def output_path(output_dir, image_path):
    stem, extension = os.path.splitext(os.path.basename(image_path))
    extension = extension.lower() if extension.lower() in (".jpg", ".jpeg") else ".png"
    return os.path.join(output_dir, stem + extension)


def predict(cfg, model, image):
    """Instances on the CPU, in the pixels of `image` (INPUT.FORMAT, HWC uint8)."""
    with torch.no_grad():
        return model([model_input(cfg, image)])[0]["instances"].to("cpu")


def main(argv=None):
    args = parse_args(argv)
    paths = list_images(args.input)  # before the model is built: bad paths fail fast
    cfg = get_config(args.config_file, args.opts)
    cfg.freeze()
    if not logger.handlers:
        setup_logger(name="detectron2")
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
    model = build_eval_model(cfg)

    os.makedirs(args.output, exist_ok=True)
    summary, written = [], set()
    for path in paths:
        image = read_image(path, cfg.INPUT.FORMAT)
        instances = predict(cfg, model, image)
        instances = instances[instances.scores >= args.confidence_threshold]
        drawing = Visualizer(to_rgb(image, cfg.INPUT.FORMAT), metadata)
        drawing = drawing.draw_instance_predictions(instances).get_image()
        destination = output_path(args.output, path)
        if destination in written:  # same name in two input folders
            stem, extension = os.path.splitext(destination)
            destination = f"{stem}_{len(written)}{extension}"
        written.add(destination)
        Image.fromarray(drawing).save(destination)
        names = metadata.get("thing_classes", None) if metadata else None
        summary.append(
            {
                "input": os.path.abspath(path),
                "output": os.path.abspath(destination),
                "boxes": instances.pred_boxes.tensor.tolist(),
                "scores": instances.scores.tolist(),
                "classes": [names[c] if names else c for c in instances.pred_classes.tolist()],
            }
        )
        logger.info(f"{path}: {len(instances)} detections -> {destination}")
    with open(os.path.join(args.output, "predictions.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
