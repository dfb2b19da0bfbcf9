"""
Convergence study: train Conditional DETR, DETR and Deformable DETR with otherwise
identical settings, evaluate each every K iterations, and plot AP against iterations (the
paper's Figure 2, with the multi-scale baseline as a third curve).

    python -m conditional_detr.tools.convergence [--output-dir output/convergence]
        [--iterations N] [--eval-period K] [--system NAME=CONFIG ...] [KEY VALUE ...]

By default the three systems train on the embedded shapes dataset
(configs/quick_schedules/{conditional_detr,detr,deformable_detr}_shapes.yaml). KEY VALUE overrides apply
to every system, e.g. `SOLVER.IMS_PER_BATCH 16`. Each system trains in its own folder
under the output directory and resumes from its last checkpoint when run again, so a
killed study loses at most one evaluation period; a finished system is not retrained
(delete its folder to retrain it). Writes convergence.json (the AP curves,
the last AP of the slowest system and the iteration at which each system first reached
it) and convergence.png.

At COCO scale on GPUs, train each system with train_net.py, e.g.
`python train_net.py --num-gpus 8 --config-file CONFIG TEST.EVAL_PERIOD K OUTPUT_DIR DIR`,
then draw the same figure from their logs with `--from-metrics NAME=DIR ...`.
"""

import argparse
import json
import logging
import os

import yaml
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from .. import data  # noqa: F401 (registers shapes_train / shapes_val)
from ..engine import Trainer, get_config

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_QUICK = os.path.join(_REPO, "configs", "quick_schedules")
DEFAULT_SYSTEMS = (
    f"conditional_detr={os.path.join(_QUICK, 'conditional_detr_shapes.yaml')}",
    f"detr={os.path.join(_QUICK, 'detr_shapes.yaml')}",
    f"deformable_detr={os.path.join(_QUICK, 'deformable_detr_shapes.yaml')}",
)
AP_KEY = "bbox/AP"

logger = logging.getLogger("detectron2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="output/convergence")
    parser.add_argument(
        "--system", action="append", metavar="NAME=CONFIG",
        help="a system to train (repeatable); default: Conditional DETR, DETR and Deformable DETR on shapes",
    )
    parser.add_argument(
        "--from-metrics", action="append", metavar="NAME=OUTPUT_DIR",
        help="plot finished runs from their metrics.json instead of training (repeatable)",
    )
    parser.add_argument(
        "--iterations", type=int, default=None,
        help="training iterations of every system (default: the configs' SOLVER.MAX_ITER); "
        "the LR drops keep their fraction of the schedule",
    )
    parser.add_argument("--eval-period", type=int, default=200, help="iterations between evaluations")
    parser.add_argument(
        "opts", default=[], nargs=argparse.REMAINDER, help="config overrides for every system"
    )
    return parser.parse_args(argv)


def _split_pairs(pairs, flag):
    named = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} expects NAME=VALUE, got {pair!r}")
        if name in named:
            raise ValueError(f"{flag}: system name {name!r} given twice")
        named[name] = value
    return named


def system_config(config_file, output_dir, iterations, eval_period, opts):
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    cfg = get_config(config_file, list(opts))
    cfg.defrost()
    if iterations is not None:
        fraction = [step / cfg.SOLVER.MAX_ITER for step in cfg.SOLVER.STEPS]
        cfg.SOLVER.MAX_ITER = iterations
        cfg.SOLVER.STEPS = tuple(round(f * iterations) for f in fraction)
    cfg.TEST.EVAL_PERIOD = eval_period
    cfg.SOLVER.CHECKPOINT_PERIOD = eval_period
    cfg.OUTPUT_DIR = output_dir
    cfg.freeze()
    return cfg


def train_system(cfg):
    """Train one system in cfg.OUTPUT_DIR, resuming a killed run; a finished run is kept."""
    if os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth")):
        logger.info(f"{cfg.OUTPUT_DIR} holds a finished run: not trained again")
        return
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    # the same seed for every system: identical data order and augmentation
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()


