"""
tools/visualize_attention: the recomputed attention is the model's own, the figures are
written, and bad query or layer indices are named.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conditional_detr import ops
from conditional_detr.engine import get_config
from conditional_detr.modeling.attention import ConditionalCrossAttention
from conditional_detr.ops import reference
from conditional_detr.tools import visualize_attention as tool
from conditional_detr.tools.inference import build_eval_model

from helpers.paths import INSTANT_CONFIG

IMPLS = ["pytorch"] + (["compiled"] if ops.has_ops_for("cpu") else [])


pytestmark = pytest.mark.usefixtures("one_thread")


def write_image(path, size=(60, 90)):
    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def tiny(*opts):
    torch.manual_seed(0)
    cfg = get_config(INSTANT_CONFIG, ["MODEL.DEVICE", "cpu", *opts])
    return cfg, build_eval_model(cfg)


def cli(image, output, *rest):
    """The tool's arguments for the instant-test config."""
    return ["--config-file", INSTANT_CONFIG, "--input", str(image), "--output", str(output), *rest]


@pytest.mark.parametrize("impl", IMPLS)
def test_combined_map_is_the_attention_the_model_used(tmp_path, impl):
    cfg, model = tiny("MODEL.DETR.OPS_IMPL", impl)
    out_proj_inputs = []
    hooks = [
        m.out_proj.register_forward_hook(lambda mod, args, out: out_proj_inputs.append(args[0]))
        for m in model.modules()
        if isinstance(m, ConditionalCrossAttention)
    ]
    image = np.asarray(Image.open(write_image(tmp_path / "x.png")))
    _, layers, feature_size = tool.run_with_attention(cfg, model, image)
    for hook in hooks:
        hook.remove()

    assert len(layers) == len(out_proj_inputs) == cfg.MODEL.DETR.DEC_LAYERS
    assert layers[0]["key_padding_mask"].shape[1] == feature_size[0] * feature_size[1]
    for inputs, used in zip(layers, out_proj_inputs):
        weights = tool.attention_maps(inputs)["combined"]  # [batch, heads, queries, keys]
        value = inputs["value"]
        num_keys, batch, channels = value.shape
        heads = value.reshape(num_keys, batch, inputs["num_heads"], -1).permute(1, 2, 0, 3)
        out = (weights @ heads).permute(2, 0, 1, 3).reshape(-1, batch, channels)
        torch.testing.assert_close(out, used, rtol=1e-4, atol=1e-5)
        oracle = reference.conditional_cross_attention(
            *(inputs[k] for k in ("q_content", "q_spatial", "k_content", "k_spatial", "value")),
            inputs["key_padding_mask"],
            inputs["num_heads"],
        )
        torch.testing.assert_close(out, oracle, rtol=1e-4, atol=1e-5)


def test_maps_are_softmaxes_that_skip_padding():
    torch.manual_seed(0)
    q = torch.randn(3, 2, 8)
    k = torch.randn(5, 2, 8)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    inputs = {
        "q_content": q,
        "q_spatial": -q,
        "k_content": k,
        "k_spatial": k.flip(0),
        "key_padding_mask": mask,
        "num_heads": 2,
    }
    maps = tool.attention_maps(inputs)
    for kind in tool.MAP_KINDS:
        torch.testing.assert_close(maps[kind].sum(-1), torch.ones(2, 2, 3))
        assert (maps[kind][1, :, :, 3:] == 0).all()
    # batch 1, head 0 (channels 0..3): q_p . k_p alone, scaled by 1 / sqrt(2 * head_dim)
    spatial = (-q[:, 1, :4] @ k.flip(0)[:, 1, :4].T * 8**-0.5)[:, :3].softmax(-1)
    torch.testing.assert_close(maps["spatial"][1, 0, :, :3], spatial)


def test_unpadded_grid_crops_the_padding():
    weights = torch.arange(12.0).reshape(1, 12)  # a 3x4 feature map
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[:2, :3] = False
    grid = tool.unpadded_grid(weights, mask.flatten(), (3, 4))
    assert grid.tolist() == [[[0.0, 1.0, 2.0], [4.0, 5.0, 6.0]]]


@pytest.mark.slow
def test_figures_and_json_are_written(tmp_path):
    cfg, model = tiny()
    weights = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    image = write_image(tmp_path / "scene.jpg")
    drawn = tool.main(
        cli(
            image,
            str(tmp_path / "out"),
            "--top",
            "2",
            "--layer",
            "0",
            "MODEL.DEVICE",
            "cpu",
            "MODEL.WEIGHTS",
            weights,
        )
    )
    assert len(drawn) == 2 and all(d["layer"] == 0 for d in drawn)
    for d in drawn:
        assert d["figure"].endswith(f"scene_query{d['query']}_layer0.png")
        assert Image.open(d["figure"]).size[0] > 0
    with open(tmp_path / "out" / "scene_attention.json") as f:
        assert json.load(f) == drawn

    (one,) = tool.main(
        cli(
            image,
            str(tmp_path / "out"),
            "--query",
            "7",
            "MODEL.DEVICE",
            "cpu",
            "MODEL.WEIGHTS",
            weights,
        )
    )
    last = cfg.MODEL.DETR.DEC_LAYERS - 1
    assert one["query"] == 7 and one["figure"].endswith(f"scene_query7_layer{last}.png")


def test_bad_indices_are_named(tmp_path):
    image = write_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"--query 10 is out of range.*10 object queries \(0..9\)"):
        tool.main(cli(image, tmp_path, "--query", "10", "MODEL.DEVICE", "cpu"))
    with pytest.raises(ValueError, match=r"--layer 2 is out of range.*2 decoder layers"):
        tool.main(cli(image, tmp_path, "--layer", "2", "MODEL.DEVICE", "cpu"))
    with pytest.raises(ValueError, match="must be an image file.*is a folder"):
        tool.main(
            ["--config-file", INSTANT_CONFIG, "--input", str(tmp_path), "--output", str(tmp_path)]
        )
    with pytest.raises(FileNotFoundError, match="missing.png"):
        tool.main(cli(str(tmp_path / "missing.png"), str(tmp_path)))


def test_softmax_class_scores_leave_out_no_object(tmp_path):
    image = write_image(tmp_path / "x.png")
    (drawn,) = tool.main(
        cli(
            image,
            str(tmp_path / "out"),
            "MODEL.DEVICE",
            "cpu",
            "MODEL.DETR.CLASS_LOSS",
            "softmax",
        )
    )
    assert drawn["class"] in {"circle", "rectangle", "triangle", "star", "cross"}
    assert 0.0 < drawn["score"] < 1.0


def test_model_without_conditional_attention_is_named(tmp_path):
    image = write_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match="'DETR' has no conditional cross-attention"):
        tool.main(
            cli(
                image,
                str(tmp_path),
                "MODEL.DEVICE",
                "cpu",
                "MODEL.META_ARCHITECTURE",
                "DETR",
                "MODEL.DETR.CLASS_LOSS",
                "softmax",
            )
        )
