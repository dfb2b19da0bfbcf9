"""
The one-command GPU checks (scripts/gpu_checks.sh) in their CPU dry run: every step runs or
says why it skips, the GPU steps skip, and the results come back in a few files.
"""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from helpers.paths import REPO

STEPS = (
    "install_wheels", "build", "cuda_tests", "memcheck", "racecheck", "exercise_ops",
    "benchmark_attention", "benchmark_deformable_attention", "benchmark_model",
)
GPU_STEPS = ("memcheck", "racecheck", "benchmark_attention", "benchmark_deformable_attention", "benchmark_model")


def copy_of_checkout(destination):
    """The tree as the lent machine gets it, the extension built in place: there the project
    is not installed, so the steps must find it in the checkout, not where this one is."""
    for name in ("conditional_detr", "scripts", "tests", "configs"):
        shutil.copytree(os.path.join(REPO, name), destination / name, ignore=shutil.ignore_patterns("__pycache__"))
    return destination


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU machine's")
def test_dry_run_runs_every_step_and_skips_the_gpu_ones(tmp_path):
    checkout = copy_of_checkout(tmp_path / "checkout")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        ["bash", str(checkout / "scripts" / "gpu_checks.sh"), "--dry-run"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = dict(
        line.split(": ", 1) for line in (out / "summary.txt").read_text().splitlines() if ": " in line
    )
    assert set(STEPS) <= set(summary)
    for name in GPU_STEPS:
        assert summary[name].startswith("skipped"), name
    for name in ("cuda_tests", "exercise_ops"):
        assert summary[name].startswith("ok"), name
    assert '"device":null' in summary["environment"]
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = {os.path.basename(n): n for n in logs.getnames()}
        assert {"cuda_tests.log", "exercise_ops.log"} <= set(names)
        exercise_log = logs.extractfile(names["exercise_ops.log"]).read().decode()
    assert f"conditional_detr from {checkout / 'conditional_detr'}\n" in exercise_log
    # the lent machine returns at most 8 files
    assert len(list(out.iterdir())) <= 8


def test_scripts_parse():
    for name in ("gpu_checks.sh", "download_gpu_wheels.sh"):
        subprocess.run(["bash", "-n", os.path.join(REPO, "scripts", name)], check=True)
    result = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "gpu_checks.sh"), "--bogus"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--bogus" in result.stderr
