#!/usr/bin/env python
"""
Conditional DETR training and evaluation script.

This script is similar to detectron2's tools/train_net.py, with the Trainer of
`conditional_detr.engine`: AdamW with full-model gradient clipping, DETR's data
augmentation and COCO evaluation.
"""

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import conditional_detr  # noqa: F401 (registers the meta-architecture and the embedded datasets)
from conditional_detr.checkpoint import ConditionalDETRCheckpointer
from conditional_detr.config_checks import check_device
from conditional_detr.data.datasets import add_coco_datasets
from conditional_detr.engine import (
    Trainer,
    get_config,
    hide_gpus_for_cpu_workers,
    limit_cpu_threads,
)


def setup(args):
    """
    Create configs and perform basic setups.
    """
    cfg = get_config(args.config_file, args.opts)
    add_coco_datasets(cfg, getattr(args, "coco_dataset", ()))  # train_net.py --coco-dataset
    cfg.freeze()
    default_setup(cfg, args)
    # the project's own messages (e.g. what a fine-tuning kept of a class head) in log.txt too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="conditional_detr", abbrev_name="cdetr")
    limit_cpu_threads(cfg)
    return cfg


def main(args):
    cfg = setup(args)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        ConditionalDETRCheckpointer.from_config(cfg, model, cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--coco-dataset",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON_FILE", "IMAGE_ROOT"),
        help="register a COCO-format dataset as NAME, for DATASETS.TRAIN / DATASETS.TEST "
        "(repeatable; appended to DATASETS.COCO_INSTANCES)",
    )
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    world_size = args.num_gpus * args.num_machines
    cfg = get_config(args.config_file, args.opts)
    check_device(cfg.MODEL.DEVICE, args.num_gpus)
    hide_gpus_for_cpu_workers(cfg, world_size)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
