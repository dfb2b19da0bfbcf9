from typing import Type

import torch

from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = ["build_optimizer", "maybe_add_full_model_gradient_clipping"]


def maybe_add_full_model_gradient_clipping(
    cfg, optim: Type[torch.optim.Optimizer]
) -> Type[torch.optim.Optimizer]:
    """
    Return a subclass of `optim` whose `step()` first clips the gradients of all its
    parameters together by their total norm, if SOLVER.CLIP_GRADIENTS asks for
    "full_model" clipping; otherwise return `optim` unchanged.

    detectron2's own clipping only clips every parameter (or group) on its own, while
    DETR-like models are trained with a single norm over the whole model.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE > 0.0):
        return optim
    max_norm, norm_type = clip.CLIP_VALUE, clip.NORM_TYPE

    class FullModelGradientClippingOptimizer(optim):
        def step(self, closure=None):
            # With AMP, GradScaler calls step() after unscaling, so the norm is the true one.
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = optim.__name__ + "WithFullModelGradientClipping"
    return FullModelGradientClippingOptimizer


def _fused_adamw_supported(model):
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """
    The optimizer of the official recipe: AdamW, with the learning rate of the
    backbone (parameters named `backbone.*`) scaled by SOLVER.BACKBONE_MULTIPLIER, the
    model's own `lr_multipliers` ({part of a parameter name: multiplier}, e.g. Deformable
    DETR's sampling offsets) applied elsewhere, and gradient clipping from SOLVER.CLIP_GRADIENTS.
    """
    backbone_multiplier = cfg.SOLVER.BACKBONE_MULTIPLIER
    model_multipliers = getattr(model, "lr_multipliers", {})

    def lr_factor(name):
        if name.startswith("backbone."):
            return backbone_multiplier
        return next((m for part, m in model_multipliers.items() if part in name), 1.0)

    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        lr_factor_func=lr_factor,
    )

    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        # the fused kernel: one pass over each tensor, much faster than the per-tensor loop
        # on a CPU (docs/speed.md), and the GPU's fastest path too
        optim, kwargs = torch.optim.AdamW, {"fused": _fused_adamw_supported(model)}
    elif name == "SGD":
        optim, kwargs = torch.optim.SGD, {
            "momentum": cfg.SOLVER.MOMENTUM,
            "nesterov": cfg.SOLVER.NESTEROV,
        }
    else:
        raise ValueError(
            f"Unknown SOLVER.OPTIMIZER {cfg.SOLVER.OPTIMIZER!r}: expected 'ADAMW' or 'SGD'"
        )

    clipped = (
        maybe_add_full_model_gradient_clipping(cfg, optim)
        if cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
        # per-parameter ("value" / "norm") clipping is detectron2's
        else maybe_add_gradient_clipping(cfg, optim)
    )
    optimizer = clipped(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs)
    if clipped is not optim:
        # A fused optimizer lets GradScaler hand it still-scaled gradients; clipping needs
        # them unscaled, so the scaler is told to unscale before step(), as for any other.
        optimizer._step_supports_amp_scaling = False
    return optimizer
