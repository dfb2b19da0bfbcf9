"""
The benchmarks of the compiled ops (tools/benchmark_attention,
benchmark_deformable_attention) and their shared timing, memory and machine-description
helpers.
"""
import json

import pytest
import torch

from conditional_detr import ops
from conditional_detr.tools import benchmark_attention, benchmark_deformable_attention, benchmarking


def test_interleaved_medians_reports_errors_per_callable():
    calls = []

    def refuses():
        raise RuntimeError("no kernel for this dtype\nmore detail")

    results = benchmarking.interleaved_medians(
        {"ok": lambda: calls.append(1), "refuses": refuses}, "cpu", repeats=3, warmup=1
    )
    assert len(calls) == 4 and results["ok"] >= 0
    assert str(results["refuses"]) == "no kernel for this dtype"


def test_interleaved_times_alternate_the_callables_round_by_round():
    calls = []
    results = benchmarking.interleaved_times(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu", repeats=3, warmup=2
    )
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-ups, then one of each per round
    assert [len(results[name]) for name in "ab"] == [3, 3] and min(results["a"] + results["b"]) >= 0


def test_peak_memory_on_cpu_follows_allocations_and_frees():
    def two_live_at_most():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(1_000_000)
        del a
        c = torch.empty(1_000_000)
        return b, c

    peak = benchmarking.peak_memory_bytes(two_live_at_most, "cpu")
    assert 8_000_000 <= peak < 8_100_000
    made_before = [torch.empty(1_000_000)]
    # freeing what was made before counts below the start, which is the least peak
    assert benchmarking.peak_memory_bytes(made_before.clear, "cpu") == 0


def test_cpu_is_named_with_its_vector_instructions():
    # the form only: which processor runs the tests is not theirs to know
    name = benchmarking.processor_name("cpu")
    model, capability = name.rsplit(", ", 1)
    assert model.strip() and capability == torch.backends.cpu.get_cpu_capability()
    assert benchmarking.machine_header("cpu")["device"] == name
    features = benchmarking.machine_header("cpu")["vector_instructions"]
    if features is not None:  # /proc/cpuinfo read: the features it lists, in the fixed order
        assert features == [f for f in benchmarking.VECTOR_FEATURES if f in features]


@pytest.mark.slow
@pytest.mark.skipif(not ops.has_ops_for("cpu"), reason="compiled CPU ops unavailable")
def test_quick_benchmark_writes_times_and_ratios(tmp_path):
    path = tmp_path / "bench.json"
    benchmark_attention.main(["--device", "cpu", "--quick", "--repeats", "1", "--json", str(path)])
    report = json.loads(path.read_text())
    assert {r["impl"] for r in report["results"]} == {"compiled", "pytorch", "sdpa"}
    for row in report["results"]:
        assert row["forward_ms"] > 0 and row["forward_backward_ms"] > row["forward_ms"] / 10
    versus = {r["versus"]: r for r in report["speedups"]}
    assert set(versus) == {"pytorch", "sdpa"}
    # the compiled op keeps only the log-sum-exp for backward, not the attention matrix
    assert versus["pytorch"]["saved_memory_ratio"] > 20


@pytest.mark.slow
@pytest.mark.skipif(not ops.has_ops_for("cpu"), reason="compiled CPU ops unavailable")
def test_deformable_benchmark_on_small_levels(tmp_path, capsys):
    levels = [(6, 10), (3, 5)]
    results = benchmark_deformable_attention.benchmark(
        "cpu", [torch.float32], [("encoder", 1), ("decoder", 2)], repeats=1, warmup=1,
        levels=levels,
    )
    assert {(r["stage"], r["impl"]) for r in results} == {
        (stage, impl) for stage in ("encoder", "decoder") for impl in ("compiled", "pytorch")
    }
    encoder = next(r for r in results if r["stage"] == "encoder")
    assert encoder["queries"] == 6 * 10 + 3 * 5
    for row in results:
        assert row["forward_ms"] > 0 and row["forward_backward_ms"] > 0
    ratios = {(r["stage"], r["batch"]): r for r in benchmark_deformable_attention.speedups(results)}
    assert set(ratios) == {("encoder", 1), ("decoder", 2)}
    for r in ratios.values():
        # the compiled op keeps nothing but its inputs; grid_sample keeps its samples
        assert r["saved_MiB_compiled"] == 0 and r["saved_MiB_pytorch"] > 0
    assert "compiled" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not ops.has_ops_for("cpu"), reason="compiled CPU ops unavailable")
def test_quick_deformable_benchmark_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    benchmark_deformable_attention.main(
        ["--device", "cpu", "--quick", "--repeats", "1", "--json", str(path)]
    )
    report = json.loads(path.read_text())
    assert report["levels"] == [list(level) for level in benchmark_deformable_attention.LEVELS]
    assert [(r["stage"], r["batch"]) for r in report["speedups"]] == [("decoder", 1)]
    assert {r["impl"] for r in report["results"]} == {"compiled", "pytorch"}
