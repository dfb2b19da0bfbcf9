"""
Draw a model's detections on images, folders of images, videos or a webcam.

    python -m conditional_detr.tools.demo --config-file FILE --output DIR
        (--input IMG_OR_FOLDER_OR_VIDEO [...] | --webcam INDEX [--max-frames N])
        [--confidence-threshold 0.5] [--batch-size 4] [--coco-json] [KEY VALUE ...]   e.g. MODEL.WEIGHTS W

Each image is drawn with detectron2's Visualizer, class names from the metadata of
DATASETS.TEST[0], and saved under DIR with its own name (PNG unless it was a JPEG); a
video (or the webcam) becomes DIR/<name>.mp4 with every frame drawn. DIR/predictions.json
lists the drawn detections in the image's pixels (XYXY boxes), per image and per frame.
With --coco-json, DIR/coco_detections.json holds every detection of the images in COCO's
results format ([x, y, width, height] boxes; the dataset's image and category ids when
the images are those of DATASETS.TEST[0]'s json, else image ids 1..N in input order),
ready for pycocotools' `loadRes`. --batch-size runs that many images (of one size, so that
no padding changes the detections) or frames per forward pass.
"""

import argparse
import json
import logging
import os

import cv2
import numpy as np
import torch
import tqdm
from PIL import Image

from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger

try:
    from detectron2.utils.visualizer import Visualizer
except ImportError as e:
    raise ImportError(
        f"detectron2's Visualizer needs OpenCV (pip install opencv-python-headless): {e}"
    ) from e

from ..data.datasets import dataset_class_names
from ..engine import get_config
from .inference import build_eval_model, list_inputs, model_input, read_image, to_rgb

