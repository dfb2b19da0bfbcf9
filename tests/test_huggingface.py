"""
Hugging Face transformers checkpoints: save_pretrained folders of transformers' Conditional
DETR, DETR and Deformable DETR (plain, box refinement, two-stage), built on the fly with
random weights, loaded by MODEL.WEIGHTS and the converter, give transformers' own outputs.
"""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from conditional_detr.checkpoint import ConditionalDETRCheckpointer, formats, huggingface
from conditional_detr.engine import get_config

from helpers.huggingface import build_hf_model, hf_outputs, import_transformers
from helpers.paths import CONFIGS

# building the other library's models takes seconds each: make test runs these, make test-fast does not
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


# transformers' model and its settings -> this project's config and the format
MODELS = {
    "ConditionalDetr": ({}, "conditional_detr_R_50_50ep.yaml", huggingface.CONDITIONAL_DETR),
    "Detr": ({}, "detr_R_50_500ep.yaml", huggingface.DETR),
    "DeformableDetr": ({}, "deformable_detr_R_50_50ep.yaml", huggingface.DEFORMABLE_DETR),
    "DeformableDetr-refine": ({"with_box_refine": True}, "deformable_detr_R_50_refine_50ep.yaml", huggingface.DEFORMABLE_DETR),
    "DeformableDetr-two-stage": (
        {"with_box_refine": True, "two_stage": True}, "deformable_detr_R_50_two_stage_50ep.yaml", huggingface.DEFORMABLE_DETR
    ),
}


@pytest.fixture(scope="module")
def conditional_detr(module_folder):
    folder = module_folder("hf") / "conditional-detr"
    return build_hf_model("ConditionalDetr", folder), folder


@pytest.fixture(scope="module", params=list(MODELS))
def built(request, module_folder):
    """transformers' model, its save_pretrained folder, this project's config and the format."""
    settings, config, source_format = MODELS[request.param]
    folder = module_folder("hf") / request.param
    return build_hf_model(request.param.split("-")[0], folder, **settings), folder, config, source_format


def our_model(weights, num_classes=91, ops_impl="pytorch", config="conditional_detr_R_50_50ep.yaml"):
    cfg = get_config(f"{CONFIGS}/COCO-Detection/{config}", [
        "MODEL.DEVICE", "cpu", "MODEL.DETR.NUM_CLASSES", num_classes, "MODEL.DETR.OPS_IMPL", ops_impl,
        "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
    ])
    model = build_model(cfg).eval()
    ConditionalDETRCheckpointer.from_config(cfg, model).load(str(weights))
    return model


def test_each_format_recognizes_its_models(built):
    _, folder, _, expected = built
    state_dict, config = huggingface.read_pretrained(str(folder))
    assert formats.recognize(state_dict) is expected
    assert config["architectures"] == [f"{expected.architecture.replace('DETR', 'Detr')}ForObjectDetection"]
    assert formats.recognize(expected.convert(state_dict, None)) is None  # converted: this project's own


@pytest.mark.parametrize("ops_impl", ["pytorch", "auto"])
def test_gives_transformers_outputs(built, ops_impl):
    hf_model, folder, config, _ = built
    generator = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 128, 160), generator=generator, dtype=torch.uint8) for _ in range(2)]
    expected = hf_outputs(hf_model, images)
    model = our_model(folder, ops_impl=ops_impl, config=config)  # the 91 COCO-id logits as they are
    with torch.no_grad():
        batch = model.preprocess_image([{"image": image.float()} for image in images])
        outputs = model.forward_outputs(ImageList(batch.tensor, batch.image_sizes))
    ours = [*outputs["aux_outputs"], outputs]
    assert len(ours) == len(expected) == 6
    for layer, (logits, boxes) in enumerate(expected):
        torch.testing.assert_close(ours[layer]["pred_logits"], logits, atol=1e-4, rtol=0, msg=f"layer {layer}")
        torch.testing.assert_close(ours[layer]["pred_boxes"], boxes, atol=1e-4, rtol=0, msg=f"layer {layer}")
    processor = getattr(import_transformers(), type(hf_model).__name__.replace("ForObjectDetection", "ImageProcessor"))()
    assert_same_detections(model, images[0].shape[1:], processor, *expected[-1])


