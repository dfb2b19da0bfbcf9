"""
Whole-model speed, side by side in one process: inference images per second (batch 1 and
a larger batch) and training steps per second (forward, backward, and each
implementation's own optimizer step), with the peak tensor memory of each (GPU or CPU),
for this project's model with each MODEL.DETR.OPS_IMPL ("auto", what a user gets; the
compiled ops; the pure PyTorch path), and,
given `--official PATH` (a checkout of the official Conditional DETR code, imported from
there for the measurement only), the official model on the same weights and images.

A MODEL.MASK_ON config of DETR (configs/COCO-PanopticSegmentation/detr_R_50_panoptic.yaml)
measures the panoptic model against the official DETRsegm (`--official` a checkout of
facebookresearch/detr) on COCO panoptic's 250 ids: inference through the official bbox,
segm and panoptic post-processing (ours: instances with masks and panoptic_seg), keeping
--panoptic-segments queries in both (the threshold between the scores of that many and
one more), and a training step of the mask head with the detector frozen
(MODEL.DETR.TRAIN_MASK_HEAD_ONLY; the official --frozen_weights), each training image
with a box-shaped mask per object.
Every repeat runs the implementations in turn and the median is kept, so that a change of
load weighs on all of them alike. Prints a table and writes JSON. `--runs N` runs the whole
benchmark N times, one after another, prints each run's speedups side by side and keeps
every run in the JSON ("runs"), each run in a process of its own: a goal holds only where it
holds in every run.

    python -m conditional_detr.tools.benchmark_model [--config-file F] [--device cpu|cuda]
        [--dtype fp32 bf16] [--official PATH] [--runs N] [--json PATH] [--quick] [KEY VALUE ...]

Inference runs at --inference-size (default 800x1216), pre- and post-processing included;
training at --train-size (default 512x683) with --train-batch images (default 2), each
with a few boxes. bf16 is autocast (CPU and CUDA); the weights stay fp32.
"""
import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from PIL import Image

from ..config import get_config
from ..checkpoint.official import DETR_PANOPTIC, convert_state_dict
from ..solver import build_optimizer
from .benchmarking import interleaved_times, machine_header, peak_memory_bytes
from .official_checkout import import_official

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(_REPO, "configs", "COCO-Detection", "conditional_detr_R_50_50ep.yaml")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# the official model's 91 COCO-id logits, so that the same weights load into both
NUM_CLASSES = 91
# the official panoptic model's (COCO panoptic ids up to 250)
PANOPTIC_NUM_CLASSES = 250
# MODEL.DETR.OPS_IMPL of each of our models: "auto" is what a user gets
IMPLEMENTATIONS = ("auto", "compiled", "pytorch")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    parser.add_argument("--official", metavar="PATH", help="checkout of the official Conditional DETR code")
    parser.add_argument("--inference-size", nargs=2, type=int, default=[800, 1216], metavar=("H", "W"))
    parser.add_argument("--inference-batch", type=int, default=None,
                        help="the larger inference batch (default 4 on CUDA, 2 on CPU)")
    parser.add_argument("--train-size", nargs=2, type=int, default=[512, 683], metavar=("H", "W"))
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--panoptic-segments", type=int, default=20,
                        help="MODEL.MASK_ON: the queries the panoptic post-processing keeps (default 20)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (CPU) or 20 (CUDA)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up")
    parser.add_argument("--runs", type=int, default=1, help="the whole benchmark this many times (default 1)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    for name in ("inference_size", "train_size"):
        if min(getattr(args, name)) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("train_batch", "runs"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    args.cfg = get_config(args.config_file, args.opts)
    if args.official:
        check_official_checkout(parser, args.official, args.cfg)
    if args.inference_batch is None:
        args.inference_batch = 4 if args.device == "cuda" else 2
    if args.repeats is None:
        args.repeats = 3 if args.quick else (20 if args.device == "cuda" else 5)
    args.warmup = 1 if args.quick else 2
    return args


def check_official_checkout(parser, path, cfg):
    """The official code the config is measured against: DETRsegm for a mask head, else Conditional DETR."""
    if cfg.MODEL.MASK_ON:
        if cfg.MODEL.META_ARCHITECTURE != "DETR":
            parser.error(f"--official with MODEL.MASK_ON: the official mask head (DETRsegm) is DETR's, "
                         f"but MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE}")
        if not all(os.path.isfile(os.path.join(path, "models", name)) for name in ("detr.py", "segmentation.py")):
            parser.error(f"--official {path}: not a checkout of the official DETR (no models/detr.py and "
                         "models/segmentation.py), which MODEL.MASK_ON is measured against")
    elif not os.path.isfile(os.path.join(path, "models", "conditional_detr.py")):
        parser.error(f"--official {path}: not a checkout of the official Conditional DETR "
                     "(no models/conditional_detr.py)")


# ---------------------------------------------------------------------------- inputs


def random_images(batch, size, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, *size), generator=generator, dtype=torch.uint8) for _ in range(batch)]


