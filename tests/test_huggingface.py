"""
Hugging Face transformers checkpoints: save_pretrained folders of transformers' Conditional
DETR and DETR, built on the fly with random weights, loaded by MODEL.WEIGHTS and the
converter, give transformers' own outputs.
"""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from conditional_detr.checkpoint import ConditionalDETRCheckpointer, formats, huggingface
from conditional_detr.engine import get_config

from helpers.huggingface import build_hf_model, hf_outputs
from helpers.paths import CONFIGS

# building the other library's models takes seconds each: make test runs these, make test-fast does not
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


# transformers' model -> this project's config and the format
MODELS = {
    "ConditionalDetr": ("conditional_detr_R_50_50ep.yaml", huggingface.CONDITIONAL_DETR),
    "Detr": ("detr_R_50_500ep.yaml", huggingface.DETR),
}


@pytest.fixture(scope="module")
def conditional_detr(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "conditional-detr"
    return build_hf_model("ConditionalDetr", folder), folder


@pytest.fixture(scope="module", params=list(MODELS))
def built(request, tmp_path_factory):
    """transformers' model, its save_pretrained folder, this project's config and the format."""
    folder = tmp_path_factory.mktemp("hf") / request.param
    return (build_hf_model(request.param, folder), folder, *MODELS[request.param])


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


@pytest.mark.parametrize("ops_impl", ["pytorch", "auto"])
def test_gives_transformers_outputs(built, ops_impl):
    hf_model, folder, config, _ = built
    generator = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 96, 128), generator=generator, dtype=torch.uint8) for _ in range(2)]
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


def test_80_classes_take_the_coco_id_rows_and_the_converter_reads_folders(conditional_detr, tmp_path):
    from conditional_detr.tools import convert_official

    hf_model, folder = conditional_detr
    model = our_model(folder / "model.safetensors", num_classes=80)  # the weights file alone
    source = hf_model.state_dict()["class_labels_classifier.weight"]
    torch.testing.assert_close(model.class_embed.weight[0], source[1])  # person: COCO id 1
    torch.testing.assert_close(model.class_embed.weight[79], source[90])  # toothbrush: COCO id 90
    convert_official.main([str(folder), str(tmp_path / "converted.pth")])
    assert torch.load(tmp_path / "converted.pth")["model"]["class_embed.weight"].shape == (80, 256)


def test_a_setting_the_project_lacks_is_refused_by_name(conditional_detr, tmp_path):
    import json
    import shutil

    _, folder = conditional_detr
    other = tmp_path / "learned-positions"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    config["position_embedding_type"] = "learned"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"a transformers model this project cannot represent: position_embedding_type='learned'"):
        our_model(other)
