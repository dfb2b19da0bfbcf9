"""
An exponential moving average of the weights (SOLVER.EMA), kept by torch's
`swa_utils.AveragedModel`: updated after every step, saved in every checkpoint as
"ema" (so that a resumed run goes on averaging), evaluated next to the model, and
written at the end of training as OUTPUT_DIR/model_final_ema.pth, a checkpoint that
loads like any other (MODEL.WEIGHTS, tools/demo, tools/export).
"""

import os

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["build_ema", "EMAHook", "FINAL_EMA_CHECKPOINT"]

FINAL_EMA_CHECKPOINT = "model_final_ema.pth"


def build_ema(cfg, model):
    """The average of `model` (not DDP-wrapped) when SOLVER.EMA.ENABLED, else None."""
    if not cfg.SOLVER.EMA.ENABLED:
        return None
    decay = cfg.SOLVER.EMA.DECAY
    if not 0.0 < decay < 1.0:
        raise ValueError(f"SOLVER.EMA.DECAY must be in (0, 1), got {decay!r}")
    # the buffers too: BatchNorm statistics trained from scratch follow the weights
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class EMAHook(HookBase):
    """Averages after every step; the first step copies the weights, those loaded from MODEL.WEIGHTS included."""

    def __init__(self, ema, model, output_dir, class_names=None):
        self.ema, self.model = ema, model
        self.output_dir, self.class_names = output_dir, class_names

    def after_step(self):
        self.ema.update_parameters(self.model)

    def after_train(self):
        if not comm.is_main_process() or self.trainer.iter + 1 < self.trainer.max_iter:
            return
        # written directly: the checkpointer's save would point last_checkpoint at it
        checkpoint = {"model": self.ema.module.state_dict(), "iteration": self.trainer.iter}
        if self.class_names is not None:
            checkpoint["class_names"] = list(self.class_names)
        torch.save(checkpoint, os.path.join(self.output_dir, FINAL_EMA_CHECKPOINT))
