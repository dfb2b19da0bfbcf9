import json

import pytest

from conditional_detr import ops
from conditional_detr.tools import benchmark_attention


def test_interleaved_medians_reports_errors_per_callable():
    calls = []

    def refuses():
        raise RuntimeError("no kernel for this dtype\nmore detail")

    results = benchmark_attention.interleaved_medians(
        {"ok": lambda: calls.append(1), "refuses": refuses}, "cpu", repeats=3, warmup=1
    )
    assert len(calls) == 4 and results["ok"] >= 0
    assert str(results["refuses"]) == "no kernel for this dtype"


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