def random_targets(images, seed, num_classes=NUM_CLASSES, masks=False):
    """
    Three boxes per image: detectron2 instances (absolute xyxy) and official targets, with
    `masks` each box's pixels as its mask.
    """
    generator = torch.Generator().manual_seed(seed)
    instances, official = [], []
    for image in images:
        h, w = image.shape[1:]
        centres = torch.rand(3, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(3, 2, generator=generator) * 0.3 + 0.05
        cxcywh = torch.cat([centres, sizes], 1)
        xyxy = torch.cat([centres - sizes / 2, centres + sizes / 2], 1) * torch.tensor([w, h, w, h])
        labels = torch.randint(1, num_classes, (3,), generator=generator)
        item = Instances((h, w))
        item.gt_boxes, item.gt_classes = Boxes(xyxy), labels
        target = {"labels": labels, "boxes": cxcywh}
        if masks:
            ys, xs = torch.arange(h)[:, None] + 0.5, torch.arange(w) + 0.5
            x0, y0, x1, y1 = xyxy[:, :, None, None].unbind(1)
            target["masks"] = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            item.gt_masks = BitMasks(target["masks"])
        instances.append(item)
        official.append(target)
    return instances, official


# ---------------------------------------------------------------------------- models


def build_ours(cfg, impl, device):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DETR.OPS_IMPL = impl
    cfg.MODEL.DEVICE = device
    return build_model(cfg)


class OfficialModel:
    """
    The official model, criterion and post-processing built from a checkout with the
    official defaults for the config's depth and dilation; imported for measurement only.
    With MODEL.MASK_ON, DETR's DETRsegm on COCO panoptic (250 ids), its detector frozen
    where MODEL.DETR.TRAIN_MASK_HEAD_ONLY is (the official --frozen_weights, whose file
    only main.py reads).
    """

    def __init__(self, path, cfg, device):
        main, backbone, models, self.misc = import_official(path, "main", "models.backbone", "models", "util.misc")
        backbone.is_main_process = lambda: False  # no ImageNet download: weights come from ours
        options = ["--device", device, "--backbone", f"resnet{cfg.MODEL.RESNETS.DEPTH}"]
        if cfg.MODEL.RESNETS.RES5_DILATION > 1:
            options.append("--dilation")
        if cfg.MODEL.MASK_ON:
            options += ["--masks", "--dataset_file", "coco_panoptic"]
            if cfg.MODEL.DETR.TRAIN_MASK_HEAD_ONLY:
                options += ["--frozen_weights", "unread"]
        self.args = main.get_args_parser().parse_args(options)
        self.model, self.criterion, self.postprocessors = models.build_model(self.args)
        self.model.to(device)
        self.criterion.to(device)

    def forward(self, images):
        mean = torch.tensor([0.485, 0.456, 0.406], device=images[0].device).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=images[0].device).view(3, 1, 1)
        samples = self.misc.nested_tensor_from_tensor_list([(image.float() / 255 - mean) / std for image in images])
        return self.model(samples)

    def infer(self, images):
        """The official evaluation's post-processing: boxes, then with a mask head masks and "panoptic"."""
        outputs = self.forward(images)
        sizes = torch.tensor([image.shape[1:] for image in images], device=images[0].device)
        results = self.postprocessors["bbox"](outputs, sizes)
        if "panoptic" in self.postprocessors:
            results = self.postprocessors["segm"](results, outputs, sizes, sizes)
            for result, panoptic in zip(results, self.postprocessors["panoptic"](outputs, sizes, sizes)):
                result["panoptic"] = panoptic
        return results

    def losses(self, images, targets):
        losses = self.criterion(self.forward(images), targets)
        return sum(losses[k] * w for k, w in self.criterion.weight_dict.items() if k in losses)


