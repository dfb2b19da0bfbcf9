"""
The optimizer (AdamW, the backbone's learning-rate multiplier, fused steps), gradient
clipping and the step schedule.
"""
import math

import pytest
import torch
from torch import nn

from detectron2.solver import build_lr_scheduler

from conditional_detr.engine import get_config
from conditional_detr.solver import build_optimizer

from helpers.paths import BASE_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")


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
