"""
Times multi-scale deformable attention side by side in one process: the compiled op and the
pure-PyTorch grid_sample reference, forward and forward+backward, at Deformable DETR's R50
shapes for an 800x1216 image (levels 100x152, 50x76, 25x38, 13x19; 8 heads of 32 channels,
4 points per level): the encoder (every one of the 20,197 positions is a query) and the
decoder (300 queries), batch 1 and 2. Every repeat times the implementations in turn and the
median is kept, as in benchmark_attention. Also reports the memory autograd keeps for backward
(and the peak on GPU). Prints a table and writes JSON.

    python -m conditional_detr.tools.benchmark_deformable_attention \
        [--device cpu|cuda] [--json PATH] [--quick]
"""
import argparse
import functools
import json

import torch

from conditional_detr import ops
from conditional_detr.tools.benchmarking import (
    forward_and_backward_medians,
    machine_header,
    format_timings,
    peak_memory_mib,
    saved_activation_bytes,
    write_json,
)

LEVELS = [(100, 152), (50, 76), (25, 38), (13, 19)]
NUM_HEADS, CHANNELS, NUM_POINTS = 8, 32, 4
DECODER_QUERIES = 300


def implementations():
    return {
        "compiled": functools.partial(ops.multi_scale_deformable_attention, impl="compiled"),
        "pytorch": functools.partial(ops.multi_scale_deformable_attention, impl="pytorch"),
    }


def make_inputs(stage, batch, dtype, device, levels=LEVELS):
    """
    Inputs as the model makes them: the encoder's queries are the pixels of every level with
    their centres as reference points, the decoder's are spread over the image; sampling
    offsets of a couple of pixels around them.
    """
    generator = torch.Generator().manual_seed(0)
    spatial_shapes = torch.tensor(levels, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    num_values = int(areas.sum())
    if stage == "encoder":
        centres = []
        for height, width in levels:
            y, x = torch.meshgrid(
                (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width,
                indexing="ij",
            )
            centres.append(torch.stack([x.flatten(), y.flatten()], -1))
        reference = torch.cat(centres)[None].expand(batch, -1, -1)
    else:
        reference = torch.rand(batch, DECODER_QUERIES, 2, generator=generator)
    num_queries = reference.shape[1]
    shape = (batch, num_queries, NUM_HEADS, len(levels), NUM_POINTS)
    size = spatial_shapes.flip(-1).double()[:, None, :]  # [L, 1, (W, H)]
    offsets = 2 * torch.randn(*shape, 2, generator=generator, dtype=torch.float64)
    locations = reference[:, :, None, None, None, :].double() + offsets / size
    weights = torch.randn(batch, num_queries, NUM_HEADS, len(levels) * NUM_POINTS,
                          generator=generator).softmax(-1).view(shape)
    value = torch.randn(batch, num_values, NUM_HEADS, CHANNELS, generator=generator)
    tensors = [t.to(device, dtype) for t in (value, locations, weights)]
    return tensors, spatial_shapes.to(device), level_start_index.to(device)


def benchmark(device, dtypes, cases, repeats, warmup, levels=LEVELS):
    results = []
    for stage, batch in cases:
        for dtype in dtypes:
            tensors, spatial_shapes, level_start_index = make_inputs(stage, batch, dtype, device,
                                                                     levels)
            leaves = [t.detach().requires_grad_(True) for t in tensors]
            num_queries = tensors[1].shape[1]

            def call(attention, value, locations, weights):
                return attention(value, spatial_shapes, level_start_index, locations, weights)

            def forward(attention):
                with torch.no_grad():
                    return call(attention, *tensors)

            grad = torch.randn(batch, num_queries, NUM_HEADS * CHANNELS, device=device, dtype=dtype)

            def forward_backward(attention):
                torch.autograd.grad(call(attention, *leaves), leaves, grad)

            impls = implementations()
            forward_ms, forward_backward_ms = forward_and_backward_medians(
                impls, forward, forward_backward, device, repeats, warmup
            )
            for name, attention in impls.items():
                row = {
                    "stage": stage, "batch": batch, "queries": num_queries,
                    "dtype": str(dtype).replace("torch.", ""), "impl": name,
                    "forward_ms": forward_ms[name],
                    "forward_backward_ms": forward_backward_ms[name],
                    # the index tensors count as inputs: they are the model's, not the op's
                    "saved_for_backward_MiB": saved_activation_bytes(
                        lambda: call(attention, *leaves),
                        [*leaves, spatial_shapes, level_start_index],
                    ) / 2**20,
                }
                row["peak_forward_backward_MiB"] = peak_memory_mib(
                    functools.partial(forward_backward, attention), device
                )
                results.append(row)
                print(format_row(row), flush=True)
    return results


def format_row(row):
    return f"{row['stage']:>7} b{row['batch']:<2} {row['dtype']:>8} {row['impl']:>9} " + format_timings(row)


def speedups(results):
    """compiled against the reference, per case: how many times faster, and the memory saved."""
    by_case = {}
    for row in results:
        by_case.setdefault((row["stage"], row["batch"], row["dtype"]), {})[row["impl"]] = row
    table = []
    for (stage, batch, dtype), rows in by_case.items():
        mine, theirs = rows["compiled"], rows["pytorch"]
        entry = {
            "stage": stage, "batch": batch, "dtype": dtype, "versus": "pytorch",
            "forward_speedup": theirs["forward_ms"] / mine["forward_ms"],
            "forward_backward_speedup": theirs["forward_backward_ms"] / mine["forward_backward_ms"],
            "saved_MiB_compiled": mine["saved_for_backward_MiB"],
            "saved_MiB_pytorch": theirs["saved_for_backward_MiB"],
        }
        if mine["peak_forward_backward_MiB"] and theirs["peak_forward_backward_MiB"]:
            entry["peak_memory_ratio"] = (
                theirs["peak_forward_backward_MiB"] / mine["peak_forward_backward_MiB"]
            )
        table.append(entry)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="where to write the results (JSON)")
    parser.add_argument("--quick", action="store_true",
                        help="decoder batch 1, fp32 only, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)

    device = args.device
    if not ops.has_ops_for(device):
        raise SystemExit(f"compiled ops unavailable on {device}: {ops.unavailable_reason(device)}")
    if args.quick:
        cases, dtypes = [("decoder", 1)], [torch.float32]
    else:
        cases = [("encoder", 1), ("encoder", 2), ("decoder", 1), ("decoder", 2)]
        dtypes = [torch.float32]
        if device == "cuda":
            dtypes += [torch.bfloat16] if torch.cuda.is_bf16_supported() else [torch.float16]
    repeats = args.repeats or (5 if device == "cpu" or args.quick else 20)
    warmup = 1 if device == "cpu" else 5

    header = machine_header(device, levels=LEVELS, heads=NUM_HEADS, channels=CHANNELS,
                            points=NUM_POINTS, decoder_queries=DECODER_QUERIES, repeats=repeats)
    print(json.dumps(header))
    results = benchmark(device, dtypes, cases, repeats, warmup)
    ratios = speedups(results)
    print("\ncompiled vs pytorch   case             fwd x   fwd+bwd x"
          "   saved MiB (compiled / pytorch)")
    for r in ratios:
        print(f"{r['stage']:>16} b{r['batch']:<2} {r['dtype']:>8}   {r['forward_speedup']:7.2f}   "
              f"{r['forward_backward_speedup']:9.2f}   {r['saved_MiB_compiled']:8.1f} / "
              f"{r['saved_MiB_pytorch']:.1f}")
    if args.json:
        write_json(args.json, header, results, ratios)


if __name__ == "__main__":
    main()