def our_state_dict_from_official(official_model):
    state_dict = official_model.state_dict()
    if DETR_PANOPTIC.recognizes(state_dict):
        return DETR_PANOPTIC.convert(state_dict, num_classes=None)
    return convert_state_dict(state_dict, num_classes=None)


# ---------------------------------------------------------------------------- steps


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=dtype)


def our_inference(model, images, device, dtype):
    inputs = [{"image": image} for image in images]

    def run():
        with torch.no_grad(), autocast(device, dtype):
            return model(inputs)

    return run


def our_training_step(model, cfg, images, instances, device, dtype):
    """One step as the trainer takes it: the project's optimizer (fused AdamW, full-model clipping)."""
    inputs = [{"image": image, "instances": item} for image, item in zip(images, instances)]
    optimizer = build_optimizer(cfg, model)

    def run():
        with autocast(device, dtype):
            total = sum(model(inputs).values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    return run


def official_inference(official, images, device, dtype):
    def run():
        with torch.no_grad(), autocast(device, dtype):
            return official.infer(images)

    return run


def official_training_step(official, images, targets, device, dtype):
    """One step as the official main.py and engine.py take it: AdamW, clipping to 0.1."""
    args, model = official.args, official.model
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if "backbone" not in n]},
        {"params": [p for n, p in trainable if "backbone" in n], "lr": args.lr_backbone},
    ]
    # a frozen detector leaves the backbone's group empty
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, weight_decay=args.weight_decay)

    def run():
        with autocast(device, dtype):
            total = official.losses(images, targets)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()

    return run


# ---------------------------------------------------------------------------- benchmark


def build_systems(args, cfg):
    """{name: (inference model, training model, official wrapper or None)}, same weights."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DETR.NUM_CLASSES = PANOPTIC_NUM_CLASSES if cfg.MODEL.MASK_ON else NUM_CLASSES
    torch.manual_seed(0)
    systems = {}
    official = None
    if args.official:
        official = OfficialModel(args.official, cfg, args.device)
        state_dict = our_state_dict_from_official(official.model)
    for impl in IMPLEMENTATIONS:
        model = build_ours(cfg, impl, args.device)
        if official is None and not systems:
            state_dict = model.state_dict()
        model.load_state_dict(state_dict)
        systems[impl] = model
    return systems, official


def benchmark(args):
    cfg = args.cfg
    systems, official = build_systems(args, cfg)
    device = args.device
    inference_images = {
        batch: [image.to(device) for image in random_images(batch, args.inference_size, seed=batch)]
        for batch in sorted({1, args.inference_batch})
    }
    train_images = [image.to(device) for image in random_images(args.train_batch, args.train_size, seed=7)]
    num_classes = next(iter(systems.values())).num_classes
    instances, official_targets = random_targets(train_images, 7, num_classes, masks=cfg.MODEL.MASK_ON)
    instances = [item.to(device) for item in instances]
    official_targets = [{k: v.to(device) for k, v in t.items()} for t in official_targets]

    results = []
    if cfg.MODEL.MASK_ON and cfg.MODEL.DETR.PANOPTIC_ON:
        threshold = keep_panoptic_segments(systems, official, inference_images[1], args.panoptic_segments)
        results.append({"task": "panoptic_threshold", "threshold": threshold, "segments": args.panoptic_segments})
        if official is not None:
            results.append(compare_panoptic(systems, official, inference_images[1], device))
    elif official is not None:
        results.append(compare_detections(systems, official, inference_images[1], device))
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        for batch, images in inference_images.items():
            fns = {}
            for name, model in systems.items():
                model.eval()
                fns[name] = our_inference(model, images, device, dtype)
            if official is not None:
                official.model.eval()
                fns["official"] = official_inference(official, images, device, dtype)
            results.append(measure(fns, args, "inference", dtype_name, batch, args.inference_size))
        fns = {}
        for name, model in systems.items():
            # a copy each, so that every implementation steps from the same weights
            train_model = copy.deepcopy(model).train()
            fns[name] = our_training_step(train_model, cfg, train_images, instances, device, dtype)
        if official is not None:
            official.model.train()
            fns["official"] = official_training_step(official, train_images, official_targets, device, dtype)
        results.append(measure(fns, args, "training", dtype_name, args.train_batch, args.train_size))
    return results


def compare_detections(systems, official, images, device):
    """Largest score difference of each implementation's fp32 detections to the official ones."""
    official.model.eval()
    expected = official_inference(official, images, device, None)()[0]["scores"]
    row = {"task": "official_detections", "max_score_difference": {}}
    for name, model in systems.items():
        model.eval()
        scores = our_inference(model, images, device, None)()[0]["instances"].scores
        row["max_score_difference"][name] = (scores - expected).abs().max().item()
    return row