def read_max_iter(output_dir):
    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.yaml in {output_dir}: was the run trained there?")
    with open(path) as f:
        return int(yaml.safe_load(f)["SOLVER"]["MAX_ITER"])


def read_ap_curve(output_dir):
    """
    (iterations trained, AP) of every evaluation logged in OUTPUT_DIR/metrics.json, the last
    entry per iteration.
    """
    max_iter = read_max_iter(output_dir)
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.json in {output_dir}: was the run trained there?")
    by_iteration = {}
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # a run killed mid-write leaves a partial last line
                logger.warning(f"{path}:{line_number}: skipping a line that is not JSON")
                continue
            if AP_KEY in record:
                # detectron2 logs a periodic evaluation after i iterations as iteration i - 1,
                # and the final one as MAX_ITER
                by_iteration[min(record["iteration"] + 1, max_iter)] = record[AP_KEY]
    if not by_iteration:
        raise ValueError(f"{path} has no '{AP_KEY}' entries: set TEST.EVAL_PERIOD > 0")
    iterations = sorted(by_iteration)
    return iterations, [by_iteration[i] for i in iterations]


def first_reaching(iterations, aps, target):
    """The first evaluated iteration whose AP is at least `target`, or None."""
    return next((i for i, ap in zip(iterations, aps) if ap >= target), None)


def summarize(curves):
    """
    The slowest system's last AP, and the first iteration at which each system
    reached it; speedup = the slowest system's iterations / the system's iterations.
    """
    slowest = min(curves, key=lambda name: curves[name]["AP"][-1])
    target = curves[slowest]["AP"][-1]
    target_iterations = curves[slowest]["iterations"][-1]
    reached = {}
    for name, curve in curves.items():
        iteration = first_reaching(curve["iterations"], curve["AP"], target)
        reached[name] = {
            "iteration": iteration,
            "speedup": None if iteration is None else target_iterations / iteration,
        }
    return {
        "reference_system": slowest,
        "reference_final_AP": target,
        "reference_iterations": target_iterations,
        "first_reaching_reference_final_AP": reached,
    }


def plot(curves, summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, curve in curves.items():
        ax.plot(curve["iterations"], curve["AP"], marker="o", markersize=3, label=name)
    ax.axhline(summary["reference_final_AP"], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("training iterations")
    ax.set_ylabel("AP")
    ax.set_title(f"AP on the validation set ({summary['reference_system']}'s final AP dotted)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    setup_logger(args.output_dir)
    if args.from_metrics:
        run_dirs = _split_pairs(args.from_metrics, "--from-metrics")
    else:
        systems = _split_pairs(args.system or DEFAULT_SYSTEMS, "--system")
        run_dirs = {}
        for name, config_file in systems.items():
            run_dirs[name] = os.path.join(args.output_dir, name)
            cfg = system_config(
                config_file, run_dirs[name], args.iterations, args.eval_period, args.opts
            )
            logger.info(f"convergence study: training {name} from {config_file}")
            train_system(cfg)

    curves = {}
    for name, run_dir in run_dirs.items():
        iterations, aps = read_ap_curve(run_dir)
        curves[name] = {"iterations": iterations, "AP": aps, "output_dir": run_dir}
    summary = summarize(curves)
    result = {"curves": curves, **summary}
    with open(os.path.join(args.output_dir, "convergence.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(curves, summary, os.path.join(args.output_dir, "convergence.png"))

    print(f"\n{summary['reference_system']} ends at AP {summary['reference_final_AP']:.1f} "
          f"after {summary['reference_iterations']} iterations; first reached at:")
    for name, reached in summary["first_reaching_reference_final_AP"].items():
        if reached["iteration"] is None:
            print(f"  {name}: never")
        else:
            print(f"  {name}: iteration {reached['iteration']} ({reached['speedup']:.1f}x fewer)")
    print(f"figure: {os.path.join(args.output_dir, 'convergence.png')}")
    return result


if __name__ == "__main__":
    main()
