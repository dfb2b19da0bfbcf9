"""
Training, evaluation, resuming and multi-process runs of the tiny instant-test
config on a tiny copy of the embedded shapes dataset, on the CPU.
"""

import glob
import json
import math
import os

import pytest
import torch
from PIL import Image
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.engine import HookBase, launch
from detectron2.solver import build_lr_scheduler

from conditional_detr.engine import Trainer, get_config, hide_gpus_for_cpu_workers, train_loader_prefetch
from conditional_detr.modeling.norms import (
    BatchNorm2d, GroupNorm, LayerNorm, NaiveSyncBatchNorm, SyncBatchNorm, trainable_batchnorm_in_float32,
)
from conditional_detr.solver import build_optimizer

from helpers.paths import BASE_CONFIG, INSTANT_CONFIG
from helpers.training import cli_args, instant_cfg, instant_opts, read_metrics, register_tiny_shapes
import train_net

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------


class TwoPartModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.head = nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_optimizer_is_adamw_with_backbone_multiplier(tmp_path):
    cfg = get_config(BASE_CONFIG)
    model = TwoPartModel()
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)

    lr_of, wd_of = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[p], wd_of[p] = group["lr"], group["weight_decay"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(lr_of) == len(trainable) and all(p in lr_of for p in trainable)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        expected = 1e-4 * 0.1 if name.startswith("backbone.") else 1e-4
        assert lr_of[p] == pytest.approx(expected), name
        # As the official AdamW: every parameter is decayed, LayerNorm included.
        assert wd_of[p] == pytest.approx(1e-4), name


def test_full_model_gradient_clipping(tmp_path):
    cfg = get_config(BASE_CONFIG, ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.1"])
    torch.manual_seed(0)
    model = TwoPartModel()
    reference = TwoPartModel()
    reference.load_state_dict(model.state_dict())

    optimizer = build_optimizer(cfg, model)
    ref_optimizer = torch.optim.AdamW(
        [
            {"params": reference.backbone.parameters(), "lr": 1e-5},
            {"params": reference.head.parameters()},
        ],
        lr=1e-4,
        weight_decay=1e-4,
    )
    for m in (model, reference):
        for p in m.parameters():
            if p.requires_grad:
                p.grad = torch.full_like(p, 3.0)
    total = math.sqrt(sum(9.0 * p.numel() for p in model.parameters() if p.requires_grad))
    optimizer.step()

    # One norm over all parameters together: every gradient scaled by 0.1 / total.
    for p in model.parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, torch.full_like(p, 3.0 * 0.1 / total))
    for p in reference.parameters():
        if p.requires_grad:
            p.grad.mul_(0.1 / total)
    ref_optimizer.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q), name


def test_optimizer_is_fused_and_clips_scaled_gradients_once_unscaled():
    cfg = get_config(BASE_CONFIG, ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.1"])
    torch.manual_seed(0)
    plain, scaled = TwoPartModel(), TwoPartModel()
    scaled.load_state_dict(plain.state_dict())
    inputs = torch.randn(5, 3)
    for model, scale in ((plain, None), (scaled, 1024.0)):
        optimizer = build_optimizer(cfg, model)
        assert optimizer.defaults["fused"]
        loss = model.head(model.backbone(inputs)).square().sum()
        if scale is None:
            loss.backward()
            optimizer.step()
        else:
            scaler = torch.amp.GradScaler("cpu", init_scale=scale)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
    # the scaled run clipped the true gradients, and so took the same step
    for (name, p), q in zip(plain.named_parameters(), scaled.parameters()):
        assert torch.allclose(p, q, atol=1e-7), name


def test_clipping_can_be_disabled():
    cfg = get_config(opts=["SOLVER.CLIP_GRADIENTS.ENABLED", "False"])
    assert type(build_optimizer(cfg, TwoPartModel())) is torch.optim.AdamW


def test_step_schedule_without_warmup():
    cfg = get_config(
        opts=["SOLVER.MAX_ITER", "10", "SOLVER.STEPS", "(6,)", "SOLVER.WARMUP_ITERS", "0"]
    )
    optimizer = build_optimizer(cfg, TwoPartModel())
    scheduler = build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"] / optimizer.defaults["lr"])
        optimizer.step()
        scheduler.step()
    factors = [1.0] * 6 + [0.1] * 4
    base = lrs[0]
    assert lrs == pytest.approx([base * f for f in factors])


# ---------------------------------------------------------------------------------
# End-to-end runs
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "workers, grouping, expected",
    [(1, True, {"prefetch_factor": 16}), (3, True, {"prefetch_factor": 6}), (16, True, {"prefetch_factor": 2}),
     (1, False, {}), (0, True, {})],
)
def test_train_loader_keeps_two_batches_in_flight(tmp_path, workers, grouping, expected):
    cfg = get_config(INSTANT_CONFIG, ["SOLVER.IMS_PER_BATCH", 8, "DATALOADER.NUM_WORKERS", workers,
                                      "DATALOADER.ASPECT_RATIO_GROUPING", grouping])
    assert train_loader_prefetch(cfg) == expected