def keep_panoptic_segments(systems, official, images, count):
    """
    The panoptic threshold (set in every implementation) between the score of the `count`-th
    best query that is not "no object" and the next one's, on our model's outputs: random
    weights leave every score far below the trained models' 0.85.
    """
    model = next(iter(systems.values())).eval()
    with torch.no_grad():
        logits = model.forward_outputs(model.preprocess_image([{"image": image} for image in images]))["pred_logits"][0]
    scores, labels = logits.softmax(-1).max(-1)
    scores = scores[labels != logits.shape[-1] - 1].sort(descending=True).values.tolist() + [0.0]
    count = min(count, len(scores) - 1)
    threshold = (scores[count - 1] + scores[count]) / 2 if count else 1.0
    for model in systems.values():
        model.panoptic_threshold = threshold
    if official is not None:
        official.postprocessors["panoptic"].threshold = threshold
    return threshold


def official_category_map(panoptic):
    """The official PostProcessPanoptic's PNG and segments as [h, w] categories, -1 where none."""
    rgb = np.asarray(Image.open(io.BytesIO(panoptic["png_string"])).convert("RGB"), dtype=np.int64)
    ids = torch.from_numpy(rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2])
    return category_map(ids, panoptic["segments_info"])


def category_map(segment_ids, segments):
    categories = torch.full(segment_ids.shape, -1, dtype=torch.int64)
    for segment in segments:
        categories[segment_ids == segment["id"]] = segment["category_id"]
    return categories


def compare_panoptic(systems, official, images, device):
    """The fraction of pixels of the same category in each implementation's fp32 panoptic segmentation as the official."""
    official.model.eval()
    expected = official_category_map(official_inference(official, images, device, None)()[0]["panoptic"])
    row = {"task": "official_panoptic", "equal_pixels": {}}
    for name, model in systems.items():
        model.eval()
        segment_ids, segments = our_inference(model, images, device, None)()[0]["panoptic_seg"]
        ours = category_map(segment_ids.cpu(), segments)
        row["equal_pixels"][name] = (ours == expected).double().mean().item() if ours.shape == expected.shape else 0.0
    return row


def measure(fns, args, task, dtype_name, batch, size):
    """
    Median milliseconds and throughput of each system, the fastest and slowest round beside
    the median, and the speedup over the official model: of the medians, and its lowest and
    highest among the rounds (each round's systems ran one after another).
    """
    times = interleaved_times(fns, args.device, args.repeats, args.warmup)
    row = {"task": task, "dtype": dtype_name, "batch": batch, "size": list(size), "ms": {}, "ms_range": {},
           "per_second": {}}
    for name, ms in times.items():
        if isinstance(ms, Exception):
            row["ms"][name] = f"error: {ms}"
            continue
        row["ms"][name] = statistics.median(ms)
        row["ms_range"][name] = [min(ms), max(ms)]
        # images per second for inference, steps per second for training
        row["per_second"][name] = (batch if task == "inference" else 1) * 1e3 / row["ms"][name]
    row["peak_memory_bytes"] = {
        name: peak_memory_bytes(fns[name], args.device) for name in row["ms_range"]
    }
    if "official" in row["per_second"]:
        official = times["official"]
        row["speedup_vs_official"] = {
            name: row["per_second"][name] / row["per_second"]["official"]
            for name in row["per_second"] if name != "official"
        }
        row["speedup_vs_official_range"] = {}
        for name in row["speedup_vs_official"]:
            rounds = [theirs / ours for theirs, ours in zip(official, times[name])]
            row["speedup_vs_official_range"][name] = [min(rounds), max(rounds)]
    return row


