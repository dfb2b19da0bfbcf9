"""
What the command-line tools share: a model in eval mode with its weights, the
images named on the command line, and an image made into the model's input.
"""

import os

import numpy as np
import torch

from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from ..checkpoint import ConditionalDETRCheckpointer
from ..data.dataset_mapper import build_detr_augmentation

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def build_eval_model(cfg, load_weights=True):
    """The model of `cfg` in eval mode, with MODEL.WEIGHTS loaded when given and wanted."""
    model = build_model(cfg)
    model.eval()
    if load_weights and cfg.MODEL.WEIGHTS:
        ConditionalDETRCheckpointer.from_config(cfg, model).load(cfg.MODEL.WEIGHTS)
    return model


def list_images(inputs):
    """
    The image files named by `inputs`, files or folders (every image in a folder, sorted).
    Raises FileNotFoundError naming a missing path, ValueError naming an imageless folder.
    """
    paths = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if name.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(path, name))
            )
            if not found:
                raise ValueError(
                    f"input folder {path!r} has no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
                )
            paths.extend(found)
        elif os.path.isfile(path):
            paths.append(path)
        else:
            raise FileNotFoundError(f"input {path!r} does not exist")
    return paths


def list_inputs(inputs):
    """
    (images, videos) named by `inputs`: video files by their extension, the rest as
    `list_images` finds them.
    """
    videos = [p for p in inputs if os.path.isfile(p) and p.lower().endswith(VIDEO_EXTENSIONS)]
    images = list_images([p for p in inputs if p not in videos])
    return images, videos


def read_image(path, image_format):
    """HWC uint8 array in `image_format`; errors name the file."""
    try:
        return utils.read_image(path, format=image_format)
    except Exception as e:
        raise OSError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e


def model_input(cfg, image):
    """
    The model's input dict for an image in INPUT.FORMAT: resized as at test time,
    with "height"/"width" of the original so that predictions come back in its pixels.
    """
    height, width = image.shape[:2]
    aug_input = T.AugInput(image)
    T.AugmentationList(build_detr_augmentation(cfg, is_train=False))(aug_input)
    tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
    return {"image": tensor, "height": height, "width": width}


def to_rgb(image, image_format):
    return utils.convert_image_to_rgb(image, image_format)
