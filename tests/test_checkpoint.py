"""
Checkpoints: the registry of foreign formats, official weights converted or loaded as they
are (by this project's checkpointer and by detectron2's DefaultPredictor), and files that are
not checkpoints named.
"""
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from conditional_detr.checkpoint import ConditionalDETRCheckpointer, formats
from conditional_detr.checkpoint import class_heads
from conditional_detr.checkpoint import official as official_formats
from conditional_detr.tools import convert_official

from helpers import tiny
from helpers.official import reference_file, tiny_deformable_fixture_cfg, tiny_detr_fixture_cfg, tiny_fixture_cfg


@pytest.fixture(scope="module")
def official_path():
    return reference_file("official_r18_tiny.pth")


def tiny_model(num_classes):
    cfg = tiny_fixture_cfg()
    cfg.MODEL.DETR.NUM_CLASSES = num_classes
    return build_model(cfg)


def official_fixture(name):
    """The official state dict of one format's tiny fixture, and the config of its architecture."""
    if name == "deformable_detr":
        variants = torch.load(reference_file("official_deformable_r18_tiny.pth"), map_location="cpu")
        return variants["plain"]["model"], tiny_deformable_fixture_cfg("plain")
    file, cfg = {
        "conditional_detr": ("official_r18_tiny.pth", tiny_fixture_cfg()),
        "detr": ("official_detr_r18_tiny.pth", tiny_detr_fixture_cfg()),
    }[name]
    return official_formats.load_official_checkpoint(reference_file(file)), cfg


OFFICIAL_FORMATS = ["conditional_detr", "detr", "deformable_detr"]


def test_the_registry_recognizes_and_converts_a_fixture_of_each_official_format():
    # the others: DETR's panoptic in tests/test_fidelity_detr_panoptic.py, tests/test_mmdetection.py and
    # tests/test_huggingface.py on models those libraries build
    foreign = ["detr_panoptic", "mmdet_conditional_detr", "mmdet_detr", "mmdet_deformable_detr"]
    foreign += ["hf_conditional_detr", "hf_detr", "hf_deformable_detr"]
    assert [fmt.name for fmt in formats.FORMATS] == OFFICIAL_FORMATS + foreign
    for fmt in formats.FORMATS[: len(OFFICIAL_FORMATS)]:
        state_dict, cfg = official_fixture(fmt.name)
        assert formats.recognize(state_dict) is fmt
        assert cfg.MODEL.META_ARCHITECTURE == fmt.architecture
        model = build_model(cfg)
        converted = fmt.convert(state_dict, cfg.MODEL.DETR.NUM_CLASSES)
        incompatible = torch.nn.Module.load_state_dict(model, converted, strict=False)
        assert not incompatible.missing_keys and not incompatible.unexpected_keys, fmt.name
        assert formats.recognize(converted) is None  # this project's own names


def test_converter_names_the_formats_it_reads(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match=r"other\.pth: not a checkpoint of a known format; known formats: .*facebookresearch/detr"):
        convert_official.main([str(path), str(tmp_path / "out.pth")])


