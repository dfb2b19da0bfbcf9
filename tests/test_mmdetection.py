"""
MMDetection 3.x checkpoints: recognized by their keys, loaded by MODEL.WEIGHTS and the
converter, and giving MMDetection's own outputs on models that MMDetection builds on the fly
with random weights.
"""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from conditional_detr.checkpoint import ConditionalDETRCheckpointer, formats, mmdetection
from conditional_detr.engine import get_config

from helpers.mmdetection import build_mmdet_model, mmdet_checkpoint, mmdet_outputs
from helpers.paths import CONFIGS

# building the other library's models takes seconds each: make test runs these, make test-fast does not
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

CONDITIONAL_DETR = "conditional_detr/conditional-detr_r50_8xb2-50e_coco.py"
# MMDetection's config -> this project's config and MMDetection's format
MODELS = {
    CONDITIONAL_DETR: ("conditional_detr_R_50_50ep.yaml", mmdetection.CONDITIONAL_DETR),
    "detr/detr_r50_8xb2-500e_coco.py": ("detr_R_50_500ep.yaml", mmdetection.DETR),
    "deformable_detr/deformable-detr_r50_16xb2-50e_coco.py": ("deformable_detr_R_50_50ep.yaml", mmdetection.DEFORMABLE_DETR),
    "deformable_detr/deformable-detr-refine_r50_16xb2-50e_coco.py": (
        "deformable_detr_R_50_refine_50ep.yaml", mmdetection.DEFORMABLE_DETR
    ),
    "deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py": (
        "deformable_detr_R_50_two_stage_50ep.yaml", mmdetection.DEFORMABLE_DETR
    ),
}


def images():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8) for h, w in ((96, 128), (120, 88))]


def our_model(config, weights, ops_impl="pytorch"):
    cfg = get_config(f"{CONFIGS}/COCO-Detection/{config}", [
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.DETR.OPS_IMPL", ops_impl, "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
    ])
    model = build_model(cfg).eval()
    ConditionalDETRCheckpointer.from_config(cfg, model).load(str(weights))
    return model


@pytest.fixture(scope="module")
def conditional_detr(module_folder):
    mmdet_model = build_mmdet_model(CONDITIONAL_DETR)
    path = mmdet_checkpoint(mmdet_model, module_folder("mmdet") / "conditional_detr.pth")
    return mmdet_model, path


@pytest.fixture(scope="module", params=list(MODELS), ids=lambda config: config.split("/")[1].split("_")[0])
def built(request, module_folder):
    """MMDetection's model of a config, its checkpoint file, this project's config and the format."""
    mmdet_model = build_mmdet_model(request.param)
    path = mmdet_checkpoint(mmdet_model, module_folder("mmdet") / "model.pth")
    return (mmdet_model, path, *MODELS[request.param])


def test_each_format_recognizes_its_models(built):
    mmdet_model, _, _, expected = built
    assert formats.recognize(mmdet_model.state_dict()) is expected


@pytest.mark.parametrize("ops_impl", ["pytorch", "auto"])
def test_gives_mmdetection_outputs(built, ops_impl):
    mmdet_model, path, config, _ = built
    inputs = images()
    layer_logits, layer_boxes, predictions = mmdet_outputs(mmdet_model, inputs)
    model = our_model(config, path, ops_impl)
    with torch.no_grad():
        batch = model.preprocess_image([{"image": image.float()} for image in inputs])
        outputs = model.forward_outputs(ImageList(batch.tensor, batch.image_sizes))
        detections = model([{"image": image.float()} for image in inputs])
    ours = [*outputs["aux_outputs"], outputs]
    assert len(ours) == len(layer_logits) == 6
    for layer, (logits, boxes) in enumerate(zip(layer_logits, layer_boxes)):
        torch.testing.assert_close(ours[layer]["pred_logits"], logits, atol=1e-4, rtol=0, msg=f"layer {layer}")
        torch.testing.assert_close(ours[layer]["pred_boxes"], boxes, atol=1e-4, rtol=0, msg=f"layer {layer}")
    for result, expected in zip(detections, predictions):
        assert_same_detections(result["instances"], expected)


