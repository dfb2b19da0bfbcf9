"""tools/benchmark_model on a tiny case: every implementation timed, JSON written."""
import argparse
import json

import pytest
from detectron2.modeling import build_model

from conditional_detr.tools import benchmark_model

from helpers.paths import INSTANT_CONFIG


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_tiny_case_times_both_implementations_and_writes_json(tmp_path):
    path = tmp_path / "model.json"
    results, = benchmark_model.main([
        "--config-file", INSTANT_CONFIG, "--device", "cpu", "--dtype", "fp32", "bf16", "--quick",
        "--repeats", "1", "--inference-size", "64", "96", "--inference-batch", "2",
        "--train-size", "64", "80", "--json", str(path),
    ])
    # inference at batch 1 and 2, then training, for each dtype
    assert [(r["task"], r["dtype"], r["batch"]) for r in results] == [
        (task, dtype, batch) for dtype in ("fp32", "bf16")
        for task, batch in (("inference", 1), ("inference", 2), ("training", 2))
    ]
    for row in results:
        assert set(row["per_second"]) == {"auto", "compiled", "pytorch"}, row["ms"]
        assert all(v > 0 for v in row["per_second"].values())
        assert all(row["peak_memory_bytes"][name] > 0 for name in row["per_second"])
        assert "speedup_vs_official" not in row
    written = json.loads(path.read_text())
    assert written["device_type"] == "cpu" and written["official"] is False
    assert written["results"] == json.loads(json.dumps(results))


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(SystemExit):
        benchmark_model.parse_args(["--train-batch", "0"])
    with pytest.raises(SystemExit):
        benchmark_model.parse_args(["--official", str(tmp_path)])


MASK_OPTS = [
    "MODEL.META_ARCHITECTURE", "DETR", "MODEL.DETR.CLASS_LOSS", "softmax", "MODEL.MASK_ON", "True",
    "MODEL.RESNETS.OUT_FEATURES", "['res5']", "MODEL.DETR.HIDDEN_DIM", "128", "MODEL.DETR.NHEADS", "8",
    "MODEL.DETR.PANOPTIC_ON", "True", "MODEL.DETR.TRAIN_MASK_HEAD_ONLY", "True",
]


def test_a_mask_head_is_measured_against_the_official_detr(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "conditional_detr.py").write_text("")
    with pytest.raises(SystemExit):  # the official mask head is DETR's
        benchmark_model.parse_args(["--official", str(tmp_path), "--config-file", INSTANT_CONFIG, *MASK_OPTS])
    args = benchmark_model.parse_args(["--official", str(tmp_path), "--config-file", INSTANT_CONFIG])
    assert not args.cfg.MODEL.MASK_ON


@pytest.mark.slow
def test_a_panoptic_model_keeps_the_asked_segments_and_trains_its_mask_head_alone(tmp_path):
    results, = benchmark_model.main([
        "--config-file", INSTANT_CONFIG, "--device", "cpu", "--quick", "--repeats", "1", "--inference-batch", "1",
        "--inference-size", "64", "96", "--train-size", "64", "80", "--panoptic-segments", "5", *MASK_OPTS,
    ])
    assert results[0]["task"] == "panoptic_threshold" and results[0]["segments"] == 5
    assert [(r["task"], r["batch"]) for r in results[1:]] == [("inference", 1), ("training", 2)]
    for row in results[1:]:
        assert set(row["per_second"]) == {"auto", "compiled", "pytorch"}, row["ms"]


class StandInOfficial:
    """The official model's interface over the project's own model, for the --official path."""

    def __init__(self, path, cfg, device):
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = device
        self.model = build_model(cfg)
        self.args = argparse.Namespace(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, clip_max_norm=0.1)

    def infer(self, images):
        return [{"scores": out["instances"].scores} for out in self.model([{"image": i} for i in images])]

    def losses(self, images, targets):
        return self.model.class_embed.weight.square().sum() + self.model.backbone.stem.conv1.weight.sum()


@pytest.mark.slow
def test_official_path_times_it_and_compares_detections(tmp_path, monkeypatch):
    checkout = tmp_path / "official"
    (checkout / "models").mkdir(parents=True)
    (checkout / "models" / "conditional_detr.py").write_text("")
    monkeypatch.setattr(benchmark_model, "OfficialModel", StandInOfficial)
    monkeypatch.setattr(benchmark_model, "our_state_dict_from_official", lambda model: model.state_dict())
    results, = benchmark_model.main([
        "--config-file", INSTANT_CONFIG, "--device", "cpu", "--quick", "--repeats", "2",
        "--inference-size", "64", "96", "--train-size", "64", "80", "--official", str(checkout),
    ])
    assert results[0]["task"] == "official_detections"
    assert all(v < 1e-5 for v in results[0]["max_score_difference"].values())
    for row in results[1:]:
        assert set(row["speedup_vs_official"]) == {"auto", "compiled", "pytorch"}, row["ms"]
        assert all(v > 0 for v in row["speedup_vs_official"].values())
        # the spread beside the median: fastest and slowest round, lowest and highest round's speedup
        for name, (fastest, slowest) in row["ms_range"].items():
            assert fastest <= row["ms"][name] <= slowest
        for name, (lowest, highest) in row["speedup_vs_official_range"].items():
            assert 0 < lowest <= highest


@pytest.mark.slow
def test_each_run_is_a_process_of_its_own_and_every_run_is_written(tmp_path, capsys):
    path = tmp_path / "runs.json"
    runs = benchmark_model.main([
        "--config-file", INSTANT_CONFIG, "--device", "cpu", "--quick", "--repeats", "1", "--runs", "2",
        "--inference-size", "64", "96", "--train-size", "64", "80", "--json", str(path),
        "MODEL.DETR.DEC_LAYERS", "1",  # config overrides come last; the runs get them too
    ])
    written = json.loads(path.read_text())
    assert len(runs) == 2 and written["runs"] == runs and "results" not in written
    assert all([r["task"] for r in run] == ["inference", "inference", "training"] for run in runs)
    assert capsys.readouterr().out.count("run 2 of 2") == 1


def test_a_run_s_command_keeps_every_option_but_runs_and_json():
    argv = ["--runs", "3", "--json=out.json", "--official", "x", "--json", "y.json", "MODEL.A", "1"]
    assert benchmark_model.without_options(argv, {"--runs": 1, "--json": 1}) == ["--official", "x", "MODEL.A", "1"]
