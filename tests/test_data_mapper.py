"""
The dataset mapper: DETR's augmentation and resizing, boxes that follow the image, and
unreadable images named.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.structures import BoxMode

from conditional_detr.data.dataset_mapper import DetrDatasetMapper
from conditional_detr.engine import get_config

from helpers.paths import BASE_CONFIG


def make_cfg(*opts):
    return get_config(BASE_CONFIG, list(opts))


def write_image(path, array, mode=None):
    Image.fromarray(array, mode).save(path)
    return str(path)


def dataset_dict(file_name, height, width, annotations=None):
    d = {"file_name": file_name, "height": height, "width": width, "image_id": 1}
    if annotations is not None:
        d["annotations"] = annotations
    return d


def ann(bbox, category_id=0, iscrowd=0):
    return {
        "bbox": list(bbox),
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": category_id,
        "iscrowd": iscrowd,
    }


@pytest.fixture
def rgb_file(tmp_path):
    rng = np.random.default_rng(0)
    return write_image(tmp_path / "rgb.png", rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))


def test_test_time_resize(rgb_file):
    mapper = DetrDatasetMapper(make_cfg(), is_train=False)
    out = mapper(dataset_dict(rgb_file, 120, 160, [ann((10, 10, 20, 20))]))
    # shortest edge 800, longest 800 * 160 / 120 = 1067 <= 1333
    assert out["image"].shape == (3, 800, 1067)
    assert out["image"].dtype == torch.uint8
    assert "instances" not in out and "annotations" not in out


def test_test_time_longest_edge_cap(tmp_path):
    path = write_image(tmp_path / "wide.png", np.zeros((100, 400, 3), np.uint8))
    out = DetrDatasetMapper(make_cfg(), is_train=False)(dataset_dict(path, 100, 400))
    assert out["image"].shape == (3, 333, 1333)


def test_train_multiscale_resize_scales_boxes(rgb_file):
    cfg = make_cfg("INPUT.RANDOM_FLIP", "none", "INPUT.CROP.ENABLED", False)
    mapper = DetrDatasetMapper(cfg, is_train=True)
    seen = set()
    for _ in range(30):
        out = mapper(dataset_dict(rgb_file, 120, 160, [ann((16, 12, 40, 24), category_id=3)]))
        _, h, w = out["image"].shape
        assert h in cfg.INPUT.MIN_SIZE_TRAIN and w <= cfg.INPUT.MAX_SIZE_TRAIN
        seen.add(h)
        inst = out["instances"]
        assert inst.image_size == (h, w)
        assert inst.gt_classes.tolist() == [3]
        s = h / 120
        expected = torch.tensor([[16 * s, 12 * s, 56 * s, 36 * s]])
        assert torch.allclose(inst.gt_boxes.tensor, expected, atol=1.0)
    assert len(seen) > 1, "the shortest edge should be drawn from several scales"


def _white_box_image(tmp_path, h, w, box):
    img = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 255
    return write_image(tmp_path / "box.png", img)


def test_augmented_boxes_follow_the_image(tmp_path):
    """Under flip + resize + crop + resize, the box must stay on the object it marks."""
    cfg = make_cfg(
        "INPUT.CROP.PROB",
        1.0,
        "INPUT.MIN_SIZE_TRAIN",
        "(64, 80, 96)",
        "INPUT.MAX_SIZE_TRAIN",
        1000,
        "INPUT.CROP.RESIZE_BEFORE_CROP",
        "(100, 120)",
        "INPUT.CROP.SIZE",
        "(40, 90)",
    )
    box = (30, 20, 90, 70)
    path = _white_box_image(tmp_path, 100, 140, box)
    mapper = DetrDatasetMapper(cfg, is_train=True)
    kept = dropped = 0
    for seed in range(40):
        np.random.seed(seed)
        out = mapper(dataset_dict(path, 100, 140, [ann((30, 20, 60, 50))]))
        image = out["image"].numpy()
        _, h, w = image.shape
        assert min(h, w) in (64, 80, 96)
        boxes = out["instances"].gt_boxes.tensor
        white = np.argwhere(image.min(0) > 127)
        if len(boxes) == 0:
            dropped += 1
            # Only interpolation fringes of the object may remain in the image.
            assert len(white) < 0.01 * h * w
            continue
        kept += 1
        assert len(boxes) == 1
        x0, y0, x1, y1 = boxes[0].tolist()
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        (wy0, wx0), (wy1, wx1) = white.min(0), white.max(0) + 1
        # Tolerance: bilinear resizing blurs the edges by a pixel or two.
        assert np.allclose([x0, y0, x1, y1], [wx0, wy0, wx1, wy1], atol=3.0), (
            seed,
            boxes,
            (wx0, wy0, wx1, wy1),
        )
    assert kept > 0


def test_degenerate_and_crowd_boxes_are_dropped(rgb_file):
    cfg = make_cfg(
        "INPUT.RANDOM_FLIP", "none", "INPUT.CROP.ENABLED", False, "INPUT.MIN_SIZE_TRAIN", "(120,)"
    )
    annotations = [
        ann((10, 10, 20, 20), category_id=1),  # kept
        ann((10, 10, 0, 20), category_id=2),  # zero width
        ann((10, 10, 20, 0), category_id=2),  # zero height
        ann((50, 50, -10, 10), category_id=2),  # negative width
        ann((200, 10, 30, 30), category_id=2),  # entirely right of the image
        ann((-50, -50, 20, 20), category_id=2),  # entirely above-left of the image
        ann((10, 10, 20, 20), category_id=2, iscrowd=1),  # crowd
        ann((150, 100, 40, 40), category_id=4),  # partly outside: clipped, kept
    ]
    out = DetrDatasetMapper(cfg, is_train=True)(dataset_dict(rgb_file, 120, 160, annotations))
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [1, 4]
    assert inst.gt_boxes.tensor.tolist() == [[10, 10, 30, 30], [150, 100, 160, 120]]


def test_image_without_annotations_is_kept(rgb_file):
    mapper = DetrDatasetMapper(make_cfg(), is_train=True)
    out = mapper(dataset_dict(rgb_file, 120, 160, []))
    inst = out["instances"]
    assert len(inst) == 0
    assert inst.gt_boxes.tensor.shape == (0, 4)
    assert inst.gt_classes.dtype == torch.int64
    assert inst.image_size == tuple(out["image"].shape[1:])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_images_are_converted(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    path = str(tmp_path / f"image_{mode}.png")
    Image.fromarray(rgb).convert(mode).save(path)
    mapper = DetrDatasetMapper(make_cfg("INPUT.MIN_SIZE_TEST", 0), is_train=False)
    image = mapper(dataset_dict(path, 40, 60))["image"]
    assert image.shape == (3, 40, 60) and image.dtype == torch.uint8
    expected = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(image.numpy(), expected)
    if mode == "L":
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_bgr_format(rgb_file):
    rgb = DetrDatasetMapper(make_cfg("INPUT.MIN_SIZE_TEST", 0), is_train=False)(
        dataset_dict(rgb_file, 120, 160)
    )
    bgr = DetrDatasetMapper(
        make_cfg("INPUT.MIN_SIZE_TEST", 0, "INPUT.FORMAT", "BGR"), is_train=False
    )(dataset_dict(rgb_file, 120, 160))
    assert torch.equal(rgb["image"], bgr["image"].flip(0))


@pytest.mark.parametrize("content", [b"this is not an image", None])
def test_unreadable_image_names_the_file(tmp_path, content):
    path = tmp_path / "broken_image_0042.jpg"
    if content is not None:
        path.write_bytes(content)
    mapper = DetrDatasetMapper(make_cfg(), is_train=True)
    with pytest.raises(OSError, match="broken_image_0042.jpg"):
        mapper(dataset_dict(str(path), 10, 10, [ann((1, 1, 5, 5))]))


def test_truncated_image_names_the_file(tmp_path, rgb_file):
    data = open(rgb_file, "rb").read()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    mapper = DetrDatasetMapper(make_cfg(), is_train=True)
    with pytest.raises(OSError, match="truncated.png"):
        mapper(dataset_dict(str(path), 120, 160, [ann((1, 1, 5, 5))]))


def test_size_mismatch_with_dataset_is_reported(rgb_file):
    mapper = DetrDatasetMapper(make_cfg(), is_train=True)
    with pytest.raises(Exception, match="rgb.png"):
        mapper(dataset_dict(rgb_file, 50, 50, []))


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_masks_follow_the_image_with_mask_on(tmp_path, mask_format):
    """Under flip + resize + crop + resize, each instance's mask stays on the object, as its box does."""
    import pycocotools.mask as mask_util

    cfg = make_cfg(
        "MODEL.MASK_ON", True, "INPUT.MASK_FORMAT", mask_format, "INPUT.CROP.PROB", 1.0,
        "INPUT.MIN_SIZE_TRAIN", "(64, 80, 96)", "INPUT.MAX_SIZE_TRAIN", 1000,
        "INPUT.CROP.RESIZE_BEFORE_CROP", "(100, 120)", "INPUT.CROP.SIZE", "(40, 90)",
    )
    box = (30, 20, 90, 70)
    path = _white_box_image(tmp_path, 100, 140, box)
    annotation = ann((30, 20, 60, 50))
    if mask_format == "polygon":
        annotation["segmentation"] = [[30, 20, 90, 20, 90, 70, 30, 70]]
    else:  # RLE, as the shapes dataset stores its masks
        full = np.zeros((100, 140), dtype=np.uint8, order="F")
        full[20:70, 30:90] = 1
        annotation["segmentation"] = mask_util.encode(full)
    mapper = DetrDatasetMapper(cfg, is_train=True)
    kept = 0
    for seed in range(20):
        np.random.seed(seed)
        out = mapper(dataset_dict(path, 100, 140, [dict(annotation)]))
        instances = out["instances"]
        assert len(instances.gt_masks) == len(instances.gt_boxes)
        if not len(instances):
            continue
        kept += 1
        masks = instances.gt_masks
        masks = masks.tensor if hasattr(masks, "tensor") else torch.as_tensor(
            np.stack([mask_util.decode(mask_util.merge(mask_util.frPyObjects(p, *out["image"].shape[1:]))) for p in masks.polygons])
        )
        assert masks.shape[1:] == out["image"].shape[1:]
        white = out["image"].numpy().min(0) > 127
        inside = masks[0].numpy().astype(bool)
        assert (inside & white).sum() >= 0.9 * inside.sum()  # the mask lies on the object
    assert kept > 0


