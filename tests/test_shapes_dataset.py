"""
The embedded shapes dataset: drawn deterministically and lazily, valid COCO annotations,
cached, and never left half written.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import BoxMode, Boxes, Instances

import conditional_detr.data  # noqa: F401  (registers the default datasets)
from conditional_detr.data import shapes
from conditional_detr.data.shapes import ShapesParams, register_shapes_datasets, register_shapes_panoptic_datasets

from helpers.paths import REPO

# Small enough to be drawn in well under a second, large enough to contain both
# empty and crowded images.
SMALL_KWARGS = dict(image_size=(128, 128), num_train=12, num_val=60, object_size=(12, 48))
SMALL = ShapesParams(**SMALL_KWARGS)


@pytest.fixture
def registered(tmp_path):
    """Register shapes_train / shapes_val under a temporary root; restore afterwards."""
    root = str(tmp_path / "shapes")

    def register(params=SMALL):
        register_shapes_datasets(root, params)
        return root

    register()
    yield register
    register_shapes_datasets()


def _tree_digest(path):
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(path)):
        dirnames.sort()
        for name in sorted(filenames):
            if name == "manifest.json":
                continue  # holds the generation time
            full = os.path.join(dirpath, name)
            digest.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _mtimes(path):
    return {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, files in os.walk(path)
        for f in files
    }


def _subprocess_env(tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "d2"))
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    return env


def _load_json(root, split):
    with open(os.path.join(root, split, "annotations.json")) as f:
        return json.load(f)


def test_params_validation():
    with pytest.raises(ValueError):
        ShapesParams(categories=("circle", "hexagon"))
    with pytest.raises(ValueError):
        ShapesParams(min_objects=3, max_objects=2)
    with pytest.raises(ValueError):
        ShapesParams(image_format="bmp")
    with pytest.raises(ValueError, match="stuff must be distinct names out of"):
        ShapesParams(stuff=("sky",))
    # Lists (e.g. read back from json) compare equal to the tuple defaults.
    assert (
        ShapesParams(image_size=[128, 128], categories=list(shapes.SHAPE_CATEGORIES))
        == ShapesParams()
    )
    assert 4 <= len(ShapesParams().categories) <= 5


def test_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    # Enough images for the parallel path to be taken; it must not change a byte.
    params = SMALL.replace(num_val=96)
    shapes.generate_shapes_split(params, "val", a, num_workers=1)
    shapes.generate_shapes_split(params, "val", b, num_workers=3)
    assert _tree_digest(a) == _tree_digest(b)

    c = str(tmp_path / "c")
    shapes.generate_shapes_split(params.replace(seed=1), "val", c)
    assert _tree_digest(a) != _tree_digest(c)
    # Splits are drawn from different streams.
    image_train, _ = shapes.generate_shapes_image(SMALL, "train", 0)
    image_val, _ = shapes.generate_shapes_image(SMALL, "val", 0)
    assert not np.array_equal(image_train, image_val)


def test_registration_is_lazy_and_metadata(registered):
    root = registered()
    registered()  # registering again replaces, never raises
    assert not os.path.exists(root), "registration must not generate anything"

    for split in ("train", "val"):
        name = f"shapes_{split}"
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(SMALL.categories)
        assert meta.evaluator_type == "coco"
        assert meta.json_file == os.path.join(root, split, "annotations.json")
        assert meta.image_root == os.path.join(root, split, "images")
        assert meta.thing_dataset_id_to_contiguous_id == {
            i + 1: i for i in range(len(SMALL.categories))
        }


@pytest.mark.slow
def test_import_generates_nothing(tmp_path):
    env = _subprocess_env(tmp_path)
    code = (
        "import conditional_detr.data\n"
        "from detectron2.data import MetadataCatalog\n"
        "print(MetadataCatalog.get('shapes_val').json_file)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == str(tmp_path / "d2" / "shapes" / "val" / "annotations.json")
    assert sorted(os.listdir(tmp_path)) == []


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert shapes.shapes_root() == str(tmp_path / "shapes")
    monkeypatch.delenv("DETECTRON2_DATASETS")
    monkeypatch.chdir(tmp_path)
    assert shapes.shapes_root() == str(tmp_path / "datasets" / "shapes")


def test_annotations_valid(registered):
    root = registered()
    dicts = DatasetCatalog.get("shapes_val")
    assert len(dicts) == SMALL.num_val

    coco = _load_json(root, "val")
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == SMALL.num_val
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(SMALL.categories) + 1))
    assert [c["name"] for c in coco["categories"]] == list(SMALL.categories)
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids) and min(ann_ids) >= 1

    category_ids = {c["id"] for c in coco["categories"]}
    per_image = {i: 0 for i in images}
    seen_categories = set()
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w >= 1 and h >= 1
        assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        assert max(w, h) >= SMALL.object_size[0] * 0.5
        assert 0 < ann["area"] <= w * h
        assert ann["iscrowd"] == 0
        # every annotation refers to a declared category
        assert ann["category_id"] in category_ids, ann
        seen_categories.add(ann["category_id"])
        per_image[ann["image_id"]] += 1
    counts = list(per_image.values())
    assert min(counts) == 0, "images without objects must be included"
    assert max(counts) >= SMALL.max_objects - 1
    assert max(counts) <= SMALL.max_objects
    assert seen_categories == category_ids, "every category must occur"

    for d in dicts[:5]:
        with Image.open(d["file_name"]) as img:
            assert img.size == (d["width"], d["height"]) == (128, 128)
            assert img.mode == "RGB"


def test_cache_reuse(registered, monkeypatch):
    root = registered()
    first = DatasetCatalog.get("shapes_val")
    before = _mtimes(root)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a cached split")

    monkeypatch.setattr(shapes, "generate_shapes_split", fail)
    second = DatasetCatalog.get("shapes_val")
    assert _mtimes(root) == before
    assert [d["file_name"] for d in first] == [d["file_name"] for d in second]


def test_changed_params_regenerate(registered):
    root = registered()
    DatasetCatalog.get("shapes_train")
    DatasetCatalog.get("shapes_val")
    digest_val = _tree_digest(os.path.join(root, "val"))
    train_mtimes = _mtimes(os.path.join(root, "train"))

    # The other split's size does not invalidate a split.
    registered(SMALL.replace(num_val=40))
    assert len(DatasetCatalog.get("shapes_train")) == SMALL.num_train
    assert _mtimes(os.path.join(root, "train")) == train_mtimes
    assert len(DatasetCatalog.get("shapes_val")) == 40

    registered(SMALL.replace(seed=7))
    DatasetCatalog.get("shapes_val")
    assert _tree_digest(os.path.join(root, "val")) != digest_val
    with open(os.path.join(root, "val", "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["params"]["seed"] == 7
    assert manifest["version"] == shapes.GENERATOR_VERSION

    # A manifest from another generator version is not trusted either.
    manifest["version"] = -1
    with open(os.path.join(root, "val", "manifest.json"), "w") as f:
        json.dump(manifest, f)
    DatasetCatalog.get("shapes_val")
    with open(os.path.join(root, "val", "manifest.json")) as f:
        assert json.load(f)["version"] == shapes.GENERATOR_VERSION
    # Nothing but the two splits is left in the root.
    assert sorted(os.listdir(root)) == ["train", "val"]


def test_interrupted_generation_leaves_nothing(registered, monkeypatch):
    root = registered()
    real = shapes._draw

    def crash(params, split, index):
        if index == 7:
            raise KeyboardInterrupt
        return real(params, split, index)

    monkeypatch.setattr(shapes, "_draw", crash)
    with pytest.raises(KeyboardInterrupt):
        shapes.ensure_shapes_split("val", root, SMALL, num_workers=1)
    assert os.listdir(root) == []

    monkeypatch.setattr(shapes, "_draw", real)
    assert len(DatasetCatalog.get("shapes_val")) == SMALL.num_val


@pytest.mark.slow
def test_killed_generation_leaves_no_split(tmp_path):
    root = str(tmp_path / "shapes")
    marker = tmp_path / "started"
    # A generation that stalls half way; killed hard, so no cleanup code runs.
    code = f"""
