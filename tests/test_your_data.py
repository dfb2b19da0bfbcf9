"""
The README's "Your own data" route end to end, on tiny data: a part of the embedded
shapes dataset becomes "your data" (tools/coco_subset), is registered from the command
line, a checkpoint trained on other classes is fine-tuned on it with each class-head
behaviour, evaluated, and its predictions drawn.
"""
import json
import math
import os

import pytest
import torch
from detectron2.data import DatasetCatalog

from conditional_detr.data.shapes import ShapesParams, register_shapes_datasets
from conditional_detr.tools import coco_subset, demo

from helpers.paths import INSTANT_CONFIG
import train_net

SHAPES = ["circle", "rectangle", "triangle", "star", "cross"]
FOCAL_PRIOR = -math.log((1 - 0.01) / 0.01)

pytestmark = pytest.mark.usefixtures("one_thread")


def run_train_net(*argv):
    args = train_net.argument_parser().parse_args(["--config-file", INSTANT_CONFIG, *map(str, argv)])
    return train_net.main(args)


@pytest.fixture(scope="module")
def route(module_folder):
    """A checkpoint trained on the 5 shapes, and "your data": circle, rectangle as "box", star."""
    root = module_folder("your_data")
    register_shapes_datasets(
        root=str(root / "shapes"), params=ShapesParams(image_size=(64, 64), num_train=8, num_val=4, object_size=(12, 40), max_objects=3)
    )
    yours = {}
    for split in ("train", "val"):
        dicts = DatasetCatalog.get(f"shapes_{split}")
        image_root = os.path.dirname(dicts[0]["file_name"])
        source_json = os.path.join(os.path.dirname(image_root), "annotations.json")
        json_file = str(root / f"mine_{split}.json")
        coco_subset.main([source_json, json_file, "--categories", "circle", "rectangle=box", "star"])
        yours[split] = (json_file, image_root)

    pretrained = root / "pretrained"
    run_train_net("OUTPUT_DIR", pretrained, "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", "(1,)", "DATASETS.TEST", "()")
    source = torch.load(pretrained / "model_final.pth", weights_only=False)
    assert source["class_names"] == SHAPES
    return root, yours, str(pretrained / "model_final.pth"), source["model"]


def fine_tune(route, name, behaviour):
    root, yours, weights, _ = route
    out = root / name
    run_train_net(
        "--coco-dataset", "mine_train", *yours["train"], "--coco-dataset", "mine_val", *yours["val"],
        "OUTPUT_DIR", out, "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('mine_train',)", "DATASETS.TEST", "('mine_val',)",
        "MODEL.DETR.NUM_CLASSES", 3, "MODEL.WEIGHTS", weights,
        "MODEL.WEIGHTS_CLASS_HEAD", behaviour, "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", "(1,)",
    )
    final = torch.load(out / "model_final.pth", weights_only=False)
    return out, final, open(out / "log.txt").read()


def close(a, b, atol=1e-3):
    return torch.allclose(a, b, atol=atol, rtol=0)  # two AdamW steps at 1e-4 move a weight by about 2e-4


@pytest.mark.slow
def test_keep_stops_and_names_the_switch(route):
    with pytest.raises(ValueError, match=r"model_final\.pth: .* 5 classes but .*NUM_CLASSES is 3.*WEIGHTS_CLASS_HEAD"):
        fine_tune(route, "keep", "keep")


@pytest.mark.slow
def test_reinit_then_evaluate(route):
    _, _, _, source = route
    out, final, log = fine_tune(route, "reinit", "reinit")
    assert "re-initialized the class head" in log
    model = final["model"]
    assert close(model["class_embed.bias"], torch.full((3,), FOCAL_PRIOR))
    assert close(model["backbone.stem.conv1.weight"], source["backbone.stem.conv1.weight"])
    assert final["class_names"] == ["circle", "box", "star"]  # the json's id order: 1, 2, 4


@pytest.mark.slow
def test_match_names_then_evaluate_and_draw(route):
    root, yours, _, source = route
    out, final, log = fine_tune(route, "match_names", "match_names")
    assert "kept the class-head rows of 2 of 3 classes by name (circle, star); initialized 1 (box)" in log
    model = final["model"]
    for key in ("class_embed.weight", "class_embed.bias"):
        assert close(model[key][0], source[key][0]) and close(model[key][2], source[key][3])
    assert close(model["class_embed.bias"][1:2], torch.tensor([FOCAL_PRIOR]))
    assert not close(model["class_embed.weight"][1], source["class_embed.weight"][1])

    # evaluate the fine-tuned model with the saved config (its datasets registered from it)
    config = str(out / "config.yaml")
    args = train_net.argument_parser().parse_args(
        ["--config-file", config, "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth"), "OUTPUT_DIR", str(root / "eval")]
    )
    results = train_net.main(args)["bbox"]
    assert {"AP-circle", "AP-box", "AP-star"} <= set(results)
    with open(root / "eval" / "inference" / "coco_instances_results.json") as f:
        assert {d["category_id"] for d in json.load(f)} <= {1, 2, 4}  # the json's own ids

    summary = demo.main(
        ["--config-file", config, "--input", yours["val"][1], "--output", str(root / "drawn"),
         "--confidence-threshold", "0.0", "MODEL.WEIGHTS", str(out / "model_final.pth")]
    )
    assert len(summary) == 4 and all(os.path.isfile(e["output"]) for e in summary)
    assert set(summary[0]["classes"]) <= {"circle", "box", "star"}
