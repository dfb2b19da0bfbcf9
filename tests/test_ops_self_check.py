"""
"auto" checks a compiled op once per device type and dtype against the reference and falls
back, with one warning, where it disagrees; here with a wrong kernel injected on the CPU.
"""
import warnings

import pytest
import torch

from conditional_detr import ops
from conditional_detr.ops import self_check

from helpers.ops import attention_inputs, padding_mask, requires_ops

pytestmark = requires_ops


@pytest.fixture(autouse=True)
def fresh_verdicts():
    self_check.forget()
    yield
    self_check.forget()


def wrong_attention_kernel(monkeypatch, calls):
    namespace = torch.ops.conditional_detr
    right = namespace.conditional_cross_attention

    def wrong(*args):
        calls.append(1)
        out, lse = right(*args)
        return out * 1.5, lse

    monkeypatch.setattr(namespace, "conditional_cross_attention", wrong)


def attention(impl, tensors, mask):
    return ops.conditional_cross_attention(*tensors, mask, 4, impl=impl)


def test_wrong_kernel_is_caught_once_and_the_reference_used(monkeypatch):
    calls = []
    wrong_attention_kernel(monkeypatch, calls)
    tensors = attention_inputs(7, 23, 2, 32, "cpu", requires_grad=False)
    mask = padding_mask(2, 23, "cpu")
    expected = attention("pytorch", tensors, mask)
    with pytest.warns(RuntimeWarning) as caught:
        first = attention("auto", tensors, mask)
    assert len(caught) == 1
    message = str(caught[0].message)
    for part in ("conditional_cross_attention", "cpu", "torch.float32", "output: largest error"):
        assert part in message, message
    torch.testing.assert_close(first, expected)
    checked = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        second = attention("auto", tensors, mask)
    torch.testing.assert_close(second, expected)
    assert len(calls) == checked  # the compiled kernel is not run again
    # an explicit request for the compiled op is honoured
    torch.testing.assert_close(attention("compiled", tensors, mask), expected * 1.5)


@pytest.mark.parametrize("kernel", ["right", "wrong"])
def test_a_trace_decides_as_the_eager_model_does(monkeypatch, kernel):
    """The first use inside torch.jit.trace runs the check too (before, a trace took the compiled op unchecked)."""
    calls = []
    if kernel == "wrong":
        wrong_attention_kernel(monkeypatch, calls)
    tensors = attention_inputs(7, 23, 2, 32, "cpu", requires_grad=False)
    mask = padding_mask(2, 23, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(lambda *t: attention("auto", t, mask), tensors, check_trace=False)
    traced_compiled = "conditional_detr::conditional_cross_attention" in str(traced.graph)
    assert traced_compiled == (kernel == "right")
    assert "aten::linspace" not in str(traced.graph)  # the check's own ops stay out of the trace
    with torch.profiler.profile() as profile:
        attention("auto", tensors, mask)
    eager_compiled = any(e.name == "conditional_detr::conditional_cross_attention" for e in profile.events())
    assert eager_compiled == traced_compiled
    torch.testing.assert_close(traced(*tensors), attention("pytorch", tensors, mask))


@pytest.mark.parametrize("kernel", ["right", "wrong"])
def test_a_traced_detector_decides_as_the_eager_one(monkeypatch, kernel):
    """A whole Conditional DETR traced as tools/export traces it, before any eager run, then run eagerly."""
    from conditional_detr.tools.export import ExportableDetector

    from helpers.tiny import tiny_model

    calls = []
    if kernel == "wrong":
        wrong_attention_kernel(monkeypatch, calls)
    exportable = ExportableDetector(tiny_model(OPS_IMPL="auto")).eval()
    images = torch.rand(1, 3, 48, 64) * 255
    sizes = torch.tensor([[48, 64]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(exportable, (images, sizes), check_trace=False)
    op = "conditional_detr::conditional_cross_attention"
    with torch.no_grad(), torch.profiler.profile() as profile:
        eager = exportable(images, sizes)
    assert (op in str(traced.inlined_graph)) == any(e.name == op for e in profile.events()) == (kernel == "right")
    for a, b in zip(traced(images, sizes), eager):
        torch.testing.assert_close(a, b)


def test_torch_compile_decides_as_the_eager_model_does(monkeypatch):
    calls = []
    wrong_attention_kernel(monkeypatch, calls)
    tensors = attention_inputs(7, 23, 2, 32, "cpu", requires_grad=False)
    mask = padding_mask(2, 23, "cpu")
    compiled = torch.compile(lambda *t: attention("auto", t, mask), backend="eager", fullgraph=False)
    with pytest.warns(RuntimeWarning, match="conditional_cross_attention disagrees"):
        out = compiled(*tensors)
    torch.testing.assert_close(out, attention("pytorch", tensors, mask))  # the reference, as eager would
    assert self_check._verdicts[("conditional_cross_attention", "cpu", torch.float32)] is not None


def test_verdicts_are_per_dtype(monkeypatch):
    calls = []
    wrong_attention_kernel(monkeypatch, calls)
    assert not self_check.trusted("conditional_cross_attention", torch.device("cpu"), torch.float32)
    assert ("conditional_cross_attention", "cpu", torch.float64) not in self_check._verdicts


@pytest.mark.parametrize("op", self_check.CHECKED_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_compiled_cpu_ops_pass_their_check(op, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert self_check.trusted(op, torch.device("cpu"), dtype)
    assert self_check._verdicts[(op, "cpu", dtype)] is None


def test_a_failing_kernel_counts_as_a_disagreement(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel image is available\nmore")

    monkeypatch.setattr(torch.ops.conditional_detr, "conditional_spatial_query", broken)
    with pytest.warns(RuntimeWarning, match="it failed: no kernel image is available"):
        assert not self_check.trusted("conditional_spatial_query", torch.device("cpu"), torch.float32)
