"""
Export the inference model of a config as TorchScript and ONNX, with a dynamic batch
size and a dynamic image size, for any detector of the package (Conditional DETR, DETR,
Deformable DETR).

    python -m conditional_detr.tools.export --config-file FILE --output DIR
        [--format torchscript onnx] [--height 800 --width 1216] [KEY VALUE ...]   e.g. MODEL.WEIGHTS W

Writes DIR/model.ts (TorchScript) and DIR/model.onnx, and DIR/export.json describing them.

Inputs:
    images       [batch, 3, height, width] float32: pixel values (0-255) in INPUT.FORMAT,
                 resized as the caller wants (the config's test size: INPUT.MIN_SIZE_TEST),
                 each image at the top left of the batch tensor; the padding may hold anything.
    image_sizes  [batch, 2] int64: (height, width) of each image in the batch tensor.
Outputs:
    scores       [batch, K] float32; K is TEST.DETECTIONS_PER_IMAGE (focal loss) or NUM_OBJECT_QUERIES (softmax).
    labels       [batch, K] int64, contiguous class indices (the metadata's thing_classes).
    boxes        [batch, K, 4] float32, XYXY in the pixels of each image, clipped to it.
    mask_logits  (MODEL.MASK_ON) [batch, K, height / 4, width / 4] float32: each detection's mask
                 logits at stride 4 of the batch tensor; upsample them bilinearly to (height,
                 width), crop to the image and keep the positive ones for its full-image mask,
                 as the eager model's `postprocess.full_image_masks` does.
The detections are those of the model's own post-processing; detectron2 also drops boxes
that clipping left empty, which a fixed-size output keeps (with their scores).

The compiled attention ops are exported as their PyTorch reference
(MODEL.DETR.OPS_IMPL "pytorch"), so that the files run anywhere.
"""

import argparse
import json
import logging
import os

import torch
from detectron2.structures import ImageList
from detectron2.utils.logger import setup_logger
from torch import nn

from ..config import get_config
from ..data.datasets import model_class_names
from ..modeling.postprocess import detections
from .inference import build_eval_model

__all__ = ["ExportableDetector", "export_torchscript", "export_onnx", "main"]

FORMATS = ("torchscript", "onnx")
INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("scores", "labels", "boxes")

logger = logging.getLogger("detectron2")


class ExportableDetector(nn.Module):
    """
    A detector of the package (a `SetPredictionDetector`) on tensors: (images, image_sizes)
    -> (scores, labels, boxes), as described in this module's docstring.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, image_sizes):
        model = self.model
        height, width = images.shape[-2:]
        inside = (torch.arange(height, device=images.device)[None, :, None] < image_sizes[:, 0, None, None]) & (
            torch.arange(width, device=images.device)[None, None, :] < image_sizes[:, 1, None, None]
        )  # [batch, H, W]
        # normalized, then zero in the padding, as `preprocess_image` pads
        images = (images - model.pixel_mean) / model.pixel_std * inside[:, None].to(images.dtype)
        # the image sizes stay a tensor, so that the padding masks stay dynamic in the trace
        outputs = model.forward_outputs(ImageList(images, image_sizes), lazy_masks=True)
        scores, labels, boxes, queries = detections(
            outputs["pred_logits"], outputs["pred_boxes"], image_sizes, model.class_loss, model.num_topk
        )
        # detectron2's clipping to each image
        sizes = image_sizes.to(boxes.dtype)
        limits = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=-1)[:, None]
        boxes = torch.minimum(torch.clamp(boxes, min=0), limits)
        if not model.mask_on:
            return scores, labels, boxes
        # the mask logits of each detection's query, for its queries only
        batch_index = torch.arange(queries.shape[0], device=queries.device)[:, None].expand_as(queries)
        masks = outputs["mask_predictor"](batch_index.flatten(), queries.flatten())
        return scores, labels, boxes, masks.view(*queries.shape, *masks.shape[-2:])


def example_inputs(cfg, height, width, batch=2, device=None):
    """A batch of random images, the later ones smaller, so that the export sees padding."""
    generator = torch.Generator().manual_seed(batch * 1000 + height)
    images = torch.randint(0, 256, (batch, 3, height, width), generator=generator).float()
    sizes = torch.tensor([[height, width]] + [[height - height // 4, width - width // 3]] * (batch - 1))
    device = device or cfg.MODEL.DEVICE
    return images.to(device), sizes.to(device)


def build_exportable(cfg):
    """The model of `cfg`, its weights loaded, on the PyTorch path of every compiled op."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DETR.OPS_IMPL = "pytorch"
    return ExportableDetector(build_eval_model(cfg)).eval()


def export_torchscript(exportable, inputs, path):
    with torch.no_grad():
        traced = torch.jit.trace(exportable, inputs, check_trace=False)
    traced.save(path)
    return path


def output_names(exportable):
    return OUTPUT_NAMES + (("mask_logits",) if exportable.model.mask_on else ())


def export_onnx(exportable, inputs, path):
    # torch.onnx's TorchScript-based exporter: it exports these models much faster than the
    # torch.export-based one, with the same graph
    with torch.no_grad():
        torch.onnx.export(
            exportable,
            inputs,
            path,
            input_names=list(INPUT_NAMES),
            output_names=list(output_names(exportable)),
            dynamic_axes={
                "images": {0: "batch", 2: "height", 3: "width"},
                "image_sizes": {0: "batch"},
                **{name: {0: "batch"} for name in OUTPUT_NAMES},
                **({"mask_logits": {0: "batch", 2: "mask_height", 3: "mask_width"}} if exportable.model.mask_on else {}),
            },
            opset_version=17,
            dynamo=False,
        )
    return path


