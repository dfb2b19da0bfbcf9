"""
Training under autocast (SOLVER.AMP): bfloat16 on the CPU, float16 and bfloat16 on a GPU,
and the normalization layers that stay in float32.
"""
import math

import pytest
import torch

from detectron2.layers import ShapeSpec

from conditional_detr.engine import Trainer, get_config
from conditional_detr.modeling.norms import (
    BatchNorm2d, GroupNorm, LayerNorm, NaiveSyncBatchNorm, SyncBatchNorm, trainable_batchnorm_in_float32,
)

from helpers.paths import INSTANT_CONFIG
from helpers.training import instant_cfg, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_bfloat16_amp_training_on_cpu(shapes_root, tmp_path):
    cfg = instant_cfg(tmp_path, "SOLVER.AMP.ENABLED", True, "SOLVER.MAX_ITER", 3)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    feature_dtypes = []

    def record_training_dtype(module, args, out):
        if module.training:
            feature_dtypes.append(next(iter(out.values())).dtype)

    trainer.model.backbone.register_forward_hook(record_training_dtype)
    norm_dtypes = {}
    norm_names = {norm: name for name, norm in trainer.model.backbone.named_modules()}

    def record_norm_dtypes(module, args, out):
        if module.training:
            norm_dtypes.setdefault(norm_names[module], set()).add((args[0].dtype, out.dtype))

    for norm in norm_names:
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.register_forward_hook(record_norm_dtypes)
    residual_dtypes = []
    for layer in trainer.model.transformer.encoder.layers:
        layer.register_forward_hook(lambda module, args, out: residual_dtypes.append(out.dtype))
    head_dtypes = []
    for head in (trainer.model.class_embed, trainer.model.bbox_embed):
        head.register_forward_hook(lambda module, args, out: head_dtypes.append(out.dtype))
    weights = trainer.model.class_embed.weight.detach().clone()
    trainer.train()
    # the convolutions in bfloat16; the trainable BatchNorms on the residual stream, and so
    # the features, in float32; those inside a block in bfloat16, as their next convolution reads
    inside_blocks = {name for name in norm_dtypes if name.endswith(".conv1.norm") and name != "stem.conv1.norm"}
    assert len(inside_blocks) == 8 and len(norm_dtypes) == 8 + 8 + 3 + 1
    for name, dtypes in norm_dtypes.items():
        out_dtype = torch.bfloat16 if name in inside_blocks else torch.float32
        assert dtypes == {(torch.bfloat16, out_dtype)}, name
    assert feature_dtypes and set(feature_dtypes) == {torch.float32}
    # the encoder's residual stream in float32, although its input projection is bfloat16
    assert residual_dtypes and set(residual_dtypes) == {torch.float32}
    # the class and box heads, and so the matching and losses, in float32
    assert head_dtypes and set(head_dtypes) == {torch.float32}
    # the weights stay float32 and are trained
    assert trainer.model.class_embed.weight.dtype == torch.float32
    assert not torch.equal(trainer.model.class_embed.weight, weights)
    losses = [r for r in read_metrics(tmp_path) if "total_loss" in r]
    assert losses and all(math.isfinite(r["total_loss"]) for r in losses)