import time
from conditional_detr.data import shapes
from conditional_detr.data.shapes import ShapesParams
real = shapes._draw
def slow(params, split, index):
    if index == 10:
        open({str(marker)!r}, "w").close()
        time.sleep(60)
    return real(params, split, index)
shapes._draw = slow
shapes.ensure_shapes_split("val", {root!r}, ShapesParams(**{SMALL_KWARGS!r}), num_workers=1)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], env=_subprocess_env(tmp_path))
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "the generating process ended early"
            assert time.time() < deadline
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    leftovers = os.listdir(root)
    assert "val" not in leftovers and len(leftovers) == 1  # the temporary folder only
    assert not shapes._is_current(os.path.join(root, "val"), SMALL, "val")

    # The next load generates the split; once old enough, the leftover is removed.
    old = time.time() - 2 * shapes._LEFTOVER_AGE_S
    os.utime(os.path.join(root, leftovers[0]), (old, old))
    shapes.ensure_shapes_split("val", root, SMALL)
    assert sorted(os.listdir(root)) == ["val"]
    assert shapes._is_current(os.path.join(root, "val"), SMALL, "val")


def test_varied_image_sizes(tmp_path):
    params = SMALL.replace(image_size_jitter=0.25, num_val=10, image_format="png")
    shapes.generate_shapes_split(params, "val", str(tmp_path / "val"))
    coco = _load_json(str(tmp_path), "val")
    sizes = {(im["height"], im["width"]) for im in coco["images"]}
    assert len(sizes) > 1
    for im in coco["images"]:
        assert im["file_name"].endswith(".png")
        with Image.open(tmp_path / "val" / "images" / im["file_name"]) as img:
            assert img.size == (im["width"], im["height"])


