"""
Times conditional cross-attention side by side in one process: the compiled op, the
pure-PyTorch reference, and torch's scaled_dot_product_attention with the setup it needs
(per-head concatenation of content and spatial parts, a boolean mask), forward and
forward+backward, at the decoder's shapes (300 queries, 8 heads, 256 channels; 850 keys for
R50, 3400 for DC5). Every repeat times the implementations in turn and the median is kept,
so that a change of load on the machine weighs on all of them alike. Prints a table and
writes JSON.

    python -m conditional_detr.tools.benchmark_attention [--device cpu|cuda] [--json PATH] [--quick]
"""
import argparse
import functools
import json

import torch
import torch.nn.functional as F

from conditional_detr import ops
from conditional_detr.tools.benchmarking import (
    forward_and_backward_medians,
    machine_header,
    format_timings,
    peak_memory_mib,
    saved_activation_bytes,
    write_json,
)

NUM_QUERIES, NUM_HEADS, CHANNELS = 300, 8, 256
BACKBONE_KEYS = {"R50": 850, "DC5": 3400}


def sdpa_attention(q_content, q_spatial, k_content, k_spatial, value, key_padding_mask, num_heads):
    num_queries, batch, channels = q_content.shape
    num_keys = k_content.shape[0]
    head_dim = channels // num_heads

    def heads(x, length, width):  # [length, batch, heads * width] -> [batch, heads, length, width]
        return x.view(length, batch, num_heads, width).permute(1, 2, 0, 3)

    q = torch.cat([heads(q_content, num_queries, head_dim), heads(q_spatial, num_queries, head_dim)], -1)
    k = torch.cat([heads(k_content, num_keys, head_dim), heads(k_spatial, num_keys, head_dim)], -1)
    v = heads(value, num_keys, value.shape[-1] // num_heads)
    attend = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=(2 * head_dim) ** -0.5)
    return out.permute(2, 0, 1, 3).reshape(num_queries, batch, -1)


def implementations():
    return {
        "compiled": lambda *a: ops.conditional_cross_attention(*a, impl="compiled"),
        "pytorch": lambda *a: ops.conditional_cross_attention(*a, impl="pytorch"),
        "sdpa": sdpa_attention,
    }


def make_inputs(batch, num_keys, dtype, device):
    generator = torch.Generator(device="cpu").manual_seed(0)

    def make(length):
        return torch.randn(length, batch, CHANNELS, generator=generator).to(device, dtype)

    tensors = [make(NUM_QUERIES), make(NUM_QUERIES), make(num_keys), make(num_keys), make(num_keys)]
    mask = torch.zeros(batch, num_keys, dtype=torch.bool)
    # padding as from images of different sizes in one batch
    for b in range(batch):
        mask[b, num_keys - (b * num_keys) // (4 * batch):] = True
    return tensors, mask.to(device)


def benchmark(device, dtypes, cases, repeats, warmup):
    results = []
    for backbone, batch in cases:
        num_keys = BACKBONE_KEYS[backbone]
        for dtype in dtypes:
            tensors, mask = make_inputs(batch, num_keys, dtype, device)
            leaves = [t.detach().requires_grad_(True) for t in tensors]
            grad = torch.randn(NUM_QUERIES, batch, CHANNELS, device=device, dtype=dtype)

            def forward(attention):
                with torch.no_grad():
                    return attention(*tensors, mask, NUM_HEADS)

            def forward_backward(attention):
                out = attention(*leaves, mask, NUM_HEADS)
                torch.autograd.grad(out, leaves, grad)

            impls = implementations()
            forward_ms, forward_backward_ms = forward_and_backward_medians(
                impls, forward, forward_backward, device, repeats, warmup
            )
            for name, attention in impls.items():
                row = {
                    "backbone": backbone, "batch": batch, "keys": num_keys,
                    "dtype": str(dtype).replace("torch.", ""), "impl": name,
                }
                failure = next(
                    (r for r in (forward_ms[name], forward_backward_ms[name])
                     if isinstance(r, Exception)),
                    None,
                )
                if failure is not None:
                    row["error"] = str(failure)
                else:
                    row["forward_ms"] = forward_ms[name]
                    row["forward_backward_ms"] = forward_backward_ms[name]
                    row["saved_for_backward_MiB"] = saved_activation_bytes(
                        lambda: attention(*leaves, mask, NUM_HEADS), leaves) / 2**20
                    row["peak_forward_backward_MiB"] = peak_memory_mib(
                        functools.partial(forward_backward, attention), device)
                results.append(row)
                print(format_row(row), flush=True)
    return results


def format_row(row):
    if "error" in row:
        return f"{row['backbone']:>4} b{row['batch']:<2} {row['dtype']:>8} {row['impl']:>9}  error: {row['error']}"
    return f"{row['backbone']:>4} b{row['batch']:<2} {row['dtype']:>8} {row['impl']:>9} " + format_timings(row)


def speedups(results):
    """compiled against each other implementation, per case: how many times faster / smaller."""
    table = []
    by_case = {}
    for row in results:
        if "error" not in row:
            by_case.setdefault((row["backbone"], row["batch"], row["dtype"]), {})[row["impl"]] = row
    for (backbone, batch, dtype), rows in by_case.items():
        if "compiled" not in rows:
            continue
        mine = rows["compiled"]
        for other in ("pytorch", "sdpa"):
            if other not in rows:
                continue
            theirs = rows[other]
            entry = {
                "backbone": backbone, "batch": batch, "dtype": dtype, "versus": other,
                "forward_speedup": theirs["forward_ms"] / mine["forward_ms"],
                "forward_backward_speedup": theirs["forward_backward_ms"] / mine["forward_backward_ms"],
                "saved_memory_ratio": theirs["saved_for_backward_MiB"] / max(mine["saved_for_backward_MiB"], 1e-9),
            }
            if mine["peak_forward_backward_MiB"] and theirs["peak_forward_backward_MiB"]:
                entry["peak_memory_ratio"] = (
                    theirs["peak_forward_backward_MiB"] / mine["peak_forward_backward_MiB"]
                )
            table.append(entry)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="where to write the results (JSON)")
    parser.add_argument("--quick", action="store_true", help="R50 batch 2, fp32 only, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)

    device = args.device
    if not ops.has_ops_for(device):
        raise SystemExit(f"compiled ops unavailable on {device}: {ops.unavailable_reason(device)}")
    if args.quick:
        cases, dtypes = [("R50", 2)], [torch.float32]
    else:
        cases = [("R50", 2), ("R50", 8), ("DC5", 2), ("DC5", 8)]
        dtypes = [torch.float32, torch.bfloat16]
        if device == "cuda" and not torch.cuda.is_bf16_supported():
            dtypes = [torch.float32]
    repeats = args.repeats or (7 if device == "cpu" or args.quick else 20)
    warmup = 1 if device == "cpu" else 5

    header = machine_header(device, queries=NUM_QUERIES, heads=NUM_HEADS, channels=CHANNELS,
                            repeats=repeats)
    print(json.dumps(header))
    results = benchmark(device, dtypes, cases, repeats, warmup)
    ratios = speedups(results)
    print("\ncompiled vs   case                 fwd x   fwd+bwd x   saved-memory x")
    for r in ratios:
        print(f"{r['versus']:>8}   {r['backbone']} b{r['batch']:<2} {r['dtype']:>8}   "
              f"{r['forward_speedup']:7.2f}   {r['forward_backward_speedup']:9.2f}   "
              f"{r['saved_memory_ratio']:10.1f}")
    if args.json:
        write_json(args.json, header, results, ratios)


if __name__ == "__main__":
    main()
