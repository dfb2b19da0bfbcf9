"""
The FLOP and parameter counts of tools/analyze_model: the official numbers at full
size, the JSON output, and the same count with either attention implementation.
"""

import json
import os

import pytest
import torch

from conditional_detr import ops
from conditional_detr.data.shapes import ShapesParams, register_shapes_datasets
from conditional_detr.engine import get_config
from conditional_detr.tools import analyze_model
from conditional_detr.tools.inference import build_eval_model

from helpers.paths import CONFIGS, DEFORMABLE_INSTANT_CONFIG, INSTANT_CONFIG

COCO_CONFIGS = os.path.join(CONFIGS, "COCO-Detection")

# fvcore on the official implementation, one 800x1216 image
OFFICIAL_GFLOPS = {
    "conditional_detr_R_50_50ep.yaml": 94.8,
    "conditional_detr_R_50_DC5_50ep.yaml": 187.9,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(*opts):
    cfg = get_config(INSTANT_CONFIG, ["MODEL.DEVICE", "cpu", *opts])
    return cfg, build_eval_model(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("config_name", sorted(OFFICIAL_GFLOPS))
def test_full_size_flops_match_official(config_name):
    cfg = get_config(os.path.join(COCO_CONFIGS, config_name), ["MODEL.DEVICE", "cpu"])
    model = build_eval_model(cfg, load_weights=False)
    flops, _, _, _ = analyze_model.count_flops(model, analyze_model.synthetic_inputs(800, 1216))
    assert flops / 1e9 == pytest.approx(OFFICIAL_GFLOPS[config_name], rel=0.02)


def test_complete_count_adds_the_masked_encoder_attention_logits():
    cfg, model = tiny_model()
    # stride 32: a 2x3 feature map, 6 keys and queries per encoder layer
    flops, all_flops, _, _ = analyze_model.count_flops(
        model, analyze_model.synthetic_inputs(64, 96)
    )
    args = cfg.MODEL.DETR
    assert all_flops - flops == args.ENC_LAYERS * 6 * 6 * args.HIDDEN_DIM


@pytest.mark.skipif(not ops.has_ops_for("cpu"), reason="compiled ops not built for CPU")
def test_same_count_with_either_attention_impl():
    inputs = analyze_model.synthetic_inputs(80, 112)
    counts = {}
    for impl in ("compiled", "pytorch"):
        torch.manual_seed(0)
        _, model = tiny_model("MODEL.DETR.OPS_IMPL", impl)
        counts[impl] = analyze_model.count_flops(model, inputs)[:2]
    assert counts["compiled"] == counts["pytorch"]
    assert counts["compiled"][0] > 0


def test_json_output(tmp_path):
    path = tmp_path / "out" / "analysis.json"
    results = analyze_model.main(
        [
            "--config-file",
            INSTANT_CONFIG,
            "--input-size",
            "64",
            "96",
            "--json",
            str(path),
            "MODEL.DEVICE",
            "cpu",
        ]
    )
    with open(path) as f:
        written = json.load(f)
    assert written["gflops"] == pytest.approx(results["gflops"])
    _, model = tiny_model()
    assert written["params"] == sum(p.numel() for p in model.parameters())
    assert written["trainable_params"] <= written["params"]
    assert written["gflops"] > 0 and written["input_size"] == [64, 96]


def test_average_over_dataset_images(tmp_path):
    register_shapes_datasets(
        root=str(tmp_path / "shapes"),
        params=ShapesParams(image_size=(64, 64), num_train=2, num_val=3, max_objects=2),
        prefix="analyze_shapes",
    )
    results = analyze_model.main(
        [
            "--config-file",
            INSTANT_CONFIG,
            "--tasks",
            "flop",
            "--num-inputs",
            "2",
            "MODEL.DEVICE",
            "cpu",
            "DATASETS.TEST",
            "('analyze_shapes_val',)",
        ]
    )
    assert results["num_inputs"] == 2 and results["dataset"] == "analyze_shapes_val"
    assert results["gflops"] > 0 and "params" not in results


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        analyze_model.parse_args(["--config-file", INSTANT_CONFIG, "--input-size", "0", "64"])
    with pytest.raises(SystemExit):
        analyze_model.parse_args(["--config-file", INSTANT_CONFIG, "--num-inputs", "-1"])


def test_deformable_attention_counts_its_samples():
    cfg = get_config(DEFORMABLE_INSTANT_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.DETR.OPS_IMPL", "pytorch"])
    model = build_eval_model(cfg)
    _, _, by_operator, _ = analyze_model.count_flops(model, analyze_model.synthetic_inputs(64, 96))
    args, deformable = cfg.MODEL.DETR, cfg.MODEL.DEFORMABLE_DETR
    # levels of strides 8, 16, 32, 64: 8x12, 4x6, 2x3 and 1x2 positions
    positions = 96 + 24 + 6 + 2
    levels = deformable.NUM_FEATURE_LEVELS
    per_query = lambda points: levels * points * args.HIDDEN_DIM * 5  # noqa: E731
    expected = (
        args.ENC_LAYERS * positions * per_query(deformable.ENC_N_POINTS)
        + args.DEC_LAYERS * args.NUM_OBJECT_QUERIES * per_query(deformable.DEC_N_POINTS)
    )
    assert by_operator["deformable_attention"] == expected


@pytest.mark.skipif(not ops.has_ops_for("cpu"), reason="compiled ops not built for CPU")
def test_deformable_count_is_the_same_with_either_attention_impl():
    inputs = analyze_model.synthetic_inputs(80, 112)
    counts = {}
    for impl in ("compiled", "pytorch"):
        torch.manual_seed(0)
        cfg = get_config(DEFORMABLE_INSTANT_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.DETR.OPS_IMPL", impl])
        counts[impl] = analyze_model.count_flops(build_eval_model(cfg), inputs)[:2]
    assert counts["compiled"] == counts["pytorch"]