def _onnx_runner(path):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(images, image_sizes):
        outputs = session.run(None, {"images": images.cpu().numpy(), "image_sizes": image_sizes.cpu().numpy()})
        return [torch.from_numpy(x) for x in outputs]

    return run


def check_exported(exportable, run, cases, device="cpu"):
    """
    Run an exported model and the eager one on random batches of each (height, width,
    batch) case; returns, per case, the largest difference of the (sorted) scores, and of
    the boxes of detections of equal class and score (ties may come in another order), in
    pixels, or the error the exported model raised.
    """
    results = {}
    for height, width, batch in cases:
        images, sizes = example_inputs(None, height, width, batch, device)
        name = f"{height}x{width} batch {batch}"
        with torch.no_grad():
            expected = [x.cpu() for x in exportable(images, sizes)]
            try:
                got = [torch.as_tensor(x).cpu() for x in run(images, sizes)]
            except Exception as e:  # an export valid only at the size it was made at
                results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                continue
        if got[0].shape != expected[0].shape:
            results[name] = {"error": f"scores of shape {tuple(got[0].shape)}, expected {tuple(expected[0].shape)}"}
            continue
        same = (got[0][..., :, None] - expected[0][..., None, :]).abs().le(1e-4) & (
            got[1][..., :, None] == expected[1][..., None, :]
        )  # [batch, K, K]
        distance = (got[2][..., :, None, :] - expected[2][..., None, :, :]).abs().amax(-1)
        distance = distance.masked_fill(~same, float("inf")).amin(-1)
        results[name] = {
            "scores": float((got[0] - expected[0]).abs().max()),
            "boxes": float(distance.max()),
        }
        if len(expected) > 3:  # mask logits, in the order of the scores as the boxes are compared
            results[name]["mask_logits"] = float((got[3] - expected[3]).abs().max()) if got[3].shape == expected[3].shape else float("inf")
    return results


def _agrees(result):
    # scores within 1e-4, boxes within a hundredth of a pixel, mask logits within 1e-3
    return (
        "error" not in result and result["scores"] <= 1e-4 and result["boxes"] <= 1e-2
        and result.get("mask_logits", 0.0) <= 1e-3
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the exported files")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--height", type=int, default=None, help="example input height (default: INPUT.MIN_SIZE_TEST)")
    parser.add_argument("--width", type=int, default=None, help="example input width (default: the height x 4/3)")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 32:
            parser.error(f"--{name} must be at least 32, got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = get_config(args.config_file, args.opts)
    cfg.freeze()
    if not logger.handlers:
        setup_logger(name="detectron2")
    height = args.height or max(cfg.INPUT.MIN_SIZE_TEST, 32)
    width = args.width or height * 4 // 3
    exportable = build_exportable(cfg)
    inputs = example_inputs(cfg, height, width)
    os.makedirs(args.output, exist_ok=True)
    written = {}
    if "torchscript" in args.format:
        written["torchscript"] = export_torchscript(exportable, inputs, os.path.join(args.output, "model.ts"))
    if "onnx" in args.format:
        written["onnx"] = export_onnx(exportable, inputs, os.path.join(args.output, "model.onnx"))
    # the export size and another one, at batch 1 and 2: a model whose code fixes some
    # shape from Python numbers exports fine but only runs at the export size
    other = (height * 3 // 4, width * 5 // 4)
    cases = [(height, width, 1), (height, width, 2), (*other, 1), (*other, 2)]
    runners = {"torchscript": torch.jit.load, "onnx": _onnx_runner}
    checks = {}
    for kind, path in written.items():
        try:
            run = runners[kind](path)
        except ImportError as e:
            logger.warning(f"{kind} not checked: {e}")
            continue
        checks[kind] = check_exported(exportable, run, cases, cfg.MODEL.DEVICE)
        for case, result in checks[kind].items():
            if not _agrees(result):
                logger.warning(f"{kind} export differs from the eager model at {case}: {result}")
    description = {
        "files": {k: os.path.abspath(v) for k, v in written.items()},
        "checks": checks,
        "dynamic_batch": {k: all(_agrees(r) for c, r in v.items() if c.startswith(f"{height}x{width}")) for k, v in checks.items()},
        "dynamic_image_size": {k: all(_agrees(r) for r in v.values()) for k, v in checks.items()},
        "thing_classes": model_class_names(cfg),
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "weights": cfg.MODEL.WEIGHTS,
        "inputs": {"images": "[batch, 3, height, width] float32, 0-255, " + cfg.INPUT.FORMAT, "image_sizes": "[batch, 2] int64 (height, width)"},
        "outputs": {
            "scores": "[batch, K]", "labels": "[batch, K] int64", "boxes": "[batch, K, 4] XYXY pixels",
            **({"mask_logits": "[batch, K, height / 4, width / 4]"} if cfg.MODEL.MASK_ON else {}),
        },
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": list(cfg.MODEL.PIXEL_STD),
        "test_size": [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST],
    }
    with open(os.path.join(args.output, "export.json"), "w") as f:
        json.dump(description, f, indent=2)
    for kind, path in written.items():
        logger.info(f"wrote {kind}: {path}")
    return description


if __name__ == "__main__":
    main()