def test_coco_evaluator_on_ground_truth(registered):
    registered()
    dicts = DatasetCatalog.get("shapes_val")
    # The pure-Python evaluation: detectron2 may be installed without its compiled ops.
    evaluator = COCOEvaluator("shapes_val", output_dir=None, distributed=False, use_fast_impl=False)
    evaluator.reset()
    for d in dicts:
        boxes = [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]
        ]
        instances = Instances((d["height"], d["width"]))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.scores = torch.ones(len(boxes))
        instances.pred_classes = torch.tensor(
            [a["category_id"] for a in d["annotations"]], dtype=torch.int64
        )
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)


def test_each_annotation_carries_its_exact_instance_mask():
    import pycocotools.mask as mask_util

    checked = 0
    for index in range(20):
        image, annotations = shapes.generate_shapes_image(SMALL, "train", index)
        covered = np.zeros(image.shape[:2], dtype=int)
        for ann in annotations:
            mask = mask_util.decode(ann["segmentation"]).astype(bool)
            assert mask.shape == image.shape[:2] and mask.sum() == ann["area"] > 0
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]  # tight around the mask: the same visible pixels
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            covered += mask
            checked += 1
        assert covered.max() <= 1  # a pixel belongs to one shape at most: occlusion is in the masks
    assert checked > 10


def test_a_cache_of_the_previous_format_is_drawn_again(registered, tmp_path):
    root = registered()
    DatasetCatalog.get("shapes_train")
    manifest_path = os.path.join(root, "train", "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["version"] = shapes.GENERATOR_VERSION - 1  # as written before the masks
    json.dump(manifest, open(manifest_path, "w"))
    records = DatasetCatalog.get("shapes_train")
    assert json.load(open(manifest_path))["version"] == shapes.GENERATOR_VERSION
    assert all("segmentation" in a for r in records for a in r["annotations"])


@pytest.fixture
def panoptic(tmp_path):
    """Register shapes_panoptic_train / _val under a temporary root; restore afterwards."""
    root = str(tmp_path / "shapes_panoptic")

    def register(params=SMALL.replace(stuff=shapes.STUFF_CATEGORIES)):
        register_shapes_panoptic_datasets(root, params)
        return root

    register()
    yield register
    register_shapes_panoptic_datasets()


def _check_panoptic_split(name, num_things, num_stuff):
    """Each record's segments are its PNG's, every pixel in one, the things those of the instances JSON."""
    from conditional_detr.data.dataset_mapper import panoptic_segment_ids
    from conditional_detr.data.datasets import check_panoptic_files

    metadata = MetadataCatalog.get(name)
    check_panoptic_files([name])
    instances = {r["image_id"]: r for r in load_coco_json(metadata.json_file, metadata.image_root)}
    assert metadata.evaluator_type == "coco_panoptic_seg"
    assert metadata.stuff_dataset_id_to_contiguous_id == {k + 1: k for k in range(num_things, num_things + num_stuff)}
    records = DatasetCatalog.get(name)
    stuff_seen = set()
    for record in records:
        ids = panoptic_segment_ids(record["pan_seg_file_name"])
        things = [s for s in record["segments_info"] if s["isthing"]]
        annotations = instances[record["image_id"]]["annotations"]
        assert [s["category_id"] + 1 for s in things] == [a["category_id"] for a in annotations]  # contiguous vs JSON ids
        for segment, annotation in zip(things, annotations):
            truth = mask_util.decode(annotation["segmentation"]).astype(bool)
            assert np.array_equal(ids == segment["id"], truth)
        for segment in record["segments_info"]:
            assert (ids == segment["id"]).sum() == segment["area"] > 0
            assert segment["isthing"] == (segment["category_id"] < num_things)
            if not segment["isthing"]:
                stuff_seen.add(segment["category_id"])
        assert set(np.unique(ids)) == {s["id"] for s in record["segments_info"]}  # every pixel in a segment
    return records, stuff_seen


def test_the_panoptic_version_has_texture_stuff_and_the_shapes_as_things(panoptic):
    root = panoptic()
    records, stuff_seen = _check_panoptic_split("shapes_panoptic_val", 5, 3)
    assert MetadataCatalog.get("shapes_panoptic_val").stuff_classes[5:] == ["gradient", "stripes", "checks"]
    assert stuff_seen == {5, 6, 7}
    per_image = [sum(not s["isthing"] for s in r["segments_info"]) for r in records]
    assert max(per_image) == 3 and min(per_image) == 1
    assert os.path.isdir(os.path.join(root, "val", "panoptic"))


def test_without_stuff_the_background_is_one_stuff_class(panoptic):
    panoptic(SMALL)
    _, stuff_seen = _check_panoptic_split("shapes_panoptic_val", 5, 1)
    assert MetadataCatalog.get("shapes_panoptic_val").stuff_classes[-1] == "background"
    assert stuff_seen == {5}