def test_default_predictor_loads_an_official_checkpoint_of_the_model_classes(official_path):
    cfg = tiny_fixture_cfg()  # 91 classes: the official logits as they are
    cfg.MODEL.WEIGHTS = str(official_path)
    predictor = DefaultPredictor(cfg)
    ours = build_model(cfg)
    ConditionalDETRCheckpointer(ours).load(str(official_path))
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(predictor.model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    image = torch.randint(0, 256, (96, 128, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    detections = predictor(image.numpy())["instances"]
    assert len(detections) == cfg.TEST.DETECTIONS_PER_IMAGE


def test_default_predictor_refuses_an_official_checkpoint_it_would_load_in_part(official_path):
    # detectron2 drops the 91-logit class head of an 80-class model before the model sees it
    cfg = tiny_fixture_cfg()
    cfg.MODEL.DETR.NUM_CLASSES = 80
    cfg.MODEL.WEIGHTS = str(official_path)
    with pytest.raises(ValueError, match=r"Atten4Vis/ConditionalDETR state dict without its class heads.*ConditionalDETRCheckpointer"):
        DefaultPredictor(cfg)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="without its class heads"):
        DetectionCheckpointer(model).load(str(official_path))


def test_80_classes_take_the_coco_id_rows(official_path):
    official = official_formats.load_official_checkpoint(official_path)
    converted = official_formats.convert_state_dict(official, num_classes=80)
    category_ids = class_heads.coco_contiguous_to_category_id()
    assert len(category_ids) == 80 and category_ids[0] == 1 and category_ids[-1] == 90
    assert converted["class_embed.weight"].shape == (80, 256)
    torch.testing.assert_close(converted["class_embed.weight"][0], official["class_embed.weight"][1].float())
    torch.testing.assert_close(converted["class_embed.bias"][79], official["class_embed.bias"][90].float())


@pytest.mark.parametrize("num_classes", [91, 80])
def test_official_weights_load_directly(official_path, tmp_path, num_classes):
    converted_path = tmp_path / "converted.pth"
    convert_official.main([str(official_path), str(converted_path), "--num-classes", str(num_classes)])

    direct, via_converter = tiny_model(num_classes), tiny_model(num_classes)
    ConditionalDETRCheckpointer(direct).load(str(official_path))
    ConditionalDETRCheckpointer(via_converter).load(str(converted_path))
    for (name, a), b in zip(direct.state_dict().items(), via_converter.state_dict().values()):
        assert torch.equal(a, b), name


def test_class_count_mismatch_names_file_and_counts(official_path, tmp_path):
    converted_path = tmp_path / "converted91.pth"
    convert_official.main([str(official_path), str(converted_path), "--num-classes", "91"])
    with pytest.raises(ValueError, match=r"converted91\.pth.*91 classes.*NUM_CLASSES is 5"):
        ConditionalDETRCheckpointer(tiny_model(5)).load(str(converted_path))
    with pytest.raises(ValueError, match=r"official_r18_tiny\.pth"):
        ConditionalDETRCheckpointer(tiny_model(5)).load(str(official_path))


def test_converter_rejects_other_checkpoints(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match=r"other\.pth: not an official Conditional DETR, DETR or Deformable DETR checkpoint"):
        official_formats.load_official_checkpoint(path)


# --------------------------------------------------------------- files that are not checkpoints


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_model()


def test_truncated_checkpoint_is_named(model, tmp_path):
    path = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model_final\.pth: cannot read this checkpoint \(a truncated file"):
        ConditionalDETRCheckpointer(model).load(str(path))


@pytest.mark.parametrize("name, content", [("notes.pth", b"these are not weights\n"), ("empty.pkl", b""), ("weights.pth", None)])
def test_non_checkpoints_are_named(model, tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        torch.save(torch.zeros(3), path)  # a tensor, not a state dict
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(name) + ": (cannot read this checkpoint|not a checkpoint)"):
        ConditionalDETRCheckpointer(model).load(str(path))


def test_dict_without_tensors_is_not_a_checkpoint(model, tmp_path):
    path = tmp_path / "settings.pth"
    torch.save({"model": {"lr": 0.1}}, path)
    with pytest.raises(ValueError, match=r"settings\.pth: not a checkpoint: expected a state dict of tensors"):
        ConditionalDETRCheckpointer(model).load(str(path))


def test_key_templates_rename_both_ways_the_first_matching_pair_winning():
    from conditional_detr.checkpoint.foreign import rename_keys, template_renames

    pairs = [
        ("model.layers.{layer}.norm_a.", "layers.{layer}.norm2."),  # specific, before the general pair
        ("model.layers.{layer}.{part}.", "layers.{layer}.{part}."),
        ("model.{extra}{end}", "{extra}{end}"),
    ]
    fields = {"layer": r"\d+", "part": r"\w+", "extra": "scale|bias", "end": r"\.|$"}
    to_official, to_foreign = template_renames(pairs, fields)
    foreign = {"model.layers.3.norm_a.weight": 1, "model.layers.10.fc1.bias": 2, "model.scale": 3, "model.bias.x": 4}
    official = rename_keys(foreign, to_official, "test", "Model")
    assert official == {"layers.3.norm2.weight": 1, "layers.10.fc1.bias": 2, "scale": 3, "bias.x": 4}
    assert rename_keys(official, to_foreign, "test", "Model") == foreign
    with pytest.raises(ValueError, match="'model.other'"):
        rename_keys({"model.other": 0}, to_official, "test", "Model")
