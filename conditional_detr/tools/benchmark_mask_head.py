"""
What DETR's mask head costs each detector, measured side by side in one run: parameters,
the detector's FLOPs and the head's for every query (fvcore), and the peak memory of one training
step (forward, losses, backward) of the detector alone, with the head run for the matched
queries only (this project's training), and with the head run for every query (the
official code's).

    python -m conditional_detr.tools.benchmark_mask_head [--image-size H W] [--json PATH]
"""
import argparse

import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from fvcore.nn import FlopCountAnalysis

from ..config import get_config
from ..model_zoo import get_config_file
from .analyze_model import count_flops, synthetic_inputs
from .benchmarking import machine_header, peak_memory_mib, write_json

CONFIGS = {
    "DETR": "COCO-Detection/detr_R_50_500ep.yaml",
    "ConditionalDETR": "COCO-Detection/conditional_detr_R_50_50ep.yaml",
    "DeformableDETR": "COCO-Detection/deformable_detr_R_50_50ep.yaml",
}


def build(architecture, mask_on, device):
    cfg = get_config(get_config_file(CONFIGS[architecture]), [
        "MODEL.DEVICE", device, "MODEL.MASK_ON", mask_on, "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
    ])
    torch.manual_seed(0)
    return build_model(cfg).train()


def training_batch(height, width, device, num_objects=5, seed=0):
    """Two images, each with `num_objects` boxes and their box-filling masks."""
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(2):
        xy = torch.rand(num_objects, 2, generator=generator) * torch.tensor([width / 2, height / 2])
        boxes = torch.cat([xy, xy + torch.tensor([width / 3, height / 3])], 1)
        masks = torch.zeros(num_objects, height, width, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            mask[y0:y1, x0:x1] = True
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, 80, (num_objects,), generator=generator)
        instances.gt_masks = BitMasks(masks)
        image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8).float()
        batch.append({"image": image.to(device), "instances": instances})
    return batch


def step_every_query(model, batch):
    """One training step with every query's masks, as the official code computes them."""
    images = model.preprocess_image(batch)
    outputs = model.forward_outputs(images)  # "pred_masks" of every query
    losses = model.criterion(outputs, model.prepare_targets(batch, images.image_sizes))
    sum(losses[k] * model.criterion.weight_dict[k] for k in losses).backward()


def step(model, batch):
    sum(model(batch).values()).backward()


def head_gflops(model, height, width):
    """fvcore's GFLOPs of the attention map and the convolutional head for every query of one image."""
    channels = model.mask_head.lay1.in_channels - model.bbox_attention.num_heads
    shapes = model.backbone.output_shape()
    size = lambda stride: (-(-height // stride), -(-width // stride))  # noqa: E731
    queries = torch.zeros(1, model.num_queries, channels)
    memory = torch.zeros(1, channels, *size(32))
    attention = FlopCountAnalysis(model.bbox_attention.cpu(), (queries, memory, None))
    maps = torch.zeros(model.num_queries, model.bbox_attention.num_heads, *size(32))
    fpns = [torch.zeros(1, shapes[n].channels, *size(shapes[n].stride)) for n in ("res4", "res3", "res2")]
    head = FlopCountAnalysis(model.mask_head.cpu(), (memory, maps, fpns, torch.zeros(model.num_queries, dtype=torch.long)))
    for analysis in (attention, head):
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
    return (attention.total() + head.total()) / 1e9


def measure(architecture, height, width, device):
    batch = training_batch(height, width, device)
    detector = build(architecture, False, device)
    masked = build(architecture, True, device)
    parameters = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    detector_gflops = count_flops(build(architecture, False, "cpu").eval(), synthetic_inputs(height, width))[0] / 1e9
    row = {
        "detector_parameters": parameters(detector),
        "detector_gflops": detector_gflops,
        "head_parameters": parameters(masked) - parameters(detector),
        "queries": masked.num_queries,
        "head_gflops_every_query": head_gflops(build(architecture, True, "cpu"), height, width),
        "peak_train_MiB_detector": peak_memory_mib(lambda: step(detector, batch), device),
        "peak_train_MiB_head_matched_queries": peak_memory_mib(lambda: step(masked, batch), device),
        "peak_train_MiB_head_every_query": peak_memory_mib(lambda: step_every_query(masked, batch), device),
    }
    matched, every = row["peak_train_MiB_head_matched_queries"], row["peak_train_MiB_head_every_query"]
    row["every_query_over_matched"] = every / matched if matched and every else None
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--image-size", type=int, nargs=2, default=(512, 640), metavar=("H", "W"))
    parser.add_argument("--detectors", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results there")
    args = parser.parse_args(argv)
    height, width = args.image_size
    header = machine_header(args.device, image_size=[height, width], batch=2, objects_per_image=5)
    print(header)
    results = {}
    for architecture in args.detectors:
        results[architecture] = row = measure(architecture, height, width, args.device)
        print(
            f"{architecture:16s} params {row['detector_parameters']:,} + head {row['head_parameters']:,}  GFLOPs "
            f"{row['detector_gflops']:.1f} + head {row['head_gflops_every_query']:.1f} ({row['queries']} queries)  peak train MiB: "
            f"detector {row['peak_train_MiB_detector']:.0f}, head on matched queries "
            f"{row['peak_train_MiB_head_matched_queries']:.0f}, on every query {row['peak_train_MiB_head_every_query']:.0f}"
        )
    if args.json:
        ratios = {a: r["every_query_over_matched"] for a, r in results.items()}
        write_json(args.json, header, results, {"every_query_peak_over_matched_queries_peak": ratios})
    return results


if __name__ == "__main__":
    main()
