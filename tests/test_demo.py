"""tools/demo: drawings and predictions of a tiny model, inputs given as files or folders."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conditional_detr.engine import get_config
from conditional_detr.tools import demo
from conditional_detr.tools.inference import build_eval_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTANT_CONFIG = os.path.join(
    REPO, "configs", "quick_schedules", "conditional_detr_instant_test.yaml"
)


pytestmark = pytest.mark.usefixtures("one_thread")


def write_image(path, size=(48, 72), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = get_config(INSTANT_CONFIG, ["MODEL.DEVICE", "cpu"])
    model = build_eval_model(cfg)
    path = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict()}, path)
    return cfg, model, path


def run_demo(inputs, output, *extra):
    return demo.main(
        [
            "--config-file",
            INSTANT_CONFIG,
            "--input",
            *inputs,
            "--output",
            str(output),
            *extra,
            "MODEL.DEVICE",
            "cpu",
        ]
    )


def test_draws_the_checkpoint_predictions(tmp_path, checkpoint):
    cfg, model, weights = checkpoint
    image = write_image(tmp_path / "photo.jpg")
    summary = run_demo(
        [image], tmp_path / "out", "--confidence-threshold", "0.0", "MODEL.WEIGHTS", weights
    )
    drawn = tmp_path / "out" / "photo.jpg"
    assert Image.open(drawn).size == (72, 48)
    (entry,) = summary
    assert entry["output"] == str(drawn)
    expected = demo.predict(cfg, model, np.asarray(Image.open(image)))
    assert entry["scores"] == pytest.approx(expected.scores.tolist(), abs=1e-6)
    # the instant config's dataset is the embedded shapes one: its class names are drawn
    assert set(entry["classes"]) <= {"circle", "rectangle", "triangle", "star", "cross"}
    with open(tmp_path / "out" / "predictions.json") as f:
        assert json.load(f) == summary


def test_folder_input_and_threshold(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "b.png", seed=1)
    write_image(folder / "a.jpeg", seed=2)
    (folder / "notes.txt").write_text("not an image")
    summary = run_demo([str(folder)], tmp_path / "out", "--confidence-threshold", "1.0")
    assert [os.path.basename(e["output"]) for e in summary] == ["a.jpeg", "b.png"]
    assert all(os.path.isfile(e["output"]) for e in summary)
    assert all(e["scores"] == [] for e in summary)


def test_missing_input_is_named(tmp_path):
    missing = str(tmp_path / "nowhere.jpg")
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        run_demo([missing], tmp_path / "out")


def test_empty_folder_is_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*has no images"):
        run_demo([str(empty)], tmp_path / "out")


def test_bad_threshold():
    with pytest.raises(SystemExit):
        demo.parse_args(
            ["--config-file", "x", "--input", "x", "--output", "y", "--confidence-threshold", "2"]
        )
