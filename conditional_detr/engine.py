"""
Training and evaluation of Conditional DETR with detectron2's DefaultTrainer: the
official recipe's optimizer, DETR's augmentation and COCO evaluation.
"""

import logging
import os
import time
import weakref

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.data.build import _train_loader_from_config
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    hooks,
)
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import ConditionalDETRCheckpointer
from .config import get_config, resolve_device
from .data.dataset_mapper import DetrDatasetMapper
from .data.datasets import check_instance_masks, check_num_classes, check_panoptic_files, panoptic_things
from .data.worker_transport import SmallTensorsByValue
from .ema import EMAHook, build_ema
from .solver import build_optimizer

__all__ = [
    "Trainer",
    "get_config",
    "resolve_device",
    "hide_gpus_for_cpu_workers",
    "limit_cpu_threads",
]


def hide_gpus_for_cpu_workers(cfg, num_processes: int):
    """
    Make detectron2's `launch` start CPU workers when MODEL.DEVICE is "cpu".

    `launch` picks NCCL, and one GPU per process, whenever the machine has a GPU,
    which CPU tensors cannot use. Hiding the GPUs from the workers, before they are
    spawned, makes it pick GLOO. Call it in the launching process.
    """
    if cfg.MODEL.DEVICE == "cpu" and num_processes > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def limit_cpu_threads(cfg):
    """Share the cores among the processes of a multi-process CPU run instead of oversubscribing them."""
    if cfg.MODEL.DEVICE == "cpu" and comm.get_local_size() > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))


def loader_mapper(cfg, is_train):
    """DETR's mapper; from worker processes, with small tensors sent by value (much faster)."""
    mapper = DetrDatasetMapper(cfg, is_train=is_train)
    return SmallTensorsByValue(mapper) if cfg.DATALOADER.NUM_WORKERS > 0 else mapper


