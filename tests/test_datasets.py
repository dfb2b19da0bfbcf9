"""COCO-format datasets from the config or the command line, and the NUM_CLASSES check."""
import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from conditional_detr.data.datasets import check_num_classes, dataset_class_names
from conditional_detr.engine import Trainer, get_config
from conditional_detr.tools import coco_subset
from conditional_detr.tools.inference import build_eval_model

from helpers.coco import write_coco_dataset
from helpers.paths import INSTANT_CONFIG
import train_net


pytestmark = pytest.mark.usefixtures("one_thread")


def coco_instances(*entries):
    return ["DATASETS.COCO_INSTANCES", repr(tuple(tuple(map(str, e)) for e in entries))]


@pytest.fixture
def mine(tmp_path):
    return write_coco_dataset(str(tmp_path / "mine"))


def test_registered_from_the_config_with_ids_mapped(mine):
    json_file, image_root = mine
    cfg = get_config(INSTANT_CONFIG, coco_instances(("mine_cfg", json_file, image_root)))
    assert cfg.DATASETS.COCO_INSTANCES == (("mine_cfg", json_file, image_root),)
    # the class names are known before the data is loaded: the sorted ids are 3, 7, 11
    assert dataset_class_names("mine_cfg") == ["car", "dog", "person"]
    dicts = DatasetCatalog.get("mine_cfg")
    assert len(dicts) == 4 and dicts[0]["file_name"] == os.path.join(image_root, "000.png")
    assert sorted(a["category_id"] for a in dicts[0]["annotations"]) == [0, 1, 2]
    metadata = MetadataCatalog.get("mine_cfg")
    assert metadata.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 11: 2}
    assert metadata.evaluator_type == "coco" and metadata.json_file == json_file


def test_registered_from_the_command_line(mine, tmp_path):
    json_file, image_root = mine
    args = train_net.argument_parser().parse_args(
        ["--config-file", INSTANT_CONFIG, "--coco-dataset", "mine_cli", json_file, image_root,
         "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.DEVICE", "cpu"]
    )
    cfg = train_net.setup(args)
    assert cfg.DATASETS.COCO_INSTANCES == (("mine_cli", json_file, image_root),)
    assert len(DatasetCatalog.get("mine_cli")) == 4
    # the saved config registers it again, e.g. for tools/demo --config-file output/config.yaml
    DatasetCatalog.remove("mine_cli")
    MetadataCatalog.remove("mine_cli")
    get_config(str(tmp_path / "out" / "config.yaml"))
    assert dataset_class_names("mine_cli") == ["car", "dog", "person"]


def test_evaluation_reports_the_dataset_class_names(mine, tmp_path):
    json_file, image_root = mine
    cfg = get_config(
        INSTANT_CONFIG,
        coco_instances(("mine_eval", json_file, image_root))
        + ["DATASETS.TEST", "('mine_eval',)", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path),
           "MODEL.DETR.NUM_CLASSES", "3"],
    )
    results = Trainer.test(cfg, build_eval_model(cfg))["bbox"]
    assert {"AP-car", "AP-dog", "AP-person"} <= set(results)
    with open(tmp_path / "inference" / "coco_instances_results.json") as f:
        detections = json.load(f)
    # detections carry the file's own category ids
    assert detections and {d["category_id"] for d in detections} <= {3, 7, 11}


def test_num_classes_mismatch_stops_before_training(mine, tmp_path):
    json_file, image_root = mine
    cfg = get_config(
        INSTANT_CONFIG,
        coco_instances(("mine_wrong", json_file, image_root))
        + ["DATASETS.TRAIN", "('mine_wrong',)", "DATASETS.TEST", "()", "MODEL.DEVICE", "cpu",
           "OUTPUT_DIR", str(tmp_path)],
    )
    with pytest.raises(ValueError, match=r"NUM_CLASSES is 5 but dataset 'mine_wrong' has 3 categories \(car, dog, person\)"):
        Trainer(cfg)


def test_check_passes_for_the_right_count_and_unknown_datasets(mine):
    json_file, image_root = mine
    cfg = get_config(INSTANT_CONFIG, coco_instances(("mine_ok", json_file, image_root)))
    cfg.MODEL.DETR.NUM_CLASSES = 3
    check_num_classes(cfg, ["mine_ok", "a_dataset_without_metadata"])


def test_missing_files_are_named_with_the_key(mine, tmp_path):
    json_file, image_root = mine
    get_config(opts=coco_instances(("no_json", tmp_path / "nope.json", image_root), ("no_images", json_file, tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match=r"DATASETS.COCO_INSTANCES: annotation file .*nope\.json of dataset 'no_json'"):
        DatasetCatalog.get("no_json")
    with pytest.raises(FileNotFoundError, match=r"DATASETS.COCO_INSTANCES: image folder .*nope of dataset 'no_images'"):
        DatasetCatalog.get("no_images")


def test_json_without_categories(tmp_path):
    json_file = tmp_path / "empty.json"
    json_file.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    get_config(opts=coco_instances(("no_categories", json_file, tmp_path)))
    with pytest.raises(ValueError, match=r"empty\.json \(dataset 'no_categories'\) has no 'categories'"):
        DatasetCatalog.get("no_categories")


@pytest.mark.parametrize("entry", [("only_a_name",), ("a", "", "b"), "a,b,c"])
def test_malformed_entries(entry):
    with pytest.raises(ValueError, match=r"DATASETS.COCO_INSTANCES entries must be \(name, json_file, image_root\)"):
        get_config(opts=["DATASETS.COCO_INSTANCES", repr((entry,))])


def test_builtin_names_are_not_replaced(mine):
    json_file, image_root = mine
    with pytest.raises(ValueError, match=r"'coco_2017_val' is already taken"):
        get_config(opts=coco_instances(("coco_2017_val", json_file, image_root)))


def test_registering_again_replaces(mine, tmp_path):
    json_file, image_root = mine
    other_json, other_root = write_coco_dataset(str(tmp_path / "other"), num_images=2, categories=({"id": 1, "name": "cat"},))
    get_config(opts=coco_instances(("mine_again", json_file, image_root)))
    get_config(opts=coco_instances(("mine_again", other_json, other_root)))
    assert dataset_class_names("mine_again") == ["cat"]
    assert len(DatasetCatalog.get("mine_again")) == 2


def test_coco_subset_keeps_ids_and_renames(mine, tmp_path):
    json_file, _ = mine
    destination = tmp_path / "subset.json"
    subset = coco_subset.main([json_file, str(destination), "--categories", "person", "dog=puppy", "--max-images", "3"])
    assert [(c["id"], c["name"]) for c in subset["categories"]] == [(7, "puppy"), (11, "person")]
    assert len(subset["images"]) == 3 and len(subset["annotations"]) == 6
    assert json.loads(destination.read_text()) == subset
    with pytest.raises(ValueError, match=r"category 'cow' is not in the file"):
        coco_subset.main([json_file, str(destination), "--categories", "cow"])
