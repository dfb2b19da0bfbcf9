"""
DETR with its mask head (MODEL.MASK_ON) reproduces the official DETRsegm
(../shared/reference/official_detr_panoptic_r18_tiny*): its checkpoint loads as it is,
the raw logits, boxes and mask logits agree, and so do the losses, the mask terms
included; full-size DETR-R50 with the mask head takes every key of the official
panoptic model.
"""
import pytest
import torch
from detectron2.modeling import build_model

from conditional_detr.checkpoint import ConditionalDETRCheckpointer, formats
from conditional_detr.checkpoint import official as official_formats
from conditional_detr.tools import convert_checkpoint

from helpers.official import (
    assert_same_losses, detr_resnet_cfg, official_keys, reference_file, run, shrink_to_tiny_fixture,
)

PANOPTIC_CLASSES = 250  # COCO panoptic ids, "no object" after them
OFFICIAL_DETR_R50_PANOPTIC_PARAMETERS = 42_899_288


def panoptic_cfg(depth=18):
    cfg = detr_resnet_cfg(depth, PANOPTIC_CLASSES)
    cfg.MODEL.MASK_ON = True
    return shrink_to_tiny_fixture(cfg, num_queries=20) if depth == 18 else cfg


@pytest.fixture(scope="module")
def reference_io():
    return torch.load(reference_file("official_detr_panoptic_r18_tiny_io.pth"), map_location="cpu")


@pytest.fixture(scope="module")
def official_path():
    return reference_file("official_detr_panoptic_r18_tiny.pth")


@pytest.fixture(scope="module")
def model(official_path):
    model = build_model(panoptic_cfg()).eval()
    ConditionalDETRCheckpointer(model).load(str(official_path))  # as MODEL.WEIGHTS loads it
    return model


@pytest.fixture(scope="module")
def outputs(model, reference_io):
    return run(model, reference_io)


def test_the_format_is_recognized(official_path):
    state_dict = official_formats.read_file(official_path)["model"]
    assert formats.recognize(state_dict) is official_formats.DETR_PANOPTIC
    assert formats.recognize({k[len("detr."):]: v for k, v in state_dict.items() if k.startswith("detr.")}) is official_formats.DETR


