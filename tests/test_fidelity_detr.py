"""
The DETR meta-architecture reproduces the official DETR implementation's outputs
(../shared/reference/official_detr_r18_tiny*), and full-size DETR-R50 has its keys,
shapes and parameter count.

Unlike the Conditional DETR fixture, this one's reference logits were computed with
the float16 values its checkpoint stores: the logits agree directly, with no class
bias to recover (`test_logits_need_no_class_bias_correction`).
"""
import pytest
import torch
from detectron2.modeling import build_model

from conditional_detr.checkpoint import ConditionalDETRCheckpointer
from conditional_detr.checkpoint import class_heads
from conditional_detr.checkpoint import official as official_formats
from conditional_detr.tools import convert_official

from helpers.official import (
    assert_same_detections, assert_same_losses, detr_resnet_cfg, layers, load_converted,
    official_keys, postprocessed, reference_file, run, tiny_detr_fixture_cfg, tiny_fixture_cfg,
)

OFFICIAL_DETR_R50_PARAMETERS = 41_524_768  # 92 logits
COCO_ID_CLASS_HEAD_EXTRA = 11 * 257  # 92 - 81 logits, each with 256 weights and a bias


@pytest.fixture(scope="module")
def reference_io():
    return torch.load(reference_file("official_detr_r18_tiny_io.pth"), map_location="cpu")


@pytest.fixture(scope="module")
def official_path():
    return reference_file("official_detr_r18_tiny.pth")


@pytest.fixture(scope="module")
def model(official_path, module_folder):
    path = module_folder("converted") / "detr_tiny.pth"
    convert_official.main([str(official_path), str(path), "--num-classes", "91"])
    return load_converted(path, tiny_detr_fixture_cfg())


@pytest.fixture(scope="module")
def outputs(model, reference_io):
    return run(model, reference_io)


def test_format_is_detected_from_the_keys(official_path):
    assert official_formats.official_format(official_formats.load_official_checkpoint(official_path)) == "detr"
    conditional = official_formats.load_official_checkpoint(reference_file("official_r18_tiny.pth"))
    assert official_formats.official_format(conditional) == "conditional_detr"


def test_boxes_and_logits_of_every_layer_match(outputs, reference_io):
    assert len(layers(outputs)) == len(layers(reference_io)) == 3
    for ours, official in zip(layers(outputs), layers(reference_io)):
        torch.testing.assert_close(ours["pred_boxes"], official["pred_boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours["pred_logits"], official["pred_logits"], atol=1e-4, rtol=0)


def test_logits_need_no_class_bias_correction(outputs, reference_io):
    # the Conditional DETR fixture's defect (a float32 bias behind float16 weights)
    # would show as a per-class constant of up to 2e-3; here all agree to float32 rounding
    for ours, official in zip(layers(outputs), layers(reference_io)):
        assert (ours["pred_logits"] - official["pred_logits"]).abs().max() < 1e-5


def test_losses_match(model, outputs, reference_io):
    assert_same_losses(model, outputs, reference_io)


def test_detections_match(model, reference_io):
    results = postprocessed(model, reference_io)
    for result, official, image in zip(results, reference_io["postprocess"], reference_io["images_uint8_rgb"]):
        # one detection per query, its best class other than "no object"
        assert len(official["scores"]) == model.num_queries
        assert_same_detections(result["instances"], official, image.shape[1:])


def test_80_classes_keep_the_no_object_logit_last(official_path):
    official = official_formats.load_official_checkpoint(official_path)
    converted = official_formats.convert_state_dict(official, num_classes=80)
    assert converted["class_embed.weight"].shape == (81, 256)
    category_ids = class_heads.coco_contiguous_to_category_id()
    torch.testing.assert_close(converted["class_embed.bias"][:80], official["class_embed.bias"][category_ids].float())
    torch.testing.assert_close(converted["class_embed.weight"][80], official["class_embed.weight"][91].float())


@pytest.mark.parametrize("num_classes", [91, 80])
def test_official_weights_load_directly(official_path, tmp_path, num_classes):
    converted_path = tmp_path / "converted.pth"
    convert_official.main([str(official_path), str(converted_path), "--num-classes", str(num_classes)])
    cfg = tiny_detr_fixture_cfg()
    cfg.MODEL.DETR.NUM_CLASSES = num_classes
    direct, via_converter = build_model(cfg), build_model(cfg)
    ConditionalDETRCheckpointer(direct).load(str(official_path))
    ConditionalDETRCheckpointer(via_converter).load(str(converted_path))
    assert direct.class_embed.out_features == num_classes + 1
    for (name, a), b in zip(direct.state_dict().items(), via_converter.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpointer_names_class_counts_and_formats(official_path, tmp_path):
    converted_path = tmp_path / "detr91.pth"
    convert_official.main([str(official_path), str(converted_path), "--num-classes", "91"])
    cfg = tiny_detr_fixture_cfg()
    cfg.MODEL.DETR.NUM_CLASSES = 5
    with pytest.raises(ValueError, match=r"detr91\.pth.*91 classes \+ no-object \(92 logits\).*NUM_CLASSES is 5"):
        ConditionalDETRCheckpointer(build_model(cfg)).load(str(converted_path))
    with pytest.raises(ValueError, match=r"official detr checkpoint cannot load into .* ConditionalDETR"):
        ConditionalDETRCheckpointer(build_model(tiny_fixture_cfg())).load(str(official_path))


@pytest.mark.parametrize("num_classes", [91, 80])
def test_r50_parameter_count(num_classes):
    model = build_model(detr_resnet_cfg(50, num_classes))
    expected = OFFICIAL_DETR_R50_PARAMETERS - (COCO_ID_CLASS_HEAD_EXTRA if num_classes == 80 else 0)
    # every parameter, the frozen stem and res2 included, as the official count
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("num_classes", [91, 80])
def test_converted_r50_keys_and_shapes_match(num_classes):
    fake_official = {k: torch.zeros(s, dtype=torch.float16) for k, s in official_keys("official_detr_r50_keys.txt").items()}
    converted = official_formats.convert_state_dict(fake_official, num_classes=num_classes)
    model_state = build_model(detr_resnet_cfg(50, num_classes)).state_dict()
    assert set(converted) == set(model_state)
    for key, value in converted.items():
        assert value.shape == model_state[key].shape, key