def panoptic_record(tmp_path, ids, segments_info):
    """A record of detectron2's panoptic format: its image, the PNG of segment ids, the segments."""
    ids = np.asarray(ids)
    image = write_image(tmp_path / "image.png", np.full((*ids.shape, 3), 128, np.uint8))
    png = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(png).save(tmp_path / "segments.png")
    return {
        "file_name": image, "height": ids.shape[0], "width": ids.shape[1], "image_id": 1,
        "pan_seg_file_name": str(tmp_path / "segments.png"), "segments_info": segments_info,
    }


def plain_training_cfg(*opts):
    """Training without flip, crop or resize: the instances are the record's as they are."""
    return make_cfg("INPUT.RANDOM_FLIP", "none", "INPUT.CROP.ENABLED", False, "INPUT.MIN_SIZE_TRAIN", "(64,)",
                    "INPUT.MAX_SIZE_TRAIN", 1000, *opts)


def test_panoptic_records_give_every_segment_as_an_instance(tmp_path):
    ids = np.zeros((64, 96), dtype=np.int64)
    ids[:32] = 7  # a stuff region, the top half
    ids[40:60, 10:30] = 300  # a thing (an id above 255: the PNG's G channel)
    ids[40:50, 50:70] = 9  # a crowd region
    record = panoptic_record(tmp_path, ids, [
        {"id": 7, "category_id": 90, "isthing": False, "iscrowd": 0},
        {"id": 300, "category_id": 3, "isthing": True, "iscrowd": 0},
        {"id": 9, "category_id": 0, "isthing": True, "iscrowd": 1},
    ])
    instances = DetrDatasetMapper(plain_training_cfg("MODEL.MASK_ON", True), is_train=True)(record)["instances"]
    assert instances.gt_classes.tolist() == [90, 3]  # the crowd region left out, stuff and things alike
    assert instances.gt_boxes.tensor.tolist() == [[0, 0, 96, 32], [10, 40, 30, 60]]
    assert torch.equal(instances.gt_masks.tensor[0], torch.as_tensor(ids == 7))
    assert torch.equal(instances.gt_masks.tensor[1], torch.as_tensor(ids == 300))
    # the box stage of the recipe: boxes, no masks
    boxes_only = DetrDatasetMapper(plain_training_cfg(), is_train=True)(record)["instances"]
    assert not boxes_only.has("gt_masks") and len(boxes_only) == 2


@pytest.mark.parametrize("png_ids, listed, error", [
    ((7, 8), (7,), "segment id 8 is in the PNG but not in its segments_info"),
    ((7,), (7, 8), "segment id 8 of its segments_info is not in the PNG"),
])
def test_a_png_and_segments_that_disagree_are_named(tmp_path, png_ids, listed, error):
    ids = np.zeros((64, 96), dtype=np.int64)
    for i, segment_id in enumerate(png_ids):
        ids[i * 10 : i * 10 + 5] = segment_id
    record = panoptic_record(tmp_path, ids, [{"id": i, "category_id": 1, "iscrowd": 0} for i in listed])
    with pytest.raises(ValueError, match=f"segments.png: {error}"):
        DetrDatasetMapper(plain_training_cfg(), is_train=True)(record)