@pytest.mark.slow
def test_train_then_evaluate(shapes_root, tmp_path):
    out = tmp_path / "run"
    train_net.main(cli_args(*instant_opts(out, "SOLVER.MAX_ITER", 4, "SOLVER.STEPS", "(3,)")))

    # Default writers: printed progress with ETA, JSON metrics, TensorBoard events.
    log = open(out / "log.txt").read()
    assert "eta:" in log and "total_loss" in log
    records = read_metrics(out)
    losses = [r for r in records if "total_loss" in r]
    assert losses and all(math.isfinite(r["total_loss"]) for r in losses)
    assert {"loss_ce", "loss_bbox", "loss_giou", "lr"} <= set(losses[-1])
    assert glob.glob(str(out / "events.out.tfevents.*"))
    # The evaluation after training, with the COCO API.
    assert any("bbox/AP" in r for r in records)
    assert (out / "inference" / "coco_instances_results.json").exists()
    assert (out / "model_final.pth").exists()

    # --eval-only on the trained weights
    results = train_net.main(
        cli_args(
            "--eval-only",
            *instant_opts(tmp_path / "eval", "MODEL.WEIGHTS", out / "model_final.pth"),
        )
    )
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(0.0 <= results["bbox"][k] <= 100.0 for k in ("AP", "AP50", "AP75"))


class KillAt(HookBase):
    """Stands for a process killed at the start of iteration `iteration`."""

    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise KeyboardInterrupt(f"killed at iteration {self.iteration}")


@pytest.mark.slow
def test_resume_after_interruption(shapes_root, tmp_path):
    out = tmp_path / "run"
    # No evaluation: only the training state matters here.
    opts = (
        "SOLVER.MAX_ITER",
        6,
        "SOLVER.CHECKPOINT_PERIOD",
        3,
        "SOLVER.STEPS",
        "(4,)",
        "DATASETS.TEST",
        "()",
    )
    trainer = Trainer(instant_cfg(out, *opts))
    trainer.register_hooks([KillAt(4)])
    trainer.resume_or_load(resume=False)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    del trainer
    # The last checkpoint is the one after iteration 2 (every 3 iterations).
    assert open(out / "last_checkpoint").read().strip() == "model_0000002.pth"
    assert not (out / "model_final.pth").exists()

    train_net.main(cli_args("--resume", *instant_opts(out, *opts)))
    assert "Starting training from iteration 3" in open(out / "log.txt").read()
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 5
    # The optimizer went on from its saved state: 3 AdamW steps before, 3 after.
    optimizer = final["trainer"]["_trainer"]["optimizer"]
    steps = {int(s["step"]) for s in optimizer["state"].values()}
    assert steps == {6}
    # ... and the schedule from its saved position: the drop at iteration 4 happened.
    assert [g["lr"] for g in optimizer["param_groups"]] == pytest.approx(
        [1e-5] * len(optimizer["param_groups"])
    )
    resumed = [r["iteration"] for r in read_metrics(out) if "total_loss" in r]
    assert resumed[-1] == 5


class NaNLossModel(nn.Module):
    """The instant model, with one loss term made NaN at a given training call."""

    def __init__(self, model, at_call, term):
        super().__init__()
        self.model, self.at_call, self.term, self.calls = model, at_call, term, 0

    def forward(self, batched_inputs):
        losses = self.model(batched_inputs)
        if self.training:
            if self.calls == self.at_call:
                losses[self.term] = losses[self.term] * float("nan")
            self.calls += 1
        return losses