def train_loader_prefetch(cfg):
    """
    DataLoader arguments that keep two batches of images in flight. With aspect-ratio
    grouping the workers hand over single images, and torch's default of two per worker
    left the model waiting for most of every batch.
    """
    workers = cfg.DATALOADER.NUM_WORKERS
    if workers == 0 or not cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        return {}
    images_per_process = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
    return {"prefetch_factor": max(2, -(-2 * images_per_process // workers))}


class _FiniteLossMixin:
    """
    Stop at the first non-finite loss, naming the iteration and the loss term(s).

    Checked on every process, before the optimizer step, so that no NaN reaches the
    weights; detectron2 checks only the sum on the main process.
    """

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        iter = self.iter if iter is None else iter
        finite = torch.stack(
            [torch.isfinite(v.detach()).all() for v in loss_dict.values()]
        ).tolist()
        bad = [name for name, ok in zip(loss_dict, finite) if not ok]
        if bad:
            values = ", ".join(
                f"{k}={v.detach().float().sum().item():.4g}" for k, v in loss_dict.items()
            )
            raise FloatingPointError(
                f"Loss became infinite or NaN at iteration {iter}: non-finite loss term(s) "
                f"{', '.join(bad)}. All terms: {values}"
            )
        super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)


class _SimpleTrainer(_FiniteLossMixin, SimpleTrainer):
    pass


AMP_PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def amp_precision(cfg):
    """The autocast dtype of SOLVER.AMP.PRECISION; float16 needs a GPU (bfloat16 runs on both)."""
    name = cfg.SOLVER.AMP.PRECISION
    if name not in AMP_PRECISIONS:
        raise ValueError(f"SOLVER.AMP.PRECISION must be one of {tuple(AMP_PRECISIONS)}, got {name!r}")
    if name == "float16" and torch.device(cfg.MODEL.DEVICE).type != "cuda":
        raise ValueError(
            f"SOLVER.AMP.PRECISION 'float16' needs MODEL.DEVICE 'cuda', got {cfg.MODEL.DEVICE!r}; "
            "use 'bfloat16' on the CPU"
        )
    return AMP_PRECISIONS[name]


class _AMPTrainer(_FiniteLossMixin, AMPTrainer):
    """
    detectron2's AMPTrainer on the model's device, CPU or CUDA: the forward and the losses
    under torch.autocast in `precision`; float16 gradients are scaled, bfloat16 ones need not.
    """

    def __init__(self, model, data_loader, optimizer, device_type, precision):
        scaler = torch.amp.GradScaler(device_type, enabled=precision == torch.float16)
        super().__init__(model, data_loader, optimizer, grad_scaler=scaler, precision=precision)
        self.device_type = device_type

    def run_step(self):
        # AMPTrainer.run_step, which insists on CUDA, with autocast on the model's device
        assert self.model.training, "[AMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


class Trainer(DefaultTrainer):
    """
    DefaultTrainer with AdamW and full-model gradient clipping, DETR's augmentation,
    COCO evaluation, a loss check that names the non-finite term, and
    multi-process training on CPU.
    """

    def __init__(self, cfg):
        # As DefaultTrainer.__init__, except for the DDP wrapper and the inner trainer.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):  # setup_logger is not called for d2
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        self.ema = build_ema(cfg, model)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        ddp_kwargs = {"broadcast_buffers": False}
        if cfg.MODEL.DEVICE == "cpu":
            # detectron2 passes the local rank as GPU id, which DDP rejects for a CPU module.
            ddp_kwargs["device_ids"] = None
        model = create_ddp_model(model, **ddp_kwargs)
        if cfg.SOLVER.AMP.ENABLED:
            device_type = torch.device(cfg.MODEL.DEVICE).type
            self._trainer = _AMPTrainer(model, data_loader, optimizer, device_type, amp_precision(cfg))
        else:
            self._trainer = _SimpleTrainer(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        extra = {"ema": self.ema} if self.ema is not None else {}
        self.checkpointer = ConditionalDETRCheckpointer.from_config(
            cfg, model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self), **extra
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg

        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        """DefaultTrainer's hooks; with SOLVER.EMA, the average is updated after every step and evaluated too."""
        hook_list = super().build_hooks()
        if self.ema is None:
            return hook_list
        model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        ema_hook = EMAHook(self.ema, model, self.cfg.OUTPUT_DIR, self.checkpointer.class_names)
        # before checkpointing and evaluation, which read the average
        reads_average = [
            i for i, h in enumerate(hook_list) if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))
        ]
        hook_list.insert(reads_average[0] if reads_average else len(hook_list), ema_hook)
        return [
            hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._test_model_and_ema)
            if isinstance(h, hooks.EvalHook)
            else h
            for h in hook_list
        ]

    def _test_model_and_ema(self):
        """The results of the model, and those of the average under "ema" (written to inference_ema/)."""
        results = self.test(self.cfg, self.model)
        evaluators = [
            self.build_evaluator(self.cfg, name, os.path.join(self.cfg.OUTPUT_DIR, "inference_ema"))
            for name in self.cfg.DATASETS.TEST
        ]
        results["ema"] = self.test(self.cfg, self.ema.module, evaluators)
        self._last_eval_results = results
        return results

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        check_panoptic_files(cfg.DATASETS.TRAIN)
        # detectron2's own reading of the datasets, checked before the loader is built from it
        # (a second read of COCO's annotations would cost a minute and gigabytes)
        loader_args = _train_loader_from_config(cfg, loader_mapper(cfg, is_train=True))
        check_instance_masks(cfg, loader_args["dataset"])
        loader = build_detection_train_loader(**loader_args, **train_loader_prefetch(cfg))
        check_num_classes(cfg, cfg.DATASETS.TRAIN)  # the datasets are loaded now: no extra read
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        loader = build_detection_test_loader(cfg, dataset_name, mapper=loader_mapper(cfg, is_train=False))
        check_num_classes(cfg, [dataset_name])
        return loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        # The C++ COCOeval of detectron2 is not always compiled; pycocotools gives the same numbers.
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        if MetadataCatalog.get(dataset_name).get("evaluator_type") != "coco_panoptic_seg":
            return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder, use_fast_impl=False)
        if not cfg.MODEL.DETR.PANOPTIC_ON:
            raise ValueError(
                f"dataset {dataset_name!r} is evaluated as panoptic segmentation: set MODEL.MASK_ON True and "
                "MODEL.DETR.PANOPTIC_ON True"
            )
        # PQ, SQ, RQ of things and stuff; box and mask AP of the things
        things = COCOEvaluator(panoptic_things(dataset_name), tasks=tasks, output_dir=output_folder, use_fast_impl=False)
        return DatasetEvaluators([COCOPanopticEvaluator(dataset_name, output_folder), things])
