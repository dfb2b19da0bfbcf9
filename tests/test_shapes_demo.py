"""make demo (tools/shapes_demo): its metrics and pictures, and bfloat16 only where it is native."""
import json

import pytest
import torch
from PIL import Image

from conditional_detr.engine import get_config

from helpers.paths import INSTANT_CONFIG, REPO

PANOPTIC_DEMO = [
    "--box-stage", f"{REPO}/configs/quick_schedules/deformable_detr_panoptic_shapes_boxes.yaml",
    "--config-file", f"{REPO}/configs/quick_schedules/deformable_detr_panoptic_shapes.yaml",
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_shapes_demo_writes_metrics_and_pictures(shapes_root, tmp_path):
    from conditional_detr.tools import shapes_demo

    out = tmp_path / "demo"
    summary = shapes_demo.main(
        [
            "--config-file",
            INSTANT_CONFIG,
            "--output-dir",
            str(out),
            "--num-images",
            "2",
            "MODEL.DEVICE",
            "cpu",
            "SOLVER.MAX_ITER",
            "2",
            "SOLVER.STEPS",
            "(1,)",
        ]
    )
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results == summary
    assert set(results["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert results["train_seconds"] > 0 and results["iterations"] == 2
    assert results["training_precision"] == "float32"
    assert results["processor"].endswith(torch.backends.cpu.get_cpu_capability())
    assert "vector_instructions" in results and isinstance(results["isa_limits"], dict)
    assert len(results["visualizations"]) == 2
    for name in results["visualizations"]:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > image.height  # truth | predictions
    assert (out / "metrics.json").exists() and (out / "model_final.pth").exists()


@pytest.mark.slow
def test_panoptic_demo_prints_and_writes_panoptic_quality_and_mask_ap(shapes_root, tmp_path, capsys):
    """`make panoptic-demo` in seconds: its two stages on the tiny panoptic shapes, two iterations each."""
    from conditional_detr.tools import shapes_demo

    out = tmp_path / "panoptic_demo"
    summary = shapes_demo.main([
        *PANOPTIC_DEMO, "--output-dir", str(out), "--num-images", "2",
        "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "MODEL.DETR.PANOPTIC_THRESHOLD", "0.0",
    ])
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results == summary and results["dataset"] == "shapes_panoptic_val"
    assert results["box_stage_iterations"] == 2 and (out / "box_stage" / "model_final.pth").exists()
    assert results["train_seconds"] > results["box_stage_seconds"] > 0
    assert set(results["panoptic"]) == {f"{m}{part}" for m in ("PQ", "SQ", "RQ") for part in ("", "_th", "_st")}
    assert all(0 <= v <= 100 for v in results["panoptic"].values() if v is not None)
    assert set(results["segm"]) == set(results["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    printed = capsys.readouterr().out
    assert "Panoptic quality" in printed and "PQ_th" in printed and "mask AP" in printed
    assert len(results["visualizations"]) == 2
    for name in results["visualizations"]:
        with Image.open(out / name) as image:
            assert image.width > image.height  # truth | predictions


@pytest.mark.parametrize("native, capability", [(True, "AVX512"), (False, "AVX512"), (False, "AVX2")])
def test_the_demo_trains_in_bfloat16_only_where_it_is_native(monkeypatch, native, capability):
    from conditional_detr.tools import shapes_demo

    # an AVX-512 BF16 CPU whose torch is held at AVX2 (ATEN_CPU_CAPABILITY) has no native bfloat16
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native or capability == "AVX2", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cfg = get_config(shapes_demo.DEFAULT_CONFIG, ["MODEL.DEVICE", "cpu"])
    assert cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.AMP.PRECISION == "bfloat16"
    note = shapes_demo.bfloat16_only_where_native(cfg)
    assert cfg.SOLVER.AMP.ENABLED is native
    assert (note is None) is native
    if not native:
        assert "no native bfloat16" in note and "SOLVER.AMP.ENABLED False" in note
    # a float32 config is left alone
    cfg = get_config(INSTANT_CONFIG, ["MODEL.DEVICE", "cpu"])
    assert shapes_demo.bfloat16_only_where_native(cfg) is None and not cfg.SOLVER.AMP.ENABLED