def test_non_finite_loss_names_iteration_and_term(shapes_root, tmp_path):
    class NaNTrainer(Trainer):
        @classmethod
        def build_model(cls, cfg):
            return NaNLossModel(super().build_model(cfg), at_call=2, term="loss_bbox")

    trainer = NaNTrainer(instant_cfg(tmp_path, "SOLVER.MAX_ITER", 4, "SOLVER.STEPS", "(3,)"))
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError) as e:
        trainer.train()
    message = str(e.value)
    assert "iteration 2" in message and "loss_bbox" in message
    assert "non-finite loss term(s) loss_bbox." in message
    # Raised before the optimizer step: the weights stay finite.
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def _distributed_main(root, args, report_dir):
    # Runs in every spawned worker: the tiny dataset is registered anew there.
    import torch.distributed as dist

    register_tiny_shapes(root)
    cfg = train_net.setup(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    with open(os.path.join(report_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(
            {
                "backend": str(dist.get_backend()),
                "world_size": dist.get_world_size(),
                "ddp": isinstance(trainer.model, nn.parallel.DistributedDataParallel),
                "params": params[::97].tolist(),
            },
            f,
        )


@pytest.mark.slow
def test_two_process_gloo_training(shapes_root, tmp_path, monkeypatch):
    out, report = tmp_path / "run", tmp_path / "report"
    report.mkdir()
    args = cli_args(
        "--num-gpus", 2, *instant_opts(out, "SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 4)
    )
    with monkeypatch.context() as m:
        # Restored on leaving: only the spawned workers lose sight of the GPUs.
        m.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
        hide_gpus_for_cpu_workers(get_config(INSTANT_CONFIG, args.opts), args.num_gpus)
        launch(
            _distributed_main, args.num_gpus, dist_url="auto", args=(shapes_root, args, str(report))
        )

    reports = [json.load(open(report / f"rank{r}.json")) for r in range(2)]
    for r in reports:
        assert (r["backend"], r["world_size"], r["ddp"]) == ("gloo", 2, True)
    # DDP averaged the gradients: both processes hold the same weights.
    assert reports[0]["params"] == reports[1]["params"]
    assert "World size: 2" in open(out / "log.txt").read()
    assert (out / "model_final.pth").exists()
    assert any("bbox/AP" in r for r in read_metrics(out))


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


@pytest.mark.slow
def test_shapes_demo_writes_metrics_and_pictures(shapes_root, tmp_path):
    from conditional_detr.tools import shapes_demo

    out = tmp_path / "demo"
    summary = shapes_demo.main(
        [
            "--config-file",
            INSTANT_CONFIG,
            "--output-dir",
            str(out),
            "--num-images",
            "2",
            "MODEL.DEVICE",
            "cpu",
            "SOLVER.MAX_ITER",
            "2",
            "SOLVER.STEPS",
            "(1,)",
        ]
    )
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results == summary
    assert set(results["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert results["train_seconds"] > 0 and results["iterations"] == 2
    assert results["training_precision"] == "float32"
    assert results["processor"].endswith(torch.backends.cpu.get_cpu_capability())
    assert len(results["visualizations"]) == 2
    for name in results["visualizations"]:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > image.height  # truth | predictions
    assert (out / "metrics.json").exists() and (out / "model_final.pth").exists()


@pytest.mark.parametrize("native", [True, False])
def test_the_demo_trains_in_bfloat16_only_where_it_is_native(monkeypatch, native):
    from conditional_detr.tools import shapes_demo

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    cfg = get_config(shapes_demo.DEFAULT_CONFIG, ["MODEL.DEVICE", "cpu"])
    assert cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.AMP.PRECISION == "bfloat16"
    note = shapes_demo.bfloat16_only_where_native(cfg)
    assert cfg.SOLVER.AMP.ENABLED is native
    assert (note is None) is native
    if not native:
        assert "no native bfloat16" in note and "SOLVER.AMP.ENABLED False" in note
    # a float32 config is left alone
    cfg = get_config(INSTANT_CONFIG, ["MODEL.DEVICE", "cpu"])
    assert shapes_demo.bfloat16_only_where_native(cfg) is None and not cfg.SOLVER.AMP.ENABLED
