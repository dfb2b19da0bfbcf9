"""
Training, evaluation, resuming, non-finite losses and multi-process runs of the tiny
instant-test config on a tiny copy of the embedded shapes dataset, on the CPU.
"""
import glob
import json
import math
import os

import pytest
import torch
from torch import nn

from detectron2.engine import HookBase, launch

from conditional_detr.engine import Trainer, get_config, hide_gpus_for_cpu_workers, train_loader_prefetch

from helpers.paths import INSTANT_CONFIG
from helpers.training import cli_args, instant_cfg, instant_opts, read_metrics, register_tiny_shapes
import train_net

pytestmark = pytest.mark.usefixtures("one_thread")


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
