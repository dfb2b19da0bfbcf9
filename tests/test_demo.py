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

from helpers.paths import INSTANT_CONFIG
from helpers.training import PANOPTIC_NUM_CLASSES


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


def write_video(path, frames=5, size=(48, 64)):
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (size[1], size[0]))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    writer.release()
    return str(path)


def read_frames(path):
    import cv2

    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


def test_video_becomes_an_annotated_video(tmp_path, checkpoint):
    _, _, weights = checkpoint
    video = write_video(tmp_path / "clip.mp4", frames=5)
    summary = run_demo(
        [video], tmp_path / "out", "--batch-size", "2", "--confidence-threshold", "0.0", "MODEL.WEIGHTS", weights
    )
    (entry,) = summary
    assert entry["output"] == str(tmp_path / "out" / "clip.mp4")
    frames = read_frames(entry["output"])
    assert len(frames) == len(entry["frames"]) == 5 and frames[0].shape == (48, 64, 3)
    assert all(len(frame["scores"]) == 20 for frame in entry["frames"])  # TEST.DETECTIONS_PER_IMAGE, threshold 0
    summary = run_demo([video], tmp_path / "out2", "--max-frames", "3")
    assert len(summary[0]["frames"]) == 3 and len(read_frames(summary[0]["output"])) == 3


def test_unreadable_video_and_missing_webcam_are_named(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(OSError, match=r"cannot open video .*broken\.mp4"):
        run_demo([str(broken)], tmp_path / "out")
    with pytest.raises(OSError, match=r"cannot open webcam 97"):
        demo.main(["--config-file", INSTANT_CONFIG, "--webcam", "97", "--output", str(tmp_path / "cam"), "MODEL.DEVICE", "cpu"])


@pytest.mark.parametrize(
    "extra", [[], ["--webcam", "0"], ["--batch-size", "0"], ["--max-frames", "0"]], ids=["nothing", "both", "batch", "frames"]
)
def test_bad_input_arguments(extra):
    inputs = [] if extra == [] else ["--input", "x"]
    with pytest.raises(SystemExit):
        demo.parse_args(["--config-file", "x", *inputs, "--output", "y", *extra])


def test_batched_folder_gives_the_single_image_detections(tmp_path, checkpoint):
    _, _, weights = checkpoint
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(48, 72), (64, 48), (48, 72), (48, 72), (64, 48)]
    for i, size in enumerate(sizes):
        write_image(folder / f"{i}.png", size=size, seed=i)
    one = run_demo([str(folder)], tmp_path / "one", "--confidence-threshold", "0.0", "MODEL.WEIGHTS", weights)
    batched = run_demo([str(folder)], tmp_path / "two", "--batch-size", "2", "--confidence-threshold", "0.0", "MODEL.WEIGHTS", weights)
    assert [os.path.basename(e["input"]) for e in batched] == [f"{i}.png" for i in range(5)]
    for a, b in zip(one, batched):
        assert b["scores"] == pytest.approx(a["scores"], abs=1e-4)
        assert np.allclose(b["boxes"], a["boxes"], atol=1e-3)


def test_coco_json_of_a_dataset_folder_uses_its_ids(tmp_path):
    from pycocotools.coco import COCO

    from helpers.coco import write_coco_dataset

    json_file, image_root = write_coco_dataset(str(tmp_path / "mine"), num_images=3)
    datasets = repr((("demo_mine", json_file, image_root),))
    run_demo(
        [image_root], tmp_path / "out", "--coco-json",
        "DATASETS.COCO_INSTANCES", datasets, "DATASETS.TEST", "('demo_mine',)", "MODEL.DETR.NUM_CLASSES", "3",
    )
    with open(tmp_path / "out" / "coco_detections.json") as f:
        detections = json.load(f)
    assert len(detections) == 3 * 20  # every detection, not only those drawn
    assert {d["image_id"] for d in detections} == {1, 2, 3}
    assert {d["category_id"] for d in detections} <= {3, 7, 11}
    COCO(json_file).loadRes(str(tmp_path / "out" / "coco_detections.json"))  # pycocotools reads it


@pytest.mark.parametrize("panoptic", [False, True])
def test_draws_masks_and_panoptic_segments(tmp_path, shapes_root, panoptic):
    opts = [
        "MODEL.MASK_ON", "True", "MODEL.RESNETS.OUT_FEATURES", "['res5']", "MODEL.DETR.HIDDEN_DIM", "128",
        "MODEL.DETR.NHEADS", "8",
    ]
    if panoptic:
        opts += [
            "MODEL.DETR.PANOPTIC_ON", "True", "MODEL.DETR.PANOPTIC_THRESHOLD", "0.0", "MODEL.DETR.NUM_CLASSES", str(PANOPTIC_NUM_CLASSES),
            "DATASETS.TEST", "('shapes_panoptic_val',)",
        ]
    image = write_image(tmp_path / "photo.png", size=(64, 96))
    (entry,) = run_demo([image], tmp_path / "out", "--confidence-threshold", "0.0", *opts)
    drawing = np.asarray(Image.open(tmp_path / "out" / "photo.png"))
    assert drawing.shape == (64, 96, 3) and (drawing != np.asarray(Image.open(image))).any()
    if panoptic:  # the segments, named by the panoptic dataset's classes
        assert entry["segments"] and {s["class"] for s in entry["segments"]} <= {
            "circle", "rectangle", "triangle", "star", "cross", "gradient", "stripes", "checks"
        }
    else:
        assert "segments" not in entry and entry["scores"]
