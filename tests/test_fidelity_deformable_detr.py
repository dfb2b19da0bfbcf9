"""
The DeformableDETR meta-architecture reproduces the official Deformable DETR outputs
(../shared/reference/official_deformable_r18_tiny*) in its three variants, plain, box
refinement and two-stage, through both attention implementations; full-size R50 models
have the official keys, shapes and parameter counts.
"""
import pytest
import torch
from detectron2.modeling import build_model

from conditional_detr.checkpoint import ConditionalDETRCheckpointer
from conditional_detr.checkpoint import class_heads
from conditional_detr.checkpoint import official as official_formats
from conditional_detr.tools import convert_official

from helpers.official import (
    DEFORMABLE_VARIANTS, assert_same_detections, assert_same_losses, deformable_resnet_cfg, layers,
    load_converted, official_keys, postprocessed, reference_file, run, tiny_deformable_fixture_cfg, tiny_fixture_cfg,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# (trainable, total) with 91 class logits; the stem and res2 are frozen
OFFICIAL_R50_PARAMETERS = {
    "plain": (39_847_265, 40_069_665),
    "refine": (40_627_260, 40_849_660),
    "two_stage": (40_959_129, 41_181_529),
}
OFFICIAL_KEY_FILES = {
    "plain": "official_deformable_r50_keys.txt",
    "refine": "official_deformable_r50_refine_keys.txt",
    "two_stage": "official_deformable_r50_two_stage_keys.txt",
}
OPS_IMPLS = ["pytorch", "auto"]


@pytest.fixture(scope="module")
def reference_io():
    return torch.load(reference_file("official_deformable_r18_tiny_io.pth"), map_location="cpu")


@pytest.fixture(scope="module")
def official_checkpoints(module_folder):
    """One official-format checkpoint file per variant."""
    variants = torch.load(reference_file("official_deformable_r18_tiny.pth"), map_location="cpu")
    folder = module_folder("official")
    paths = {}
    for variant in DEFORMABLE_VARIANTS:
        paths[variant] = folder / f"{variant}.pth"
        torch.save({"model": variants[variant]["model"]}, paths[variant])
    return paths


@pytest.fixture(scope="module")
def converted_checkpoints(official_checkpoints, module_folder):
    folder = module_folder("converted")
    paths = {}
    for variant, official in official_checkpoints.items():
        paths[variant] = folder / f"{variant}.pth"
        convert_official.main([str(official), str(paths[variant]), "--num-classes", "91"])
    return paths


def run_with_transformer(model, reference_io):
    """The model's outputs and its transformer's, on the reference images."""
    captured = {}
    hook = model.transformer.register_forward_hook(lambda module, args, out: captured.update(out))
    try:
        outputs = run(model, reference_io)
    finally:
        hook.remove()
    return outputs, captured


def test_format_is_detected_from_the_keys(official_checkpoints):
    for path in official_checkpoints.values():
        state_dict = official_formats.load_official_checkpoint(path)
        assert official_formats.official_format(state_dict) == "deformable_detr"


@pytest.mark.parametrize("variant", DEFORMABLE_VARIANTS)
@pytest.mark.parametrize("impl", OPS_IMPLS)
def test_outputs_detections_and_losses_match(converted_checkpoints, reference_io, variant, impl):
    model = load_converted(converted_checkpoints[variant], tiny_deformable_fixture_cfg(variant, impl))
    official = reference_io[variant]
    outputs, transformer = run_with_transformer(model, reference_io)

    assert len(layers(outputs)) == len(layers(official)) == 3
    for ours, theirs in zip(layers(outputs), layers(official)):
        torch.testing.assert_close(ours["pred_logits"], theirs["pred_logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours["pred_boxes"], theirs["pred_boxes"], atol=1e-4, rtol=0)
    for name in ("spatial_shapes", "level_start_index"):
        assert torch.equal(transformer[name], official["transformer"][name]), name
    for name in ("valid_ratios", "init_reference", "inter_references"):
        torch.testing.assert_close(transformer[name], official["transformer"][name], atol=1e-5, rtol=0)
    if variant == "two_stage":
        for name in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(
                outputs["enc_outputs"][name], official["enc_outputs"][name], atol=1e-4, rtol=0
            )
    else:
        assert "enc_outputs" not in outputs

    assert_same_losses(model, outputs, {**official, "targets_coco_ids": reference_io["targets_coco_ids"]})
    results = postprocessed(model, reference_io)
    for result, theirs, image in zip(results, official["postprocess"], reference_io["images_uint8_rgb"]):
        assert_same_detections(result["instances"], theirs, image.shape[1:])


def test_invalid_proposals_are_the_official_unit_boxes(converted_checkpoints, reference_io):
    model = load_converted(converted_checkpoints["two_stage"], tiny_deformable_fixture_cfg("two_stage"))
    ours = run(model, reference_io)["enc_outputs"]["pred_boxes"]
    official = reference_io["two_stage"]["enc_outputs"]["pred_boxes"]
    assert torch.equal((ours == 1).all(-1), (official == 1).all(-1))
    assert (official == 1).all(-1).sum(1).min() > 0  # padding and border positions in each image


@pytest.mark.parametrize("variant", DEFORMABLE_VARIANTS)
def test_checkpointer_loads_official_checkpoint_with_80_classes(official_checkpoints, reference_io, variant):
    cfg = tiny_deformable_fixture_cfg(variant)
    cfg.MODEL.DETR.NUM_CLASSES = 80
    model = build_model(cfg).eval()
    ConditionalDETRCheckpointer(model).load(str(official_checkpoints[variant]))
    ours = run(model, reference_io)
    official = reference_io[variant]
    rows = class_heads.coco_contiguous_to_category_id()
    torch.testing.assert_close(ours["pred_logits"], official["pred_logits"][..., rows], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["pred_boxes"], official["pred_boxes"], atol=1e-4, rtol=0)


def test_official_deformable_checkpoint_refused_by_conditional_detr(official_checkpoints):
    model = build_model(tiny_fixture_cfg())
    with pytest.raises(ValueError, match="official deformable_detr checkpoint cannot load"):
        ConditionalDETRCheckpointer(model).load(str(official_checkpoints["plain"]))


@pytest.mark.parametrize("variant", DEFORMABLE_VARIANTS)
def test_full_size_parameter_counts_keys_and_shapes(variant):
    model = build_model(deformable_resnet_cfg(50, 91, variant))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert (trainable, total) == OFFICIAL_R50_PARAMETERS[variant]

    shapes = official_keys(OFFICIAL_KEY_FILES[variant])
    fake_official = {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}
    converted = official_formats.convert_state_dict(fake_official, num_classes=91)
    model_state = model.state_dict()
    assert set(converted) == set(model_state)
    for key, value in converted.items():
        assert value.shape == model_state[key].shape, key


def test_converter_maps_every_class_head_to_80_classes():
    shapes = official_keys(OFFICIAL_KEY_FILES["two_stage"])
    fake_official = {k: torch.randn(s) for k, s in shapes.items()}
    converted = official_formats.convert_state_dict(fake_official, num_classes=80)
    class_keys = class_heads.class_head_keys(converted)
    # 7 heads (6 layers + proposals), each also under the decoder, weight and bias
    assert len(class_keys) == 28
    rows = class_heads.coco_contiguous_to_category_id()
    proposal_keys = class_heads.proposal_head_keys(converted)
    assert sorted(proposal_keys) == sorted(
        f"{prefix}class_embed.6.{name}" for prefix in ("", "transformer.decoder.") for name in ("weight", "bias")
    )
    for key in class_keys:
        assert converted[key].shape[0] == 80
        if key in proposal_keys:
            # the foreground logit of the proposals stays first
            assert torch.equal(converted[key][0], fake_official[key][0].float())
        else:
            assert torch.equal(converted[key], fake_official[key][rows].float())
