import copy
import logging
from typing import List

import numpy as np
import torch
from detectron2.utils.file_io import PathManager
from PIL import Image

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances

__all__ = ["DetrDatasetMapper", "add_detr_augmentation_config", "build_detr_augmentation", "panoptic_segment_ids"]


def panoptic_segment_ids(file_name):
    """The segment ids of a panoptic PNG (id = R + 256 G + 256^2 B), [H, W] int64."""
    with PathManager.open(file_name, "rb") as f:
        rgb = np.asarray(Image.open(f).convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def add_detr_augmentation_config(cfg):
    """
    Add the keys of DETR's crop augmentation that detectron2 lacks. The crop itself
    uses detectron2's INPUT.CROP.{ENABLED,TYPE,SIZE}; the multi-scale resize
    uses INPUT.{MIN,MAX}_SIZE_{TRAIN,TEST}.
    """
    # Shortest edge sizes, one picked at random, the image is resized to before the
    # crop. DETR uses (400, 500, 600) without a longest-edge limit. Empty: no resize.
    cfg.INPUT.CROP.RESIZE_BEFORE_CROP = (400, 500, 600)
    # Probability of taking the "resize, crop, multi-scale resize" branch instead of
    # the plain multi-scale resize.
    cfg.INPUT.CROP.PROB = 0.5


def build_detr_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """
    DETR's augmentation expressed with detectron2 augmentations.

    Training: random flip, then with probability INPUT.CROP.PROB a resize to one of
    INPUT.CROP.RESIZE_BEFORE_CROP followed by a random crop of INPUT.CROP.SIZE,
    then a resize of the shortest edge to one of INPUT.MIN_SIZE_TRAIN, the longest
    edge capped at INPUT.MAX_SIZE_TRAIN. Test: resize to INPUT.MIN_SIZE_TEST.
    """
    if not is_train:
        if cfg.INPUT.MIN_SIZE_TEST <= 0:
            return []
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]

    augs = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    if cfg.INPUT.CROP.ENABLED:
        crop = [T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE)]
        if len(cfg.INPUT.CROP.RESIZE_BEFORE_CROP):
            # No longest-edge limit here, as in DETR: the crop bounds the size anyway.
            crop.insert(
                0, T.ResizeShortestEdge(cfg.INPUT.CROP.RESIZE_BEFORE_CROP, sample_style="choice")
            )
        augs.append(T.RandomApply(T.AugmentationList(crop), prob=cfg.INPUT.CROP.PROB))
    augs.append(
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    )
    return augs