def test_80_classes_take_the_coco_id_rows_and_the_converter_reads_folders(conditional_detr, tmp_path):
    from conditional_detr.tools import convert_official

    hf_model, folder = conditional_detr
    model = our_model(folder / "model.safetensors", num_classes=80)  # the weights file alone
    source = hf_model.state_dict()["class_labels_classifier.weight"]
    torch.testing.assert_close(model.class_embed.weight[0], source[1])  # person: COCO id 1
    torch.testing.assert_close(model.class_embed.weight[79], source[90])  # toothbrush: COCO id 90
    convert_official.main([str(folder), str(tmp_path / "converted.pth")])
    assert torch.load(tmp_path / "converted.pth")["model"]["class_embed.weight"].shape == (80, 256)


def edited_copy(folder, destination, **settings):
    """A copy of the save_pretrained `folder` whose config.json has `settings` changed."""
    import json
    import shutil

    shutil.copytree(folder, destination)
    config = json.loads((destination / "config.json").read_text())
    config.update(settings)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.parametrize("settings, refused", [
    ({"position_embedding_type": "learned"}, "position_embedding_type='learned'"),
    ({"activation_function": "gelu"}, "activation_function='gelu'"),
    ({"backbone_config": {"model_type": "timm_backbone", "backbone": "resnet18"}}, "backbone='resnet18'"),
    ({"encoder_attention_heads": 4}, "encoder_attention_heads=4 and decoder_attention_heads=8 differ, one MODEL.DETR.NHEADS here"),
])
def test_a_setting_the_project_lacks_is_refused_by_name(conditional_detr, tmp_path, settings, refused):
    other = edited_copy(conditional_detr[1], tmp_path / "other", **settings)
    with pytest.raises(ValueError, match=rf"a transformers model this project cannot represent: {refused}"):
        our_model(other)


def test_settings_that_leave_the_weights_as_they_are_are_checked_against_the_config(conditional_detr, tmp_path):
    # a dilated res5 (DC5) and fewer heads give tensors of the same shapes: only config.json tells
    other = edited_copy(
        conditional_detr[1], tmp_path / "dc5", dilation=True, encoder_attention_heads=4, decoder_attention_heads=4
    )
    with pytest.raises(ValueError, match=r"describes another model than the one configured; set "
                       r"MODEL.DETR.NHEADS 4 \(the model's: 8\); MODEL.RESNETS.RES5_DILATION 2 \(the model's: 1\)"):
        our_model(other)


def test_a_model_of_another_layout_or_size_is_refused(tmp_path):
    import shutil

    def weights_alone(folder):
        """Its weights without config.json: only their keys and shapes tell."""
        alone = tmp_path / f"{folder.name}-weights" / "model.safetensors"
        alone.parent.mkdir()
        shutil.copy(folder / "model.safetensors", alone)
        return alone

    refine = tmp_path / "refine"
    build_hf_model("DeformableDetr", refine, with_box_refine=True)
    with pytest.raises(ValueError, match=r"describes another model .* set MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE True"):
        our_model(refine, config="deformable_detr_R_50_50ep.yaml")
    with pytest.raises(ValueError, match=r"does not fit MODEL.META_ARCHITECTURE DeformableDETR as configured: 0 of .*(?s:.*)WITH_BOX_REFINE"):
        our_model(weights_alone(refine), config="deformable_detr_R_50_50ep.yaml")
    fewer_points = tmp_path / "fewer-points"
    build_hf_model("DeformableDetr", fewer_points, encoder_n_points=2, decoder_n_points=2)
    with pytest.raises(ValueError, match=r"set MODEL.DEFORMABLE_DETR.ENC_N_POINTS 2 \(the model's: 4\); MODEL.DEFORMABLE_DETR.DEC_N_POINTS 2"):
        our_model(fewer_points, config="deformable_detr_R_50_50ep.yaml")
    with pytest.raises(ValueError, match=r"tensors differ in shape, such as transformer.encoder.layers.0.self_attn.sampling_offsets"):
        our_model(weights_alone(fewer_points), config="deformable_detr_R_50_50ep.yaml")