def assert_same_detections(instances, expected):
    """
    The same 100 (class, score, box) detections. Queries whose scores tie within rounding may
    swap places, and at the cut the 100th may be either of two such queries.
    """
    assert len(instances) == len(expected.scores) == 100
    # DETR's are in query order here, by score there
    torch.testing.assert_close(instances.scores.sort().values, expected.scores.sort().values, atol=1e-4, rtol=0)
    ours = torch.cat([instances.pred_classes[:, None].float(), instances.scores[:, None], instances.pred_boxes.tensor], 1)
    theirs = torch.cat([expected.labels[:, None].float(), expected.scores[:, None], expected.bboxes], 1)
    tolerance = torch.tensor([0, 1e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    close = ((ours[:, None] - theirs[None]).abs() <= tolerance).all(-1)  # [ours, theirs]
    at_the_cut = instances.scores <= instances.scores.min() + 1e-4
    assert (close.any(1) | at_the_cut).all(), "detections that MMDetection's lack"
    assert (close.any(0) | (expected.scores <= expected.scores.min() + 1e-4)).all(), "MMDetection's detections lacking"


def test_the_converter_reads_mmdetection_checkpoints(conditional_detr, tmp_path):
    from conditional_detr.tools import convert_official

    _, path = conditional_detr
    convert_official.main([str(path), str(tmp_path / "converted.pth")])
    converted = torch.load(tmp_path / "converted.pth")["model"]
    assert converted["class_embed.weight"].shape == (80, 256) and "input_proj.weight" in converted


def test_a_part_the_project_lacks_is_refused_by_name(conditional_detr, tmp_path):
    mmdet_model, _ = conditional_detr
    state_dict = dict(mmdet_model.state_dict())
    state_dict["neck.convs.0.gn.weight"] = torch.ones(256)  # a GroupNorm in the input projection
    path = tmp_path / "normalized_neck.pth"
    torch.save({"meta": {}, "state_dict": state_dict}, path)
    with pytest.raises(ValueError, match=r"has 'neck\.convs\.0\.gn\.weight', a part this project's ConditionalDETR does not have"):
        our_model("conditional_detr_R_50_50ep.yaml", path)


def test_other_class_counts_are_refused_unless_fine_tuned(conditional_detr):
    mmdet_model, path = conditional_detr
    cfg = get_config(f"{CONFIGS}/COCO-Detection/conditional_detr_R_50_50ep.yaml", [
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.DETR.NUM_CLASSES", 3, "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
    ])
    model = build_model(cfg)
    with pytest.raises(ValueError, match=r"cannot map MMDetection's 80 classes to 3.*WEIGHTS_CLASS_HEAD"):
        ConditionalDETRCheckpointer(model).load(str(path))
    checkpointer = ConditionalDETRCheckpointer(model, class_names=["person", "dog", "unicorn"], class_head="match_names")
    checkpointer.load(str(path))  # the checkpoint's meta names its classes: person and dog keep their rows
    source = mmdet_model.state_dict()["bbox_head.fc_cls.weight"]
    torch.testing.assert_close(model.class_embed.weight[0], source[0])  # person
    torch.testing.assert_close(model.class_embed.weight[1], source[16])  # dog


def test_detectron2_default_predictor_does_not_load_it_silently(conditional_detr):
    from detectron2.engine import DefaultPredictor

    _, path = conditional_detr
    cfg = get_config(f"{CONFIGS}/COCO-Detection/conditional_detr_R_50_50ep.yaml", [
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.WEIGHTS", str(path), "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
    ])
    with pytest.raises(ValueError):  # fvcore refuses the {"meta", "state_dict"} container
        DefaultPredictor(cfg)


def test_a_checkpoint_of_another_variant_is_refused(tmp_path):
    # box refinement gives each decoder layer heads of its own: a plain model would ignore them
    mmdet_model = build_mmdet_model("deformable_detr/deformable-detr-refine_r50_16xb2-50e_coco.py")
    path = mmdet_checkpoint(mmdet_model, tmp_path / "refine.pth")
    with pytest.raises(ValueError, match=r"refine\.pth: this open-mmlab/mmdetection checkpoint does not fit .*DeformableDETR.*WITH_BOX_REFINE"):
        our_model("deformable_detr_R_50_50ep.yaml", path)


def test_the_model_zoo_name_downloads_checks_and_converts(conditional_detr, local_server, tmp_path, monkeypatch):
    import hashlib

    from detectron2.utils.file_io import PathManager

    from conditional_detr.checkpoint.catalog import OFFICIAL_CHECKPOINTS, SCHEME, OfficialCheckpoint

    mmdet_model, path = conditional_detr
    source_format = mmdetection.CONDITIONAL_DETR
    name = "mmdet/conditional-detr_r50_8xb2-50e_coco"
    released = OFFICIAL_CHECKPOINTS[name]
    assert released.url.endswith("-c83a1dc0.pth") and released.sha256_prefix == "c83a1dc0"
    # the same entry, served from here: a file named as the release, its own hash prefix
    url, folder = local_server
    served = folder / "conditional-detr_r50_8xb2-50e_coco_20221121_180202-local.pth"
    served.write_bytes(path.read_bytes())
    digest = hashlib.sha256(served.read_bytes()).hexdigest()[:8]
    monkeypatch.setenv("CONDITIONAL_DETR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(OFFICIAL_CHECKPOINTS, name, OfficialCheckpoint(released.config, f"{url}/{served.name}", sha256_prefix=digest))
    cached = PathManager.get_local_path(SCHEME + name)
    converted = torch.load(cached)["model"]
    assert converted.keys() == source_format.convert(mmdet_model.state_dict()).keys()
    # a file whose hash is not the published one caches nothing
    monkeypatch.setitem(OFFICIAL_CHECKPOINTS, name, OfficialCheckpoint(released.config, f"{url}/{served.name}", sha256_prefix="00000000"))
    monkeypatch.setenv("CONDITIONAL_DETR_CACHE", str(tmp_path / "other-cache"))
    with pytest.raises(RuntimeError, match="failed.*nothing was cached"):
        PathManager.get_local_path(SCHEME + name)


@pytest.mark.parametrize(
    "change, difference",
    [
        (("style='pytorch'", "style='caffe'"), "a Caffe-style ResNet"),
        (("bgr_to_rgb=True", "bgr_to_rgb=False"), r"BGR input images"),
        (("123.675", "103.53"), r"the image normalization mean=\[103.53"),
        (("normalize=True", "normalize=True, offset=-0.5"), r"sine positions with offset=-0.5"),
    ],
)
def test_a_model_the_project_cannot_represent_is_refused_by_name(conditional_detr, tmp_path, change, difference):
    mmdet_model, _ = conditional_detr
    assert change[0] in mmdet_model.config_text
    path = mmdet_checkpoint(mmdet_model, tmp_path / "other.pth", mmdet_model.config_text.replace(*change, 1))
    with pytest.raises(ValueError, match=rf"other\.pth: MMDetection's ConditionalDETR here computes something this project's does not: {difference}"):
        our_model("conditional_detr_R_50_50ep.yaml", path)
