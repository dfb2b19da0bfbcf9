"""
One decision for every op (`ops.use_compiled`): MODEL.DETR.OPS_IMPL "pytorch" runs no compiled
op at all, dropout included, and "compiled" names the op and why it cannot run.
"""
import pytest
import torch
from detectron2.modeling import build_model

from conditional_detr import ops

from helpers.tiny import tiny_batch, tiny_deformable_cfg, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

DETECTORS = ("DETR", "ConditionalDETR", "DeformableDETR")


def tiny_detector(architecture, impl):
    """A tiny detector of `architecture` with dropout on, so that its dropout runs in training."""
    if architecture == "DeformableDETR":
        torch.manual_seed(0)
        return build_model(tiny_deformable_cfg("two_stage", **{"MODEL.DETR.OPS_IMPL": impl, "MODEL.DETR.DROPOUT": 0.1}))
    detr = {"MODEL.META_ARCHITECTURE": "DETR", "CLASS_LOSS": "softmax"} if architecture == "DETR" else {}
    return tiny_model(**detr, OPS_IMPL=impl, DROPOUT=0.1)


def compiled_ops_run(model):
    """The names of the package's compiled ops that a training step of `model` runs, forward and backward."""
    model.train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        sum(model(tiny_batch()).values()).backward()
    return {event.name for event in profile.events() if event.name.startswith("conditional_detr::")}


@pytest.mark.parametrize("architecture", DETECTORS)
def test_pytorch_runs_no_compiled_op(architecture):
    assert compiled_ops_run(tiny_detector(architecture, "pytorch")) == set()


@pytest.mark.skipif(not ops.has_ops_for("cpu"), reason="the extension is not built for the CPU")
@pytest.mark.parametrize("architecture", DETECTORS)
def test_compiled_runs_the_compiled_dropout_and_attention(architecture):
    names = compiled_ops_run(tiny_detector(architecture, "compiled"))
    assert "conditional_detr::dropout" in names
    if architecture != "DETR":  # DETR's attention is torch's
        assert names - {"conditional_detr::dropout"}, names


def test_every_part_of_a_model_takes_its_setting():
    model = tiny_detector("ConditionalDETR", "pytorch")
    parts = [m for m in model.modules() if hasattr(m, "ops_impl")]
    assert len(parts) > 10 and {m.ops_impl for m in parts} == {"pytorch"}
    with pytest.raises(ValueError, match="OPS_IMPL must be one of"):
        ops.set_implementation(model, "fast")


def test_compiled_names_the_op_and_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(ops, "has_ops_for", lambda device_type: False)
    monkeypatch.setattr(ops, "unavailable_reason", lambda device_type: "the extension is not built")
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"dropout\(impl='compiled'\) cannot run on cpu: the extension is not built"):
        ops.dropout(x, 0.5, impl="compiled")
    assert not ops.use_compiled("dropout", "auto", x)
    assert not ops.use_compiled("dropout", "pytorch", x)


def test_a_head_too_wide_for_the_cuda_kernel_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(ops, "has_ops_for", lambda device_type: True)
    cuda_like = torch.empty(0, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.raises(RuntimeError, match="conditional_cross_attention.*at most 64 channels per head, got 128"):
        ops.use_compiled("conditional_cross_attention", "compiled", cuda_like, head_dim=128)
    assert not ops.use_compiled("conditional_cross_attention", "auto", cuda_like, head_dim=128)


@pytest.mark.skipif(not ops.has_ops_for("cpu"), reason="compiled CPU ops unavailable")
def test_auto_takes_the_faster_pytorch_attention_where_the_cpu_kernels_run_their_baseline_build(monkeypatch):
    tensor = torch.zeros(2, 2)
    assert ops.use_compiled("conditional_cross_attention", "auto", tensor, head_dim=8)
    monkeypatch.setattr(ops, "cpu_vector_level", lambda: "baseline")  # no AVX2, or torch held there
    assert not ops.use_compiled("conditional_cross_attention", "auto", tensor, head_dim=8)
    assert ops.use_compiled("conditional_cross_attention", "compiled", tensor, head_dim=8)
    assert ops.use_compiled("dropout", "auto", tensor)  # faster than F.dropout at every level
