"""
The compiled CPU kernels run their vector loops at the level torch runs at: ATEN_CPU_CAPABILITY
holds them to AVX2 or baseline x86-64 too, and every level computes what the others do.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conditional_detr import ops

from helpers.ops import requires_ops

pytestmark = requires_ops

LEVEL_OF_TORCH_CAPABILITY = {"AVX512": "x86-64-v4", "AVX2": "x86-64-v3", "DEFAULT": "baseline"}

# Runs each compiled op at the level the environment sets, on inputs large enough for the
# vector loops (64 channels per head, hundreds of keys), and saves outputs and gradients.
def make_inputs(path):
    """Inputs large enough for the vector loops (64 channels per head, hundreds of keys), made
    once: torch's own random draws round differently at different levels."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 517, dtype=torch.bool)
    mask[1, 400:] = True
    torch.save({
        "attention": [torch.randn(n, 2, 256, generator=generator) for n in (300, 300, 517, 517, 517)],
        "attention_mask": mask,
        "deformable": [
            torch.randn(2, 40 * 60 + 20 * 30, 8, 32, generator=generator),
            torch.rand(2, 300, 8, 2, 4, 2, generator=generator) * 1.2 - 0.1,
            torch.rand(2, 300, 8, 2, 4, generator=generator).softmax(-1),
        ],
        "dropout": torch.randn(1 << 18, generator=generator),
    }, path)


# Runs each compiled op at the level the environment sets and saves outputs and gradients.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from conditional_detr import ops

    inputs = torch.load(sys.argv[1])
    results = {}
    attention_inputs = [t.requires_grad_() for t in inputs["attention"]]
    for dropout_p in (0.0, 0.1):  # the attention weights' dropout: the hash's mask at every level
        rng_state = torch.tensor([99])
        out, _ = torch.ops.conditional_detr.conditional_cross_attention(
            *attention_inputs, inputs["attention_mask"], 4, dropout_p, rng_state)
        out.square().sum().backward()
        results[f"attention_dropout_{dropout_p}"] = [out.detach(), *(t.grad for t in attention_inputs)]
        for t in attention_inputs:
            t.grad = None

    value, locations, weights = [t.requires_grad_() for t in inputs["deformable"]]
    shapes = torch.tensor([[40, 60], [20, 30]])
    starts = torch.tensor([0, 40 * 60])
    out = ops.multi_scale_deformable_attention(value, shapes, starts, locations, weights, impl="compiled")
    out.square().sum().backward()
    results["deformable"] = [out.detach(), value.grad, locations.grad, weights.grad]

    rng_state = torch.tensor([1234])
    for dtype in (torch.float32, torch.bfloat16):
        x = inputs["dropout"].to(dtype)
        results[f"dropout_{dtype}"] = [torch.ops.conditional_detr.dropout(x, 0.1, rng_state)]

    torch.save(results, sys.argv[2])
    print(json.dumps({"level": ops.cpu_vector_level(),
                      "torch": torch.backends.cpu.get_cpu_capability()}))
    """
)


def run_at(capability, inputs, path):
    """Runs SCRIPT with ATEN_CPU_CAPABILITY=capability, or unset for "cpu" (the CPU's own)."""
    environment = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability != "cpu":
        environment["ATEN_CPU_CAPABILITY"] = capability
    command = [sys.executable, "-c", SCRIPT, str(inputs), str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), torch.load(path)


@pytest.mark.slow
def test_the_level_follows_torch_and_every_level_agrees(tmp_path):
    inputs = tmp_path / "inputs.pt"
    make_inputs(inputs)
    runs = {c: run_at(c, inputs, tmp_path / f"{c}.pt") for c in ("default", "avx2", "cpu")}
    for capability, (reported, _) in runs.items():
        # ATEN_CPU_CAPABILITY holds torch no higher than asked and no higher than the CPU has
        assert reported["level"] == LEVEL_OF_TORCH_CAPABILITY[reported["torch"]], (capability, reported)
    assert runs["default"][0]["level"] == "baseline"
    baseline = runs["default"][1]
    for capability in ("avx2", "cpu"):
        outputs = runs[capability][1]
        for name, tensors in baseline.items():
            for i, (expected, actual) in enumerate(zip(tensors, outputs[name])):
                if name.startswith("dropout_"):  # the mask is the hash's, the same at every level
                    assert torch.equal(actual, expected), (capability, name)
                else:
                    error = (actual - expected).abs().max() / expected.abs().max()
                    assert error < 1e-5, (capability, name, i, error.item())


def test_the_benchmarks_name_the_level():
    from conditional_detr.tools.benchmarking import machine_header

    assert machine_header("cpu")["ops_vector_level"] == ops.cpu_vector_level()
    assert ops.cpu_vector_level() == LEVEL_OF_TORCH_CAPABILITY[torch.backends.cpu.get_cpu_capability()]
