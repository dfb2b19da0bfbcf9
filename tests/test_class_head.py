"""Fine-tuning to other classes: MODEL.WEIGHTS_CLASS_HEAD."""
import contextlib
import logging
import math

import pytest
import torch
from detectron2.modeling import build_model

from conditional_detr.checkpoint import ConditionalDETRCheckpointer
from conditional_detr.checkpoint.class_heads import COCO_CLASS_NAMES, class_head_keys, fine_tune_class_heads
from conditional_detr.engine import get_config
from conditional_detr.checkpoint import class_heads
from conditional_detr.checkpoint import official as official_formats

from helpers.official import reference_file, tiny_detr_fixture_cfg, tiny_fixture_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = ["circle", "rectangle", "triangle", "star", "cross"]
MINE = ["Star", "circle ", "hexagon"]  # case and spaces aside, two names of SHAPES
FOCAL_PRIOR = -math.log((1 - 0.01) / 0.01)


def tiny_model(num_classes=5, *opts):
    cfg = get_config(
        "configs/quick_schedules/conditional_detr_instant_test.yaml",
        ["MODEL.DEVICE", "cpu", "MODEL.DETR.NUM_CLASSES", num_classes, *map(str, opts)],
    )
    return build_model(cfg)


@pytest.fixture(scope="module")
def source(module_folder):
    """A checkpoint of a 5-class model saved with its class names, and the model."""
    torch.manual_seed(0)
    model = tiny_model(5)
    folder = module_folder("source")
    ConditionalDETRCheckpointer(model, str(folder), class_names=SHAPES).save("shapes")
    return str(folder / "shapes.pth"), model.state_dict()