def test_logits_boxes_and_masks_match(outputs, reference_io):
    raw = reference_io["raw"]
    torch.testing.assert_close(outputs["pred_logits"], raw["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs["pred_boxes"], raw["pred_boxes"], atol=1e-4, rtol=0)
    assert outputs["pred_masks"].shape == raw["pred_masks"].shape == (2, 20, 84, 122)  # stride 4 of 333x487
    torch.testing.assert_close(outputs["pred_masks"], raw["pred_masks"], atol=1e-4, rtol=0)


def test_losses_match_the_mask_terms_included(model, outputs, reference_io):
    # the official criterion ran in train mode with dropout 0: the eval outputs are its inputs
    assert {"loss_mask", "loss_dice"} < set(reference_io["losses"])
    assert "loss_mask_0" not in reference_io["losses"]  # the last layer's masks only
    assert_same_losses(model, outputs, reference_io)


def test_the_converter_reads_it_and_the_checkpoint_loads_the_same(official_path, tmp_path, model):
    path = tmp_path / "converted.pth"
    convert_checkpoint.main([str(official_path), str(path), "--num-classes", "250"])
    converted = torch.load(path)["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(converted[key], value, rtol=0, atol=0, msg=key)


def test_a_detection_model_refuses_it_by_name(official_path):
    cfg = panoptic_cfg()
    cfg.MODEL.MASK_ON = False
    with pytest.raises(ValueError, match=r"does not fit MODEL.META_ARCHITECTURE DETR as configured: 0 .* 32 are not the model's .*MODEL.MASK_ON"):
        ConditionalDETRCheckpointer(build_model(cfg)).load(str(official_path))


def test_r50_takes_every_key_of_the_official_panoptic_model():
    shapes = official_keys("official_detr_panoptic_r50_keys.txt")
    assert len(shapes) == 490
    fake_official = {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}
    converted = official_formats.DETR_PANOPTIC.convert(fake_official, num_classes=PANOPTIC_CLASSES)
    model = build_model(panoptic_cfg(depth=50))
    model_state = model.state_dict()
    assert set(converted) == set(model_state)
    for key, value in converted.items():
        assert value.shape == model_state[key].shape, key
    # every parameter, the frozen stem and res2 included, as the official count
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_DETR_R50_PANOPTIC_PARAMETERS


def test_full_image_masks_are_the_official_segm_post_processing(reference_io):
    from conditional_detr.modeling.postprocess import full_image_masks

    images = reference_io["images_uint8_rgb"]
    padded = (max(i.shape[1] for i in images), max(i.shape[2] for i in images))
    for image, logits, official in zip(images, reference_io["crafted"]["pred_masks"], reference_io["segm"]):
        size = tuple(image.shape[1:])
        masks = full_image_masks(logits, padded, size, size)
        assert masks.shape == official["masks"][:, 0].shape
        # bilinear upsampling and a threshold: equal but for float rounding at a mask's edge
        assert (masks != official["masks"][:, 0].bool()).float().mean() < 1e-5


def test_panoptic_segmentation_is_the_official_post_processing_segment_for_segment(reference_io):
    from conditional_detr.modeling.postprocess import panoptic_queries, panoptic_segmentation

    crafted = reference_io["crafted"]
    thing_classes = torch.arange(PANOPTIC_CLASSES) <= 90  # the official is_thing_map
    for i, (image, official) in enumerate(zip(reference_io["images_uint8_rgb"], reference_io["panoptic"])):
        size = tuple(image.shape[1:])
        kept, scores, labels = panoptic_queries(crafted["pred_logits"][i], "softmax")
        segment_ids, segments = panoptic_segmentation(scores, labels, crafted["pred_masks"][i][kept], size, size, thing_classes)
        assert len(segments) == len(official["segments_info"]) > 1
        assert any(not s["isthing"] for s in segments) and any(s["isthing"] for s in segments)
        for ours, theirs in zip(segments, official["segments_info"]):  # in query order, ids from 0 there
            assert (ours["category_id"], ours["isthing"], ours["area"]) == (
                theirs["category_id"], theirs["isthing"], theirs["area"]
            )
            assert torch.equal(segment_ids == ours["id"], official["segment_ids"] == theirs["id"])
        assert (segment_ids > 0).all()  # the official assignment leaves no pixel unassigned


def test_the_250_ids_become_detectron2s_133_panoptic_categories(official_path):
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    state_dict = official_formats.read_file(official_path)["model"]
    converted = official_formats.DETR_PANOPTIC.convert(state_dict, num_classes=133)
    official = state_dict["detr.class_embed.weight"].float()
    assert converted["class_embed.weight"].shape == (134, 256)  # + "no object"
    for row, category in enumerate(COCO_CATEGORIES):  # things and stuff, in detectron2's order
        assert torch.equal(converted["class_embed.weight"][row], official[category["id"]]), category["name"]
    assert torch.equal(converted["class_embed.weight"][133], official[250])
    names = official_formats.DETR_PANOPTIC.class_names(133)
    assert names[0] == "person" and names[-1] == COCO_CATEGORIES[-1]["name"] and len(names) == 133
    cfg = panoptic_cfg()
    cfg.MODEL.DETR.NUM_CLASSES = 133
    ConditionalDETRCheckpointer(build_model(cfg)).load(str(official_path))  # MODEL.WEIGHTS maps them too


def test_the_model_zoo_names_download_and_map_to_the_133_categories(official_path, local_server, tmp_path, monkeypatch):
    import hashlib

    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
    from detectron2.utils.file_io import PathManager

    from conditional_detr.checkpoint.catalog import OFFICIAL_CHECKPOINTS, SCHEME, OfficialCheckpoint

    released = OFFICIAL_CHECKPOINTS["DETR-R50-panoptic"]
    assert released.url == "https://dl.fbaipublicfiles.com/detr/detr-r50-panoptic-00ce5173.pth"
    assert (released.sha256_prefix, released.num_classes) == ("00ce5173", 133)
    assert released.config == "COCO-PanopticSegmentation/detr_R_50_panoptic.yaml"
    # the tiny official model served from here under the same entry
    url, folder = local_server
    (folder / "tiny-panoptic.pth").write_bytes(official_path.read_bytes())
    digest = hashlib.sha256(official_path.read_bytes()).hexdigest()[:8]
    monkeypatch.setitem(OFFICIAL_CHECKPOINTS, "DETR-R50-panoptic", OfficialCheckpoint(
        released.config, f"{url}/tiny-panoptic.pth", sha256_prefix=digest, num_classes=133,
    ))
    monkeypatch.setenv("CONDITIONAL_DETR_CACHE", str(tmp_path / "cache"))
    cached = torch.load(PathManager.get_local_path(SCHEME + "DETR-R50-panoptic"))
    assert cached["model"]["class_embed.weight"].shape == (134, 256)
    assert cached["class_names"] == [c["name"] for c in COCO_CATEGORIES]
    cfg = panoptic_cfg()
    cfg.MODEL.DETR.NUM_CLASSES = 133
    ConditionalDETRCheckpointer(build_model(cfg)).load(SCHEME + "DETR-R50-panoptic")