def hub_files(hf_folder, destination):
    """The files of a hub repository as transformers 4 wrote them: pytorch_model.bin and config.json."""
    import shutil

    from safetensors.torch import load_file

    destination.mkdir(parents=True)
    torch.save(load_file(hf_folder / "model.safetensors"), destination / "pytorch_model.bin")
    shutil.copy(hf_folder / "config.json", destination / "config.json")
    return destination


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_detectron2_default_predictor_loads_the_weights_file(conditional_detr, tmp_path, weights_file):
    from detectron2.engine import DefaultPredictor

    hf_model, folder = conditional_detr
    if weights_file == "pytorch_model.bin":
        folder = hub_files(folder, tmp_path / "hub")
    cfg = get_config(f"{CONFIGS}/COCO-Detection/conditional_detr_R_50_50ep.yaml", [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(folder / weights_file), "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
    ])
    model = DefaultPredictor(cfg).model  # 80 classes: the COCO-id rows, as the checkpointer takes them
    expected = our_model(folder, num_classes=80)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_detectron2_default_predictor_refuses_a_model_of_another_layout(tmp_path):
    from detectron2.engine import DefaultPredictor

    build_hf_model("DeformableDetr", tmp_path / "refine", with_box_refine=True)
    cfg = get_config(f"{CONFIGS}/COCO-Detection/deformable_detr_R_50_50ep.yaml", [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(tmp_path / "refine" / "model.safetensors"),
        "MODEL.DETR.NUM_CLASSES", 91, "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
    ])  # with 80 classes detectron2 would drop its class heads (named as this project's), an error too
    with pytest.raises(ValueError, match=r"this huggingface/transformers state dict does not fit .*DeformableDETR.*WITH_BOX_REFINE"):
        DefaultPredictor(cfg)


def test_the_model_zoo_name_downloads_the_weights_and_config(conditional_detr, local_server, tmp_path, monkeypatch):
    import json

    from detectron2.utils.file_io import PathManager

    from conditional_detr.checkpoint.catalog import OFFICIAL_CHECKPOINTS, SCHEME, OfficialCheckpoint

    hf_model, folder = conditional_detr
    name = "hf/microsoft/conditional-detr-resnet-50"
    released = OFFICIAL_CHECKPOINTS[name]
    assert released.url == "https://huggingface.co/microsoft/conditional-detr-resnet-50/resolve/main/pytorch_model.bin"
    assert released.companions == ("config.json",)
    # the same entry, served from here under the hub's paths
    url, served = local_server
    repository = hub_files(folder, served / "microsoft/conditional-detr-resnet-50/resolve/main")
    local = OfficialCheckpoint(released.config, f"{url}/microsoft/conditional-detr-resnet-50/resolve/main/pytorch_model.bin",
                               companions=released.companions)
    monkeypatch.setitem(OFFICIAL_CHECKPOINTS, name, local)
    monkeypatch.setenv("CONDITIONAL_DETR_CACHE", str(tmp_path / "cache"))
    model = our_model(SCHEME + name, num_classes=80)
    expected = our_model(folder, num_classes=80)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # the config.json beside the weights is read: a setting the project lacks caches nothing
    config = json.loads((repository / "config.json").read_text())
    (repository / "config.json").write_text(json.dumps({**config, "position_embedding_type": "learned"}))
    monkeypatch.setenv("CONDITIONAL_DETR_CACHE", str(tmp_path / "other-cache"))
    with pytest.raises(ValueError, match=r"hf/microsoft/conditional-detr-resnet-50: .*position_embedding_type='learned'.*nothing was cached"):
        PathManager.get_local_path(SCHEME + name)


# the project's configs written out: (config, transformers' model class)
EXPORTS = {
    "ConditionalDETR": ("conditional_detr_R_50_50ep.yaml", "ConditionalDetrForObjectDetection"),
    "DETR": ("detr_R_50_500ep.yaml", "DetrForObjectDetection"),
    "DeformableDETR-refine": ("deformable_detr_R_50_refine_50ep.yaml", "DeformableDetrForObjectDetection"),
    "DeformableDETR-two-stage": ("deformable_detr_R_50_two_stage_50ep.yaml", "DeformableDetrForObjectDetection"),
}
CLASS_NAMES = ["apple", "pear", "plum"]


def trained_here(config, path, seed=0):
    """A checkpoint of this project's model of `config` for 3 classes, every tensor random (as after training)."""
    cfg = get_config(f"{CONFIGS}/COCO-Detection/{config}", [
        "MODEL.DEVICE", "cpu", "MODEL.DETR.NUM_CLASSES", 3, "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
    ])
    model = build_model(cfg).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator) * 0.05
                tensor.copy_(noise.abs() + 0.5 if name.endswith("running_var") else tensor + noise)
    ConditionalDETRCheckpointer(model, str(path.parent), class_names=CLASS_NAMES).save(path.stem)
    return cfg, model


