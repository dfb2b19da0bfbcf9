"""
Panoptic evaluation: detectron2's COCOPanopticEvaluator, chosen from the dataset's evaluator
type, with the panopticapi the project installs, gives the PQ computed by hand on two
crafted 8x8 images.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator, DatasetEvaluators
from PIL import Image

from conditional_detr.engine import Trainer, get_config

THING, STUFF = 1, 2  # dataset category ids; contiguous 0 and 1


def rgb(segment_ids):
    """A panoptic PNG's pixels: id = R + 256 G + 256^2 B."""
    ids = np.asarray(segment_ids, dtype=np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], -1).astype(np.uint8)


def segments(*entries):
    return [{"id": i, "category_id": c, "iscrowd": 0, "area": a} for i, c, a in entries]


@pytest.fixture
def panoptic_dataset(tmp_path):
    """
    Image 1: a thing (ids 1, the top-left 4x4) and a stuff region (id 2, the rest). Image 2:
    the thing again, a stuff region on the bottom half (id 2) and void on the top right.
    """
    first = np.full((8, 8), 2)
    first[:4, :4] = 1
    second = np.zeros((8, 8), dtype=int)
    second[:4, :4] = 1
    second[4:] = 2
    root = tmp_path / "panoptic"
    root.mkdir()
    annotations = []
    for image_id, ids in ((1, first), (2, second)):
        Image.fromarray(rgb(ids)).save(root / f"{image_id:03d}.png")
        areas = {i: int((ids == i).sum()) for i in (1, 2)}
        annotations.append({
            "image_id": image_id, "file_name": f"{image_id:03d}.png",
            "segments_info": segments((1, THING, areas[1]), (2, STUFF, areas[2])),
        })
    gt = {
        "images": [{"id": i, "file_name": f"{i:03d}.jpg", "height": 8, "width": 8} for i in (1, 2)],
        "annotations": annotations,
        "categories": [
            {"id": THING, "name": "thing", "isthing": 1, "supercategory": "x"},
            {"id": STUFF, "name": "stuff", "isthing": 0, "supercategory": "x"},
        ],
    }
    (tmp_path / "panoptic.json").write_text(json.dumps(gt))
    # the things' instances, which COCOEvaluator reads
    instances = {"images": gt["images"], "annotations": [], "categories": gt["categories"][:1]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    name = f"crafted_panoptic_{tmp_path.name}"
    MetadataCatalog.get(name).set(
        panoptic_root=str(root), panoptic_json=str(tmp_path / "panoptic.json"), evaluator_type="coco_panoptic_seg",
        thing_dataset_id_to_contiguous_id={THING: 0}, stuff_dataset_id_to_contiguous_id={STUFF: 1},
        thing_classes=["thing", "stuff"], stuff_classes=["thing", "stuff"], json_file=str(tmp_path / "instances.json"),
    )
    yield name
    MetadataCatalog.remove(name)


def prediction(ids, infos):
    return {"panoptic_seg": (torch.as_tensor(ids, dtype=torch.int32), infos)}


def test_pq_is_the_hand_computed_one(panoptic_dataset, tmp_path):
    evaluator = COCOPanopticEvaluator(panoptic_dataset, str(tmp_path / "out"))
    evaluator.reset()
    # image 1: both segments exactly (segment ids from 1, contiguous classes, as the model gives them)
    first = np.full((8, 8), 2)
    first[:4, :4] = 1
    evaluator.process([{"file_name": "001.jpg", "image_id": 1}], [prediction(first, [
        {"id": 1, "category_id": 0, "isthing": True}, {"id": 2, "category_id": 1, "isthing": False},
    ])])
    # image 2: the thing exactly; the stuff region missed, a false thing on its right half
    second = np.zeros((8, 8), dtype=int)
    second[:4, :4] = 1
    second[4:, 4:] = 2
    evaluator.process([{"file_name": "002.jpg", "image_id": 2}], [prediction(second, [
        {"id": 1, "category_id": 0, "isthing": True}, {"id": 2, "category_id": 0, "isthing": True},
    ])])
    results = evaluator.evaluate()["panoptic_seg"]
    # things: 2 true positives of IoU 1, 1 false positive: SQ 1, RQ 2 / (2 + 1/2) = 0.8
    # stuff: 1 true positive of IoU 1, 1 false negative: SQ 1, RQ 1 / (1 + 1/2) = 2/3
    assert results["PQ_th"] == pytest.approx(80.0)
    assert results["PQ_st"] == pytest.approx(200 / 3)
    assert results["PQ"] == pytest.approx((80.0 + 200 / 3) / 2)
    assert results["SQ"] == pytest.approx(100.0)
    assert results["RQ"] == pytest.approx((80.0 + 200 / 3) / 2)


def test_a_panoptic_dataset_is_evaluated_as_panoptic(panoptic_dataset, tmp_path):
    cfg = get_config(opts=["MODEL.MASK_ON", True, "MODEL.DETR.PANOPTIC_ON", True, "OUTPUT_DIR", str(tmp_path)])
    evaluator = Trainer.build_evaluator(cfg, panoptic_dataset)
    assert isinstance(evaluator, DatasetEvaluators)
    assert any(isinstance(e, COCOPanopticEvaluator) for e in evaluator._evaluators)
    cfg.MODEL.DETR.PANOPTIC_ON = False
    with pytest.raises(ValueError, match=rf"dataset '{panoptic_dataset}' is evaluated as panoptic segmentation: set MODEL.MASK_ON True and MODEL.DETR.PANOPTIC_ON True"):
        Trainer.build_evaluator(cfg, panoptic_dataset)


def test_a_missing_png_or_an_unknown_category_stops_before_training(panoptic_dataset):
    from conditional_detr.data.datasets import check_panoptic_files

    metadata = MetadataCatalog.get(panoptic_dataset)
    check_panoptic_files([panoptic_dataset])  # the crafted dataset agrees with itself
    panoptic = json.load(open(metadata.panoptic_json))
    panoptic["annotations"][1]["segments_info"][1]["category_id"] = 42
    json.dump(panoptic, open(metadata.panoptic_json, "w"))
    with pytest.raises(ValueError, match=r"002.png: segment 2 has category 42, which .*panoptic.json does not list"):
        check_panoptic_files([panoptic_dataset])
    (Path(metadata.panoptic_root) / "002.png").unlink()
    with pytest.raises(ValueError, match=r"002.png, the PNG of image 2, is missing"):
        check_panoptic_files([panoptic_dataset])