class DetrDatasetMapper:
    """
    Map a dataset dict of detectron2's format into what ConditionalDETR consumes,
    with DETR's augmentation.

    The output dict has "image" (CHW uint8 tensor in INPUT.FORMAT) and, in training,
    "instances" with `gt_boxes` (absolute XYXY in the augmented image) and
    `gt_classes`, and with MODEL.MASK_ON `gt_masks` (detectron2's DatasetMapper habits:
    polygons or, with INPUT.MASK_FORMAT "bitmask", RLE too). Crowd annotations are dropped:
    DETR's set loss has no notion of "ignore". Boxes that are degenerate, or that the crop
    left empty, are dropped too; an image without any box is still returned, as the set
    loss handles it.
    """

    @configurable
    def __init__(
        self, is_train: bool, *, augmentations: List[T.Augmentation], image_format: str,
        use_instance_mask: bool = False, instance_mask_format: str = "polygon",
    ):
        """
        Args:
            is_train: whether annotations are kept and mapped.
            augmentations: applied in order to the image and its boxes.
            image_format: an image format supported by :func:`detection_utils.read_image`.
            use_instance_mask: whether the instances carry the annotations' masks.
            instance_mask_format: "polygon" or "bitmask", as detectron2's.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.use_instance_mask = use_instance_mask
        self.instance_mask_format = instance_mask_format
        mode = "training" if is_train else "inference"
        logging.getLogger(__name__).info(
            f"[DetrDatasetMapper] Augmentations used in {mode}: {augmentations}"
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "augmentations": build_detr_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "use_instance_mask": cfg.MODEL.MASK_ON,
            "instance_mask_format": cfg.INPUT.MASK_FORMAT,
        }

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)  # it will be modified below
        image = self._read_image(dataset_dict)
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # h, w
        # Pytorch's dataloader is efficient on torch.Tensor due to shared-memory,
        # but not efficient on large generic data structures due to the use of pickle.
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        annos = dataset_dict.pop("annotations", None)
        segments_info = dataset_dict.pop("segments_info", None)
        if not self.is_train:
            # Evaluation compares against the dataset's own files, not these.
            return dataset_dict
        if segments_info is not None and annos is None:
            dataset_dict["instances"] = self._panoptic_instances(dataset_dict, segments_info, transforms, image_shape)
        elif annos is not None:
            dataset_dict["instances"] = self._annotations_to_instances(annos, transforms, image_shape)
        return dataset_dict

    def _panoptic_instances(self, dataset_dict, segments_info, transforms, image_shape) -> Instances:
        """
        A panoptic record's segments (detectron2's panoptic format: the PNG of segment ids and
        `segments_info`) as instances, things and stuff alike, as DETR trains on them: each
        segment's mask through the image's transforms, its box tight around it, its class the
        contiguous `category_id`. Crowd segments and those the crop removed are dropped.
        """
        file_name = dataset_dict["pan_seg_file_name"]
        ids = panoptic_segment_ids(file_name)
        height, width = dataset_dict.get("height", ids.shape[0]), dataset_dict.get("width", ids.shape[1])
        if ids.shape != (height, width):
            raise ValueError(f"{file_name}: a PNG of {ids.shape[1]}x{ids.shape[0]}, but its image is {width}x{height}")
        present = set(np.unique(ids).tolist()) - {0}
        listed = {segment["id"] for segment in segments_info}
        if present - listed:
            raise ValueError(f"{file_name}: segment id {min(present - listed)} is in the PNG but not in its segments_info")
        if listed - present:
            raise ValueError(f"{file_name}: segment id {min(listed - present)} of its segments_info is not in the PNG")
        # as floats, which torch's nearest resizing takes and which hold every id exactly
        ids = np.rint(transforms.apply_segmentation(ids.astype(np.float64))).astype(np.int64)
        segments = [s for s in segments_info if not s.get("iscrowd", 0)]
        masks = torch.as_tensor(np.stack([ids == s["id"] for s in segments]) if segments else np.zeros((0, *image_shape), bool))
        keep = masks.flatten(1).any(1)
        masks = masks[keep]
        instances = Instances(image_shape)
        instances.gt_boxes = BitMasks(masks).get_bounding_boxes()
        instances.gt_classes = torch.as_tensor([s["category_id"] for s in segments], dtype=torch.int64)[keep]
        if self.use_instance_mask:
            instances.gt_masks = BitMasks(masks)
        return instances

    def _masks(self, annos, transforms, image_shape):
        """The annotations' masks through the same transforms, as detectron2's mapper gives them."""
        annos = [utils.transform_instance_annotations(obj, transforms, image_shape) for obj in annos]
        for obj in annos:  # a decoded RLE is read-only, which torch warns of
            if isinstance(obj["segmentation"], np.ndarray):
                obj["segmentation"] = np.array(obj["segmentation"])
        try:
            return utils.annotations_to_instances(annos, image_shape, self.instance_mask_format).gt_masks
        except ValueError as e:
            raise ValueError(
                f"the annotations' masks are not of INPUT.MASK_FORMAT {self.instance_mask_format!r} (RLE masks "
                f"need 'bitmask'): {e}"
            ) from e

    def _read_image(self, dataset_dict) -> np.ndarray:
        file_name = dataset_dict["file_name"]
        try:
            # PIL converts grayscale, palette and RGBA files to the requested format.
            return utils.read_image(file_name, format=self.image_format)
        except Exception as e:
            # Errors of truncated or corrupt files often do not say which file it was.
            raise OSError(f"Cannot read image {file_name!r}: {type(e).__name__}: {e}") from e

    def _annotations_to_instances(self, annos, transforms, image_shape) -> Instances:
        annos = [obj for obj in annos if obj.get("iscrowd", 0) == 0]
        boxes = np.array(
            [BoxMode.convert(obj["bbox"], obj["bbox_mode"], BoxMode.XYXY_ABS) for obj in annos],
            dtype=np.float64,
        ).reshape(-1, 4)
        classes = np.array([int(obj["category_id"]) for obj in annos], dtype=np.int64)
        # Dropped before the transforms, which would turn an inverted box into a valid one.
        valid = (
            np.isfinite(boxes).all(axis=1)
            & (boxes[:, 2] > boxes[:, 0])
            & (boxes[:, 3] > boxes[:, 1])
        )
        boxes, classes = boxes[valid], classes[valid]
        masks = None
        if self.use_instance_mask:
            valid_annos = [obj for obj, ok in zip(annos, valid) if ok]
            if valid_annos:
                masks = self._masks(valid_annos, transforms, image_shape)
            else:
                masks = BitMasks(torch.zeros((0, *image_shape), dtype=torch.bool))
        if len(boxes):
            boxes = transforms.apply_box(boxes)

        boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
        # A crop can move a box partly or entirely out of the image: clip it, then
        # drop what has no area left, as DETR's crop does.
        boxes.clip(image_shape)
        keep = boxes.nonempty(threshold=0.0)

        instances = Instances(image_shape)
        instances.gt_boxes = boxes[keep]
        instances.gt_classes = torch.as_tensor(classes)[keep]
        if masks is not None:
            instances.gt_masks = masks[keep]
        return instances