@pytest.mark.parametrize(
    "norm", [LayerNorm(16), GroupNorm(4, 16), BatchNorm2d(16), SyncBatchNorm(16).eval(), NaiveSyncBatchNorm(16)]
)
def test_norms_run_in_float32_under_autocast(norm):
    torch.manual_seed(0)
    for parameter in norm.parameters():
        torch.nn.init.normal_(parameter)
    x = (torch.randn(2, 16, 3, 5) * 10 + 3).bfloat16()
    x = x.transpose(1, 3) if isinstance(norm, LayerNorm) else x
    expected = norm(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # outside autocast a bfloat16 model stays bfloat16
    assert norm.bfloat16()(x).dtype == torch.bfloat16


def test_every_trainable_batchnorm_of_detectron2_goes_to_float32():
    from detectron2.layers import NaiveSyncBatchNorm as D2NaiveSyncBatchNorm

    model = torch.nn.Sequential(
        torch.nn.BatchNorm2d(4), torch.nn.SyncBatchNorm(4), D2NaiveSyncBatchNorm(4), BatchNorm2d(4)
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainable_batchnorm_in_float32(model)
    assert [type(m) for m in model] == [BatchNorm2d, SyncBatchNorm, NaiveSyncBatchNorm, BatchNorm2d]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    class OwnBatchNorm(torch.nn.BatchNorm2d):
        pass

    with pytest.warns(UserWarning, match="OwnBatchNorm has no float32 version"):
        trainable_batchnorm_in_float32(torch.nn.Sequential(OwnBatchNorm(4)))


@pytest.mark.parametrize("depth", [18, 50])
def test_batchnorms_read_only_by_convolutions(depth):
    from detectron2.config import get_cfg
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    from conditional_detr.modeling.backbone import norms_read_only_by_convolutions

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.NORM = depth, "BN"
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth == 18 else 256
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0  # frozen stages have FrozenBatchNorm2d
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    names = {norm: name for name, norm in backbone.named_modules()}
    kept = sorted(names[norm] for norm in norms_read_only_by_convolutions(backbone))
    blocks_per_stage = (2, 2, 2, 2) if depth == 18 else (3, 4, 6, 3)
    blocks = [f"res{stage}.{i}" for stage, n in zip((2, 3, 4, 5), blocks_per_stage) for i in range(n)]
    inner = ["conv1"] if depth == 18 else ["conv1", "conv2"]
    # R50's first block projects its shortcut, so its stem feeds only convolutions; R18's
    # stem starts the residual stream
    stem = [] if depth == 18 else ["stem.conv1.norm"]
    assert kept == sorted([f"{block}.{conv}.norm" for block in blocks for conv in inner] + stem)

    # detectron2's NaiveSyncBatchNorm averages its statistics across processes in the input's
    # dtype: it stays in float32
    cfg.MODEL.RESNETS.NORM = "naiveSyncBN"
    assert norms_read_only_by_convolutions(build_resnet_backbone(cfg, ShapeSpec(channels=3))) == []


def test_batchnorm_kept_in_bfloat16_computes_what_float32_rounds_to():
    torch.manual_seed(0)
    kept, in_float32 = torch.nn.BatchNorm2d(16), BatchNorm2d(16)
    torch.nn.init.uniform_(kept.weight, 0.5, 1.5)
    torch.nn.init.normal_(kept.bias)
    in_float32.load_state_dict(kept.state_dict())
    x = (torch.randn(4, 16, 9, 7) * 3 + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 16, 9, 7).bfloat16()
    outs, grads = [], []
    for norm in (kept, in_float32):
        x_ = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.relu(norm(x_))
        # what the next convolution would read
        out.bfloat16().backward(grad)
        outs.append(out)
        grads.append((x_.grad, norm.weight.grad, norm.bias.grad))
    assert outs[0].dtype == torch.bfloat16 and outs[1].dtype == torch.float32
    torch.testing.assert_close(outs[0], outs[1].bfloat16(), rtol=0.008, atol=1e-5)
    for ours, expected in zip(grads[0], grads[1]):
        assert ours.dtype == expected.dtype
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept.running_var, in_float32.running_var)
    torch.testing.assert_close(kept.running_mean, in_float32.running_mean)


@pytest.mark.parametrize(
    "precision, message",
    [("float16", "'float16' needs MODEL.DEVICE 'cuda'"), ("fp8", "SOLVER.AMP.PRECISION must be one of")],
)
def test_amp_precision_that_cannot_work_is_named(tmp_path, precision, message):
    cfg = instant_cfg(tmp_path, "SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", precision)
    with pytest.raises(ValueError, match=message):
        Trainer(cfg)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="AMP training needs a GPU")
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_amp_training_on_gpu(shapes_root, tmp_path, precision):
    cfg = get_config(
        INSTANT_CONFIG,
        [
            "MODEL.DEVICE",
            "cuda",
            "OUTPUT_DIR",
            str(tmp_path),
            "SOLVER.AMP.ENABLED",
            "True",
            "SOLVER.AMP.PRECISION",
            precision,
            "SOLVER.MAX_ITER",
            "3",
        ],
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = [r for r in read_metrics(tmp_path) if "total_loss" in r]
    assert losses and all(math.isfinite(r["total_loss"]) for r in losses)
