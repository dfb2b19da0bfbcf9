"""
MMDetection 3.3 built on the fly, for the tests that compare with its models: imported from
the folder `make test` installs it into, with a stand-in for mmcv's compiled ops (mmcv-lite
has none; on a CPU the models never call them).
"""
import os
import sys
import types

import pytest
import torch

from .paths import REPO

MMDETECTION_DIR = os.environ.get("CONDITIONAL_DETR_MMDETECTION", os.path.join(REPO, ".venv", "mmdetection"))
INSTALL = (
    f"pip install --target {MMDETECTION_DIR} --no-deps mmdet==3.3.0 mmengine==0.10.7 mmcv-lite==2.1.0 "
    "addict yapf terminaltables shapely termcolor rich markdown-it-py mdurl pygments six (make test does)"
)


class _NoCompiledOps(types.ModuleType):
    def __getattr__(self, name):
        def missing(*args, **kwargs):
            raise RuntimeError(f"mmcv's compiled op {name} is not available (mmcv-lite)")

        return missing


def import_mmdet():
    """mmdet, with its modules registered; the calling test skips, saying how to install it, where it is missing."""
    if not os.path.isdir(os.path.join(MMDETECTION_DIR, "mmdet")):
        pytest.skip(f"MMDetection not found in {MMDETECTION_DIR}: {INSTALL}")
    if MMDETECTION_DIR not in sys.path:
        sys.path.append(MMDETECTION_DIR)  # after the project's own packages, which keep precedence
    import mmcv.utils.ext_loader as ext_loader

    ext_loader.load_ext = lambda name, functions: _NoCompiledOps(name)
    import mmdet
    from mmdet.utils import register_all_modules

    register_all_modules()
    return mmdet


def build_mmdet_model(config, depth=18, seed=0):
    """MMDetection's model of `config` (relative to its configs folder) with random weights and a ResNet of `depth`."""
    mmdet = import_mmdet()
    from mmdet.registry import MODELS
    from mmengine.config import Config

    cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", config))
    cfg.model.backbone.init_cfg = None  # no ImageNet download
    cfg.model.backbone.depth = depth
    channels = {18: [128, 256, 512], 50: [512, 1024, 2048]}[depth]
    cfg.model.neck.in_channels = channels[-len(cfg.model.neck.in_channels):]
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()  # building leaves some parameters uninitialized (level_embed: torch.Tensor(...))
    model.config_text = cfg.pretty_text  # what MMDetection's runner saves as meta["cfg"]
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        # random statistics and class biases, so that a wrong mapping shows, and scores far
        # enough apart that both top-k orders agree (the focal prior makes them near-equal)
        if name.endswith(("running_mean", "running_var")):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + (0.5 if name.endswith("running_var") else -0.5))
        elif "fc_cls.bias" in name or ("cls_branches" in name and name.endswith(".bias")):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 2)
        elif "reg_branches" in name:
            # per-layer heads start as copies of one; training makes them differ (shared ones stay one)
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.01)
    return model.eval()


def mmdet_checkpoint(model, path, config_text=None):
    """A checkpoint file as MMDetection writes one: meta with the config and the dataset's classes, and the state dict."""
    from mmdet.datasets import CocoDataset

    meta = {
        "cfg": config_text or model.config_text,
        "dataset_meta": {"classes": tuple(CocoDataset.METAINFO["classes"])},
        "mmdet_version": "3.3.0",
    }
    torch.save({"meta": meta, "state_dict": model.state_dict()}, path)
    return path


def mmdet_outputs(model, images_rgb):
    """Every decoder layer's class logits and boxes, and the post-processed detections, for uint8 RGB CHW images."""
    from mmdet.structures import DetDataSample

    samples = [
        DetDataSample(metainfo={"img_shape": tuple(image.shape[1:]), "ori_shape": tuple(image.shape[1:]), "scale_factor": (1.0, 1.0)})
        for image in images_rgb
    ]
    data = model.data_preprocessor({"inputs": [image.flip(0) for image in images_rgb], "data_samples": samples}, False)
    with torch.no_grad():
        layer_logits, layer_boxes = model(data["inputs"], data["data_samples"], mode="tensor")
        predictions = model.predict(data["inputs"], data["data_samples"], rescale=True)
    return layer_logits, layer_boxes, [p.pred_instances for p in predictions]
