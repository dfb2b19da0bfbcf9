"""tools/export: TorchScript and ONNX (in onnxruntime) against the eager model's detections."""
import json
import os

import onnxruntime
import pytest
import torch
from detectron2.modeling import build_model

from conditional_detr.engine import get_config
from conditional_detr.modeling.postprocess import full_image_masks
from conditional_detr.tools import export

from helpers.paths import QUICK_SCHEDULES

_DETR = ["MODEL.META_ARCHITECTURE", "DETR", "MODEL.DETR.CLASS_LOSS", "softmax"]
# the mask head, at widths its GroupNorms take
_MASKS = ["MODEL.MASK_ON", "True", "MODEL.DETR.HIDDEN_DIM", "128", "MODEL.DETR.NHEADS", "8"]
MODELS = {
    "ConditionalDETR": ("conditional_detr_instant_test.yaml", []),
    "DETR": ("conditional_detr_instant_test.yaml", _DETR),
    "DeformableDETR": ("deformable_detr_instant_test.yaml", []),
    "DETR-masks": ("conditional_detr_instant_test.yaml", _DETR + _MASKS + ["MODEL.RESNETS.OUT_FEATURES", "['res5']"]),
    "DeformableDETR-masks": ("deformable_detr_instant_test.yaml", _MASKS),
}
EXPORT_SIZE = (64, 80)
OTHER_SIZE = (48, 100)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, module_folder):
    config, opts = MODELS[request.param]
    config = os.path.join(QUICK_SCHEDULES, config)
    opts = ["MODEL.DEVICE", "cpu", *opts]
    folder = module_folder(request.param)
    # class scores spread apart (not saturated), so that rounding does not decide the top-k order
    torch.manual_seed(0)
    model = build_model(get_config(config, opts))
    for name, p in model.named_parameters():
        if "class_embed" in name:
            p.data.normal_(0.0, 0.1)
    weights = str(folder / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    description = export.main(
        ["--config-file", config, "--output", str(folder), "--height", str(EXPORT_SIZE[0]),
         "--width", str(EXPORT_SIZE[1]), *opts, "MODEL.WEIGHTS", weights]
    )
    model.eval()
    return request.param.split("-")[0], model, description


def runners(description):
    session = onnxruntime.InferenceSession(description["files"]["onnx"], providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(description["files"]["torchscript"])

    def run_onnx(images, sizes):
        return [torch.from_numpy(x) for x in session.run(None, {"images": images.numpy(), "image_sizes": sizes.numpy()})]

    return {"onnx": run_onnx, "torchscript": scripted}


def cases(architecture):
    return [(h, w, batch) for h, w in (EXPORT_SIZE, OTHER_SIZE) for batch in (1, 2)]


def batch_of(height, width, batch):
    generator = torch.Generator().manual_seed(height * 10 + batch)
    images = torch.randint(0, 256, (batch, 3, height, width), generator=generator).float()
    sizes = torch.tensor([[height, width], [height - 9, width - 13]][:batch])
    return images, sizes


@pytest.mark.slow
def test_exported_models_give_the_eager_detections(exported):
    architecture, model, description = exported
    for kind, run in runners(description).items():
        for height, width, batch in cases(architecture):
            images, sizes = batch_of(height, width, batch)
            with torch.no_grad():
                eager = model([{"image": images[i, :, :h, :w].to(torch.uint8)} for i, (h, w) in enumerate(sizes.tolist())])
                scores, labels, boxes, *masks = run(images, sizes)
            assert scores.shape[0] == batch, (kind, height, width, batch)
            assert len(masks) == int(model.mask_on)
            for i, output in enumerate(eager):
                instances = output["instances"]
                kept = (boxes[i][:, 2] > boxes[i][:, 0]) & (boxes[i][:, 3] > boxes[i][:, 1])  # detectron2 drops empty boxes
                assert len(instances) == int(kept.sum()) > 0
                where = f"{kind} {height}x{width} batch {batch} image {i}"
                torch.testing.assert_close(scores[i][kept], instances.scores, atol=1e-4, rtol=0, msg=where)
                torch.testing.assert_close(boxes[i][kept], instances.pred_boxes.tensor, atol=1e-4, rtol=0, msg=where)
                assert torch.equal(labels[i][kept], instances.pred_classes), where
                if masks:  # the full-image masks of the exported logits, as the eager model makes them
                    full = full_image_masks(masks[0][i][kept], (height, width), sizes[i].tolist(), sizes[i].tolist())
                    assert (full != instances.pred_masks).float().mean() < 1e-3, where


@pytest.mark.slow
def test_export_description(exported):
    architecture, model, description = exported
    with open(os.path.join(os.path.dirname(description["files"]["onnx"]), "export.json")) as f:
        assert json.load(f) == json.loads(json.dumps(description))
    assert description["meta_architecture"] == architecture
    assert description["thing_classes"] == ["circle", "rectangle", "triangle", "star", "cross"]
    assert description["dynamic_batch"] == {"torchscript": True, "onnx": True}
    assert description["dynamic_image_size"] == {"torchscript": True, "onnx": True}


def test_padding_mask_from_a_size_tensor_is_the_official_one():
    # the model computes its masks from image sizes that an export keeps as a tensor
    from conditional_detr.modeling.backbone import feature_padding_mask

    sizes = [(37, 50), (64, 21), (64, 64)]
    official = torch.ones(len(sizes), 64, 64, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        official[i, :h, :w] = False
    for feature_size in ((2, 2), (5, 7), (64, 64)):
        expected = torch.nn.functional.interpolate(official[None].float(), size=feature_size).bool()[0]
        assert torch.equal(feature_padding_mask(sizes, (64, 64), feature_size, "cpu"), expected)
        assert torch.equal(feature_padding_mask(torch.tensor(sizes), (64, 64), feature_size), expected)


def test_tiny_example_size_is_refused():
    with pytest.raises(SystemExit):
        export.parse_args(["--config-file", "x", "--output", "y", "--height", "8"])


def test_differences_are_reported_per_case():
    class Broken(torch.nn.Module):
        def forward(self, images, sizes):
            raise RuntimeError("fixed at another size")

    model = build_model(get_config(os.path.join(QUICK_SCHEDULES, MODELS["ConditionalDETR"][0]), ["MODEL.DEVICE", "cpu"])).eval()
    exportable = export.ExportableDetector(model)
    shifted = lambda images, sizes: [x + 1 if x.is_floating_point() else x for x in exportable(images, sizes)]  # noqa: E731
    results = export.check_exported(exportable, shifted, [(64, 64, 1)])
    assert results["64x64 batch 1"]["scores"] == pytest.approx(1.0) and not export._agrees(results["64x64 batch 1"])
    swapped = lambda images, sizes: [x.flip(1) for x in exportable(images, sizes)]  # noqa: E731
    assert not export._agrees(export.check_exported(exportable, swapped, [(64, 64, 1)])["64x64 batch 1"])
    results = export.check_exported(exportable, Broken(), [(64, 64, 2)])
    assert results == {"64x64 batch 2": {"error": "RuntimeError: fixed at another size"}}
    assert export._agrees(export.check_exported(exportable, exportable, [(64, 64, 1)])["64x64 batch 1"])