def print_table(results, header):
    features = header.get("vector_instructions")
    limits = ", ".join(f"{k}={v}" for k, v in header.get("isa_limits", {}).items())
    print(f"{header['device']} ({header['device_type']}, {header['threads']} threads), torch {header['torch']}"
          + (f", CPU features: {' '.join(features)}" if features else "") + (f", limited by {limits}" if limits else "")
          + (f", compiled ops at {header['ops_vector_level']}" if header.get("ops_vector_level") else ""))
    print(f"{'task':<10} {'dtype':<5} {'batch':>5}  {'size':<9} {'implementation':<10} {'ms':>10} "
          f"{'(min-max)':>15} {'per s':>8} {'vs official':>11} {'(min-max)':>13} {'peak MiB':>9}")
    for row in results:
        if row["task"] == "official_detections":
            differences = ", ".join(f"{k} {v:.1e}" for k, v in row["max_score_difference"].items())
            print(f"largest score difference to the official detections (fp32): {differences}")
            continue
        if row["task"] == "panoptic_threshold":
            print(f"panoptic threshold {row['threshold']:.4g}: {row['segments']} queries kept")
            continue
        if row["task"] == "official_panoptic":
            equal = ", ".join(f"{k} {100 * v:.2f}%" for k, v in row["equal_pixels"].items())
            print(f"pixels of the official panoptic segmentation's category (fp32): {equal}")
            continue
        for name, ms in row["ms"].items():
            per_second = row["per_second"].get(name)
            speedup = row.get("speedup_vs_official", {}).get(name)
            peak = row["peak_memory_bytes"].get(name)
            ms_range = row["ms_range"].get(name)
            speedup_range = row.get("speedup_vs_official_range", {}).get(name)
            print(
                f"{row['task']:<10} {row['dtype']:<5} {row['batch']:>5}  {'x'.join(map(str, row['size'])):<9} "
                f"{name:<10} {ms if isinstance(ms, str) else f'{ms:10.1f}':>10} "
                f"{'' if ms_range is None else f'({ms_range[0]:.0f}-{ms_range[1]:.0f})':>15} "
                f"{'' if per_second is None else f'{per_second:8.2f}':>8} "
                f"{'' if speedup is None else f'{speedup:10.2f}x':>11} "
                f"{'' if speedup_range is None else f'({speedup_range[0]:.2f}-{speedup_range[1]:.2f})':>13} "
                f"{'' if peak is None else f'{peak / 2**20:9.0f}':>9}"
            )


def print_runs(runs):
    """Each timed row's speedups over the official model, run by run (lowest-highest round)."""
    print(f"\nvs official in each of {len(runs)} runs:")
    for rows in zip(*runs):
        if "speedup_vs_official" not in rows[0]:
            continue
        row = rows[0]
        for name in row["speedup_vs_official"]:
            each = " / ".join(
                f"{r['speedup_vs_official'][name]:.2f}x ({r['speedup_vs_official_range'][name][0]:.2f}-"
                f"{r['speedup_vs_official_range'][name][1]:.2f})" for r in rows
            )
            print(f"{row['task']:<10} {row['dtype']:<5} {row['batch']:>5}  {name:<10} {each}")


def separate_runs(args, argv):
    """
    Each run of `--runs` in a process of its own, as a user's: within one process a run leaves
    the allocator holding memory that the next run's models reuse, which speeds up the official
    model's inference more than ours (docs/speed.md#the-allocator), so later runs would not
    measure what the first does. Returns each run's results.
    """
    argv = list(argv)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for run in range(args.runs):
            print(f"\nrun {run + 1} of {args.runs}", flush=True)
            path = os.path.join(folder, f"run{run}.json")
            # options before argv: its config overrides, if any, come last
            command = [sys.executable, "-m", "conditional_detr.tools.benchmark_model", "--runs", "1", "--json", path, *argv]
            subprocess.run(command, check=True)
            with open(path) as f:
                runs.append(json.load(f)["results"])
    return runs


def main(argv=None):
    """Returns each run's results (one list of rows per run)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    header = machine_header(args.device, config_file=os.path.relpath(args.config_file, _REPO),
                            official=bool(args.official), repeats=args.repeats)
    if args.runs == 1:
        runs = [benchmark(args)]
        print_table(runs[0], header)
    else:
        runs = separate_runs(args, without_options(argv, {"--runs": 1, "--json": 1}))
        print_runs(runs)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({**header, **({"results": runs[0]} if args.runs == 1 else {"runs": runs})}, f, indent=2)
    return runs


def without_options(argv, options):
    """`argv` without the given options and their values ({option: number of values})."""
    kept, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg in options:
            skip = options[arg]
        elif arg.split("=", 1)[0] not in options:
            kept.append(arg)
    return kept


if __name__ == "__main__":
    main()
