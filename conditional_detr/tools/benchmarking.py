"""
Timing and memory helpers shared by the benchmarks (benchmark_attention,
benchmark_deformable_attention, benchmark_model): interleaved medians, the bytes autograd keeps
for backward, peak memory, the machine description and the JSON report.
"""
import functools
import json
import os
import platform
import statistics
import time

import torch

from conditional_detr import ops


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_times(fns, device, repeats, warmup):
    """
    Milliseconds of each named callable in every repeat, timed in turn within the repeat, so
    that a change in machine load mid-run affects all of them alike (round i of one callable
    ran beside round i of the others). A callable that raises a RuntimeError in warm-up (e.g.
    an SDPA backend refusing a dtype) gets its error instead of a list.
    """
    results, live = {}, {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            live[name] = fn
        except RuntimeError as e:
            results[name] = RuntimeError(str(e).splitlines()[0])
    times = {name: [] for name in live}
    for _ in range(repeats):
        for name, fn in live.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    results.update(times)
    return results


def interleaved_medians(fns, device, repeats, warmup):
    """The median of `interleaved_times` of each callable (or its warm-up error)."""
    return {
        name: t if isinstance(t, Exception) else statistics.median(t)
        for name, t in interleaved_times(fns, device, repeats, warmup).items()
    }


def forward_and_backward_medians(impls, forward, forward_backward, device, repeats, warmup):
    """
    (forward, forward+backward) interleaved medians of every named implementation, where
    `forward(fn)` and `forward_backward(fn)` run one step of implementation `fn`.
    """
    return tuple(
        interleaved_medians(
            {name: functools.partial(step, fn) for name, fn in impls.items()}, device, repeats, warmup
        )
        for step in (forward, forward_backward)
    )


def saved_activation_bytes(fn, inputs):
    """Bytes autograd keeps for backward, beyond the inputs themselves."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in input_storages and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def peak_memory_bytes(fn, device):
    """
    Tensor memory allocated at the peak of fn beyond what was allocated before it: the CUDA
    allocator's peak on a GPU; on a CPU, which keeps no such statistic, the highest running
    sum of the allocations and frees that torch's profiler records while fn runs (None
    from a torch whose profiler keeps no event list).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # The profiler's library logs two lines at every start and stop (and, on a machine without
    # a GPU, an error per process) unless told otherwise before its first use.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    changes = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in changes:  # a free of a tensor made before fn counts negative
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory_mib(fn, device):
    """`peak_memory_bytes` in MiB."""
    peak = peak_memory_bytes(fn, device)
    return None if peak is None else peak / 2**20


def format_timings(row):
    """The timing and memory columns that the op benchmarks print for a result row."""
    peak = row["peak_forward_backward_MiB"]
    return (
        f"fwd {row['forward_ms']:9.2f} ms  fwd+bwd {row['forward_backward_ms']:9.2f} ms  "
        f"saved {row['saved_for_backward_MiB']:8.1f} MiB"
        + ("" if peak is None else f"  peak {peak:8.1f} MiB")
    )


def processor_name(device):
    """
    The GPU's name, or the CPU's model name with the vector instructions torch uses on it
    (e.g. "AMD EPYC, AVX512"): CPU timings differ several-fold between AVX2 and AVX-512.
    """
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


# the CPU features that decide how fast the model runs (float32 width, bfloat16 and int8 arithmetic)
VECTOR_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile")


def vector_instructions():
    """Which of VECTOR_FEATURES the CPU has (/proc/cpuinfo), in that order; None where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return None
    return [feature for feature in VECTOR_FEATURES if feature in flags]


# what caps the instructions torch and oneDNN use below what the CPU has (e.g. AVX2 on an AVX-512 CPU)
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def instruction_sets(device):
    """The instructions the numbers depend on: the CPU's, any cap on torch's and oneDNN's use of
    them, and the level this project's compiled CPU kernels run at."""
    return {
        "vector_instructions": vector_instructions() if device == "cpu" else None,
        "isa_limits": {name: os.environ[name] for name in ISA_LIMITS if name in os.environ},
        "ops_vector_level": ops.cpu_vector_level() if device == "cpu" else None,
    }


def machine_header(device, **fields):
    """
    What the numbers were measured on, printed and written with them: compare a figure with
    another machine's only where the vector instructions match.
    """
    return {
        "device": processor_name(device),
        "device_type": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        **instruction_sets(device),
        **fields,
    }


def write_json(path, header, results, speedups):
    with open(path, "w") as f:
        json.dump({**header, "results": results, "speedups": speedups}, f, indent=2)
    print(f"wrote {path}")