logger = logging.getLogger("detectron2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument(
        "--input", nargs="+", default=[], help="image files, folders of images and/or video files"
    )
    parser.add_argument("--webcam", type=int, default=None, metavar="INDEX", help="read a camera")
    parser.add_argument(
        "--max-frames", type=int, default=None, help="stop a video or the webcam after N frames"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the drawings")
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5, help="least score of a drawn detection"
    )
    parser.add_argument(
        "--batch-size", type=int, default=1, help="images or frames per forward pass"
    )
    parser.add_argument(
        "--coco-json", action="store_true", help="also write DIR/coco_detections.json"
    )
    parser.add_argument(
        "opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.confidence_threshold <= 1.0:
        parser.error(f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}")
    if bool(args.input) == (args.webcam is not None):
        parser.error("give either --input or --webcam")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_frames is not None and args.max_frames < 1:
        parser.error(f"--max-frames must be at least 1, got {args.max_frames}")
    return args


def output_path(output_dir, image_path, extension=None):
    stem, own = os.path.splitext(os.path.basename(image_path))
    if extension is None:
        extension = own.lower() if own.lower() in (".jpg", ".jpeg") else ".png"
    return os.path.join(output_dir, stem + extension)


def predict(cfg, model, image):
    """Instances on the CPU, in the pixels of `image` (INPUT.FORMAT, HWC uint8)."""
    return predict_batch(cfg, model, [image])[0]["instances"]


def predict_batch(cfg, model, images):
    """The model's outputs of several images in one forward pass, on the CPU: "instances" and,
    from a panoptic model, "panoptic_seg"."""
    with torch.no_grad():
        outputs = model([model_input(cfg, image) for image in images])
    results = []
    for output in outputs:
        result = {"instances": output["instances"].to("cpu")}
        if "panoptic_seg" in output:
            segment_ids, segments = output["panoptic_seg"]
            result["panoptic_seg"] = (segment_ids.cpu(), segments)
        results.append(result)
    return results


def batches(items, size):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Drawer:
    """Draws detections above the threshold and lists them for predictions.json."""

    def __init__(self, cfg, threshold):
        self.format = cfg.INPUT.FORMAT
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
        self.names = self.metadata.get("thing_classes", None) if self.metadata else None
        self.threshold = threshold

    def __call__(self, image, output):
        """
        The drawing (RGB) and the drawn detections: the panoptic segmentation where the model
        gives one, else the instances above the threshold, with their masks where it has them.
        """
        instances = output["instances"]
        instances = instances[instances.scores >= self.threshold]
        drawing = Visualizer(to_rgb(image, self.format), self.metadata)
        detections = {
            "boxes": instances.pred_boxes.tensor.tolist(),
            "scores": instances.scores.tolist(),
            "classes": [self.names[c] if self.names else c for c in instances.pred_classes.tolist()],
        }
        if "panoptic_seg" in output:
            segment_ids, segments = output["panoptic_seg"]
            drawing = drawing.draw_panoptic_seg(segment_ids, segments)
            detections["segments"] = [
                {**s, "class": self.names[s["category_id"]] if self.names else s["category_id"]} for s in segments
            ]
        else:
            drawing = drawing.draw_instance_predictions(instances)
        return drawing.get_image(), detections


class CocoDetections:
    """Every detection in COCO's results format, with the ids of DATASETS.TEST[0]'s json when it has the images."""

    def __init__(self, cfg):
        self.image_ids, self.category_ids = {}, None
        metadata = None
        if cfg.DATASETS.TEST:
            dataset_class_names(cfg.DATASETS.TEST[0])  # the id mapping of a dataset not loaded yet
            metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        if metadata is not None and metadata.get("json_file") and os.path.isfile(metadata.json_file):
            with open(metadata.json_file) as f:
                images = json.load(f).get("images", [])
            self.image_ids = {os.path.normpath(image["file_name"]): image["id"] for image in images}
            self.image_root = metadata.get("image_root", "")
        mapping = metadata.get("thing_dataset_id_to_contiguous_id", None) if metadata else None
        if mapping:
            self.category_ids = {contiguous: dataset_id for dataset_id, contiguous in mapping.items()}
        self.results = []

    def image_id(self, path, index):
        if self.image_ids:
            relative = os.path.normpath(os.path.relpath(os.path.abspath(path), os.path.abspath(self.image_root)))
            for key in (relative, os.path.basename(path)):
                if key in self.image_ids:
                    return self.image_ids[key]
        return index + 1

    def add(self, image_id, instances):
        for box, score, label in zip(
            instances.pred_boxes.tensor.tolist(), instances.scores.tolist(), instances.pred_classes.tolist()
        ):
            x0, y0, x1, y1 = box
            category = self.category_ids[label] if self.category_ids else label
            self.results.append(
                {"image_id": image_id, "category_id": category, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
            )


def open_video(source):
    """cv2.VideoCapture of a file or a camera index; errors name it."""
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        what = f"webcam {source}" if isinstance(source, int) else f"video {source!r}"
        raise OSError(f"cannot open {what}")
    return capture


def video_frames(capture, image_format, max_frames=None):
    """Frames in INPUT.FORMAT until the end, or max_frames."""
    count = 0
    while max_frames is None or count < max_frames:
        ok, frame = capture.read()
        if not ok:
            return
        count += 1
        yield frame if image_format == "BGR" else np.ascontiguousarray(frame[:, :, ::-1])


def run_video(cfg, model, drawer, source, destination, args):
    capture = open_video(source)
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    if args.max_frames is not None:
        total = min(total or args.max_frames, args.max_frames)
    writer, frames = None, []
    name = f"webcam {source}" if isinstance(source, int) else os.path.basename(source)
    progress = tqdm.tqdm(total=total, desc=name, unit="frame")
    try:
        pending = []
        stream = video_frames(capture, cfg.INPUT.FORMAT, args.max_frames)
        for frame in stream:
            pending.append(frame)
            if len(pending) < args.batch_size:
                continue
            writer = _draw_frames(cfg, model, drawer, pending, writer, destination, fps, frames)
            progress.update(len(pending))
            pending = []
        if pending:
            writer = _draw_frames(cfg, model, drawer, pending, writer, destination, fps, frames)
            progress.update(len(pending))
    except KeyboardInterrupt:  # the way to stop a webcam without --max-frames
        logger.info(f"{name}: stopped after {len(frames)} frames")
    finally:
        progress.close()
        capture.release()
        if writer is not None:
            writer.release()
    if not frames:
        raise ValueError(f"{name}: no frame could be read")
    logger.info(f"{name}: {len(frames)} frames -> {destination}")
    return {"input": source if isinstance(source, int) else os.path.abspath(source),
            "output": os.path.abspath(destination), "frames": frames}


def _draw_frames(cfg, model, drawer, pending, writer, destination, fps, frames):
    for frame, output in zip(pending, predict_batch(cfg, model, pending)):
        drawing, detections = drawer(frame, output)
        if writer is None:
            height, width = drawing.shape[:2]
            writer = cv2.VideoWriter(destination, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
            if not writer.isOpened():
                raise OSError(f"cannot write video {destination!r}")
        writer.write(np.ascontiguousarray(drawing[:, :, ::-1]))
        frames.append(detections)
    return writer


def main(argv=None):
    args = parse_args(argv)
    images, videos = list_inputs(args.input)  # before the model is built: bad paths fail fast
    cfg = get_config(args.config_file, args.opts)
    cfg.freeze()
    if not logger.handlers:
        setup_logger(name="detectron2")
    model = build_eval_model(cfg)
    drawer = Drawer(cfg, args.confidence_threshold)
    coco = CocoDetections(cfg) if args.coco_json else None

    os.makedirs(args.output, exist_ok=True)
    summary, written = [], set()

    def destination_for(path, extension=None):
        destination = output_path(args.output, path, extension)
        if destination in written:  # same name in two input folders
            stem, ext = os.path.splitext(destination)
            destination = f"{stem}_{len(written)}{ext}"
        written.add(destination)
        return destination

    destinations = [destination_for(path) for path in images]
    entries = [None] * len(images)

    def run(group):
        pixels = [image for _, image in group]
        for (index, image), output in zip(group, predict_batch(cfg, model, pixels)):
            drawing, detections = drawer(image, output)
            Image.fromarray(drawing).save(destinations[index])
            entry = {"input": os.path.abspath(images[index]), "output": os.path.abspath(destinations[index])}
            entries[index] = {**entry, **detections}
            if coco is not None:
                entries[index]["image_id"] = coco.image_id(images[index], index)
                coco.add(entries[index]["image_id"], output["instances"])
        progress.update(len(group))

    # Batches hold images of one size: padding would change what the backbone sees at the
    # borders, so that batched detections would differ from those of one image at a time.
    pending = {}  # (height, width) -> [(index, image)]
    with tqdm.tqdm(total=len(images), desc="images", unit="image", disable=not images) as progress:
        for index, path in enumerate(images):
            image = read_image(path, cfg.INPUT.FORMAT)
            group = pending.setdefault(image.shape[:2], [])
            group.append((index, image))
            if len(group) == args.batch_size:
                run(pending.pop(image.shape[:2]))
            elif sum(map(len, pending.values())) >= 4 * args.batch_size:  # many sizes: bound the memory
                for size in list(pending):
                    run(pending.pop(size))
        for size in list(pending):
            run(pending.pop(size))
    summary.extend(entries)
    for path in videos:
        summary.append(run_video(cfg, model, drawer, path, destination_for(path, ".mp4"), args))
    if args.webcam is not None:
        summary.append(
            run_video(cfg, model, drawer, args.webcam, destination_for(f"webcam{args.webcam}", ".mp4"), args)
        )
    with open(os.path.join(args.output, "predictions.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if coco is not None:
        with open(os.path.join(args.output, "coco_detections.json"), "w") as f:
            json.dump(coco.results, f)
    return summary


if __name__ == "__main__":
    main()