@contextlib.contextmanager
def checkpointer_log():
    """What the checkpointer logs, whatever handlers its logger has (train_net sets some up)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("conditional_detr.checkpoint")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def load(path, behaviour, class_names=MINE, num_classes=3, model=None):
    torch.manual_seed(1)
    model = model or tiny_model(num_classes)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ConditionalDETRCheckpointer(model, class_names=class_names, class_head=behaviour).load(path)
    return model.state_dict(), initial


def test_saved_checkpoints_hold_the_class_names(source):
    path, _ = source
    assert torch.load(path, weights_only=True)["class_names"] == SHAPES


def test_keep_names_the_switch_on_a_count_mismatch(source):
    path, _ = source
    with pytest.raises(ValueError, match=r"shapes\.pth.*5 classes but .*NUM_CLASSES is 3.*WEIGHTS_CLASS_HEAD to 'reinit' or 'match_names'"):
        load(path, "keep")


def test_reinit_keeps_everything_but_the_class_head(source):
    path, trained = source
    with checkpointer_log() as log:
        loaded, initial = load(path, "reinit")
    assert any("re-initialized the class head" in line for line in log)
    for key, value in loaded.items():
        expected = initial[key] if key.startswith("class_embed.") else trained[key]
        assert torch.equal(value, expected), key
    # the focal-loss prior of the start of training
    assert torch.allclose(loaded["class_embed.bias"], torch.full((3,), FOCAL_PRIOR))


def test_match_names_keeps_the_rows_of_matching_classes(source):
    path, trained = source
    with checkpointer_log() as log:
        loaded, initial = load(path, "match_names")
    summary = "kept the class-head rows of 2 of 3 classes by name (Star, circle ); initialized 1 (hexagon)"
    assert any(summary in line for line in log)
    for key in ("class_embed.weight", "class_embed.bias"):
        assert torch.equal(loaded[key][0], trained[key][3])  # Star <- star
        assert torch.equal(loaded[key][1], trained[key][0])  # circle <- circle
        assert torch.equal(loaded[key][2], initial[key][2])  # hexagon: initialized
    assert torch.equal(loaded["bbox_embed.layers.0.weight"], trained["bbox_embed.layers.0.weight"])


@pytest.mark.parametrize("behaviour", ["reinit", "match_names"])
def test_a_checkpoint_of_the_model_classes_loads_whole(source, behaviour):
    # evaluating or resuming with the fine-tuning config must not touch a fine-tuned head
    path, trained = source
    loaded, _ = load(path, behaviour, class_names=SHAPES, num_classes=5)
    assert all(torch.equal(loaded[k], trained[k]) for k in loaded)


def test_same_count_other_names_is_fine_tuned_too(source):
    path, trained = source
    renamed = ["cross", "a", "b", "c", "circle"]
    loaded, initial = load(path, "match_names", class_names=renamed, num_classes=5)
    assert torch.equal(loaded["class_embed.weight"][0], trained["class_embed.weight"][4])
    assert torch.equal(loaded["class_embed.weight"][4], trained["class_embed.weight"][0])
    assert torch.equal(loaded["class_embed.weight"][1], initial["class_embed.weight"][1])


def test_match_names_needs_names_on_both_sides(source, tmp_path):
    path, trained = source
    nameless = tmp_path / "nameless.pth"
    torch.save({"model": trained}, nameless)
    with pytest.raises(ValueError, match=r"nameless\.pth stores no class names, which MODEL.WEIGHTS_CLASS_HEAD 'match_names' needs"):
        load(str(nameless), "match_names")
    with pytest.raises(ValueError, match=r"'match_names' needs the model's class names"):
        load(path, "match_names", class_names=None)
    # reinit needs no names
    loaded, initial = load(str(nameless), "reinit", class_names=None)
    assert torch.equal(loaded["class_embed.weight"], initial["class_embed.weight"])


def test_unknown_behaviour_names_key_and_value():
    with pytest.raises(ValueError, match=r"MODEL\.WEIGHTS_CLASS_HEAD must be one of .* got 'drop'"):
        ConditionalDETRCheckpointer(tiny_model(3), class_head="drop")


def test_every_class_head_key_of_a_per_layer_head():
    # Deformable DETR's shape: one head per decoder layer, and aliases under transformer.decoder
    def heads(num_rows, fill):
        state = {}
        for i in range(3):
            for prefix in ("", "transformer.decoder."):
                state[f"{prefix}class_embed.{i}.weight"] = torch.full((num_rows, 4), fill + i)
                state[f"{prefix}class_embed.{i}.bias"] = torch.full((num_rows,), fill + i)
        state["bbox_embed.0.layers.0.weight"] = torch.full((4, 4), fill)
        return state

    checkpoint, model = heads(4, 10.0), heads(3, 0.0)  # 3 + no-object -> 2 + no-object
    checkpoint["class_embed.1.weight"][1] = -1.0  # the row of "b"
    assert len(class_head_keys(checkpoint)) == 12
    summary = fine_tune_class_heads(checkpoint, model, "match_names", ["b", "z"], ["a", "b", "c"], model_no_object=1)
    assert summary.startswith("kept the class-head rows of 1 of 2 classes")
    assert torch.equal(checkpoint["class_embed.1.weight"][0], torch.full((4,), -1.0))  # b <- b
    assert torch.equal(checkpoint["class_embed.1.weight"][1], torch.full((4,), 1.0))  # z: the model's
    assert torch.equal(checkpoint["transformer.decoder.class_embed.2.bias"], torch.tensor([12.0, 2.0, 12.0]))
    assert torch.equal(checkpoint["bbox_embed.0.layers.0.weight"], torch.full((4, 4), 10.0))

    checkpoint = heads(4, 10.0)
    fine_tune_class_heads(checkpoint, model, "reinit")
    assert all(torch.equal(checkpoint[k], model[k]) for k in class_head_keys(model))


def test_names_that_do_not_fit_the_head():
    checkpoint = {"class_embed.weight": torch.zeros(5, 4)}
    with pytest.raises(ValueError, match=r"'class_embed.weight' of shape \(5, 4\) does not fit 3 class names"):
        fine_tune_class_heads(checkpoint, {"class_embed.weight": torch.zeros(2, 4)}, "match_names", ["a", "b"], ["a", "b", "c"])


def official_model(cfg, names):
    cfg.MODEL.DETR.NUM_CLASSES = len(names)
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("detr", [False, True], ids=["conditional_detr", "detr"])
def test_official_checkpoints_match_coco_names(detr):
    path = reference_file("official_detr_r18_tiny.pth" if detr else "official_r18_tiny.pth")
    official = official_formats.load_official_checkpoint(path)
    names = ["person", "zebra-crossing", "car"]
    model = official_model(tiny_detr_fixture_cfg() if detr else tiny_fixture_cfg(), names)
    initial = model.state_dict()["class_embed.weight"].clone()
    ConditionalDETRCheckpointer(model, class_names=names, class_head="match_names").load(str(path))
    weight = model.state_dict()["class_embed.weight"]
    # the official logits are indexed by COCO id: person 1, car 3; DETR's last is "no object"
    torch.testing.assert_close(weight[0], official["class_embed.weight"][1].float())
    torch.testing.assert_close(weight[2], official["class_embed.weight"][3].float())
    torch.testing.assert_close(weight[1], initial[1])
    if detr:
        torch.testing.assert_close(weight[3], official["class_embed.weight"][91].float())
    torch.testing.assert_close(
        model.state_dict()["query_embed.weight"], official["query_embed.weight"].float()
    )


def test_official_checkpoint_keep_names_the_switch():
    path = reference_file("official_r18_tiny.pth")
    model = official_model(tiny_fixture_cfg(), MINE)
    with pytest.raises(ValueError, match=r"official_r18_tiny\.pth: .*WEIGHTS_CLASS_HEAD to 'reinit' or 'match_names'"):
        ConditionalDETRCheckpointer(model).load(str(path))


def test_model_zoo_checkpoints_have_coco_names(tmp_path, monkeypatch):
    path = reference_file("official_r18_tiny.pth")
    monkeypatch.setenv("CONDITIONAL_DETR_CACHE", str(tmp_path))
    converted = official_formats.convert_state_dict(official_formats.load_official_checkpoint(path), 80)
    torch.save({"model": converted, "matching_heuristics": False}, tmp_path / "ConditionalDETR-R50-50ep.pth")
    model = official_model(tiny_fixture_cfg(), ["car", "person"])
    ConditionalDETRCheckpointer(model, class_names=["car", "person"], class_head="match_names").load(
        "conditional-detr://ConditionalDETR-R50-50ep"
    )
    weight = model.state_dict()["class_embed.weight"]
    assert COCO_CLASS_NAMES[2] == "car"
    torch.testing.assert_close(weight[0], converted["class_embed.weight"][2])
    torch.testing.assert_close(weight[1], converted["class_embed.weight"][0])


def test_deformable_detr_per_layer_heads(tmp_path):
    def deformable(num_classes):
        cfg = get_config(
            "configs/quick_schedules/deformable_detr_instant_test.yaml",
            ["MODEL.DEVICE", "cpu", "MODEL.DETR.NUM_CLASSES", str(num_classes)],
        )
        return build_model(cfg)

    source = deformable(5)
    ConditionalDETRCheckpointer(source, str(tmp_path), class_names=SHAPES).save("deformable")
    loaded, initial = load(str(tmp_path / "deformable.pth"), "match_names", model=deformable(3))
    keys = [k for k in loaded if "class_embed" in k]
    assert "class_embed.0.weight" in keys and "transformer.decoder.class_embed.0.weight" in keys
    # two-stage: the last head (after 2 decoder layers) scores proposals with its row 0
    proposal_keys = set(class_heads.proposal_head_keys(loaded))
    assert proposal_keys == {f"{p}class_embed.2.{n}" for p in ("", "transformer.decoder.") for n in ("weight", "bias")}
    for key in keys:
        if key in proposal_keys:
            assert torch.equal(loaded[key][0], source.state_dict()[key][0])  # the foreground row
            assert torch.equal(loaded[key][2], initial[key][2])  # the others follow the behaviour
            continue
        assert torch.equal(loaded[key][0], source.state_dict()[key][3])  # Star <- star
        assert torch.equal(loaded[key][2], initial[key][2])  # hexagon: initialized

    loaded, initial = load(str(tmp_path / "deformable.pth"), "reinit", model=deformable(3))
    for key in keys:
        if key in proposal_keys:
            assert torch.equal(loaded[key][0], source.state_dict()[key][0])
            assert torch.equal(loaded[key][1:], initial[key][1:])
        else:
            assert torch.equal(loaded[key], initial[key])