def assert_same_detections(model, image_size, processor, logits, boxes):
    """
    This project's post-processing (`model.inference` and detectron2's `detector_postprocess`)
    gives what transformers' image `processor` gives from the same last-layer `logits` and
    `boxes` (checked within 1e-4 of this project's beside): the same detections in order,
    boxes once clipped to the image as detectron2 clips them. Fed the same tensors, the two
    break ties among a random model's near-equal scores alike.
    """
    from detectron2.modeling import detector_postprocess

    height, width = image_size
    theirs = processor.post_process_object_detection(
        type("Output", (), {"logits": logits, "pred_boxes": boxes}), threshold=0.0, target_sizes=[image_size] * len(logits)
    )
    ours = model.inference(logits, boxes, [image_size] * len(logits))
    for our_image, their_image in zip(ours, theirs):
        instances = detector_postprocess(our_image, height, width)
        # both in the same order: the top-k's (focal), or the queries' (DETR)
        their_boxes = their_image["boxes"].clone()
        their_boxes[:, 0::2] = their_boxes[:, 0::2].clamp(0, width)
        their_boxes[:, 1::2] = their_boxes[:, 1::2].clamp(0, height)
        assert len(instances) == len(their_boxes) > 0
        torch.testing.assert_close(instances.scores, their_image["scores"], atol=1e-6, rtol=0)
        assert torch.equal(instances.pred_classes, their_image["labels"])
        torch.testing.assert_close(instances.pred_boxes.tensor, their_boxes, atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", list(EXPORTS))
def test_a_model_of_this_project_written_out_gives_its_detections_in_transformers(name, tmp_path):
    from conditional_detr.tools import convert_checkpoint

    transformers = import_transformers()
    config, model_class = EXPORTS[name]
    cfg, model = trained_here(config, tmp_path / "trained.pth")
    folder = tmp_path / "hf"
    convert_checkpoint.main([
        str(tmp_path / "trained.pth"), "--to", "hf", str(folder), "--config-file", f"{CONFIGS}/COCO-Detection/{config}",
        "MODEL.DETR.NUM_CLASSES", "3",
    ])
    hf_model = getattr(transformers, model_class).from_pretrained(folder).eval()
    assert hf_model.config.id2label == dict(enumerate(CLASS_NAMES))
    generator = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 128, 160), generator=generator, dtype=torch.uint8) for _ in range(2)]
    expected = hf_outputs(hf_model, images)
    with torch.no_grad():
        batch = model.preprocess_image([{"image": image.float()} for image in images])
        outputs = model.forward_outputs(ImageList(batch.tensor, batch.image_sizes))
    (logits, boxes), = expected  # the last layer's: written without auxiliary_loss (see transformers_config)
    torch.testing.assert_close(outputs["pred_logits"], logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs["pred_boxes"], boxes, atol=1e-4, rtol=0)
    # the detections: this project's inference and transformers' image processor's post-processing
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    assert processor.image_mean == pytest.approx([0.485, 0.456, 0.406])
    assert_same_detections(model, images[0].shape[1:], processor, logits, boxes)
    # and back: the same tensors, the same class names
    back = build_model(cfg).eval()
    checkpointer = ConditionalDETRCheckpointer(back, class_names=CLASS_NAMES)
    checkpointer.load(str(folder))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("config, change, refused", [
    ("conditional_detr_R_50_50ep.yaml", ["MODEL.CONDITIONAL_DETR.SPATIAL_QUERY", "CSQ-T"],
     r"MODEL.CONDITIONAL_DETR.SPATIAL_QUERY 'CSQ-T' \(transformers': 'CSQ'\)"),
    ("conditional_detr_R_50_50ep.yaml", ["MODEL.DETR.CLASS_LOSS", "softmax"], r"MODEL.DETR.CLASS_LOSS 'softmax'"),
    ("detr_R_50_500ep.yaml", ["INPUT.FORMAT", "BGR"], r"INPUT.FORMAT 'BGR'"),
])
def test_a_model_without_a_transformers_equivalent_is_refused_by_name(tmp_path, config, change, refused):
    from conditional_detr.tools import convert_checkpoint

    trained_here(config, tmp_path / "trained.pth")
    with pytest.raises(ValueError, match=rf"has no transformers equivalent: {refused}"):
        convert_checkpoint.main([
            str(tmp_path / "trained.pth"), "--to", "hf", str(tmp_path / "hf"),
            "--config-file", f"{CONFIGS}/COCO-Detection/{config}", "MODEL.DETR.NUM_CLASSES", "3", *change,
        ])
    assert not (tmp_path / "hf").exists()
