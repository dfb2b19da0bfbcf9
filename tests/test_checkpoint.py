"""
Checkpoints: official weights converted or loaded as they are, and files that are not
checkpoints named.
"""
import re

import pytest
import torch
from detectron2.modeling import build_model

from conditional_detr.checkpoint import ConditionalDETRCheckpointer
from conditional_detr import conversion
from conditional_detr.tools import convert_official

from helpers import tiny
from helpers.official import reference_file, tiny_fixture_cfg


@pytest.fixture(scope="module")
def official_path():
    return reference_file("official_r18_tiny.pth")


def tiny_model(num_classes):
    cfg = tiny_fixture_cfg()
    cfg.MODEL.DETR.NUM_CLASSES = num_classes
    return build_model(cfg)


def test_80_classes_take_the_coco_id_rows(official_path):
    official = conversion.load_official_checkpoint(official_path)
    converted = conversion.convert_state_dict(official, num_classes=80)
    category_ids = conversion.coco_contiguous_to_category_id()
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
        conversion.load_official_checkpoint(path)


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
