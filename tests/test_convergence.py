"""The convergence study tool: reading AP curves, the summary, and a tiny end-to-end run."""
import json
import os

import pytest

from conditional_detr.tools import convergence

from helpers.paths import INSTANT_CONFIG


def write_metrics(output_dir, records, partial_tail="", max_iter=100):
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.yaml"), "w") as f:
        f.write(f"SOLVER:\n  MAX_ITER: {max_iter}\n")
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.write(partial_tail)


def test_read_ap_curve_keeps_last_entry_per_iteration_and_skips_partial_line(tmp_path):
    write_metrics(
        tmp_path,
        [
            {"iteration": 9, "total_loss": 3.0},
            {"iteration": 9, "bbox/AP": 1.0},
            {"iteration": 19, "bbox/AP": 2.0},
            {"iteration": 19, "bbox/AP": 2.5},  # evaluated again after a resume
            {"iteration": 25, "bbox/AP": 3.0},  # the final evaluation, logged at MAX_ITER
        ],
        partial_tail='{"iteration": 29, "bbox/A',
        max_iter=25,
    )
    assert convergence.read_ap_curve(str(tmp_path)) == ([10, 20, 25], [1.0, 2.5, 3.0])


def test_read_ap_curve_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        convergence.read_ap_curve(str(tmp_path))
    write_metrics(tmp_path, [{"iteration": 0, "total_loss": 1.0}])
    with pytest.raises(ValueError, match="TEST.EVAL_PERIOD"):
        convergence.read_ap_curve(str(tmp_path))


def test_summary_measures_iterations_to_reach_the_slowest_final_ap():
    curves = {
        "fast": {"iterations": [100, 200, 300, 400], "AP": [5.0, 20.0, 30.0, 35.0]},
        "slow": {"iterations": [100, 200, 300, 400], "AP": [1.0, 4.0, 8.0, 20.0]},
    }
    summary = convergence.summarize(curves)
    assert summary["reference_system"] == "slow"
    assert summary["reference_final_AP"] == 20.0
    reached = summary["first_reaching_reference_final_AP"]
    assert reached["fast"] == {"iteration": 200, "speedup": 2.0}
    assert reached["slow"] == {"iteration": 400, "speedup": 1.0}


def test_plot_from_finished_runs(tmp_path):
    for name, aps in (("a", [3.0, 9.0]), ("b", [1.0, 3.0])):
        write_metrics(
            tmp_path / name,
            [{"iteration": 49, "bbox/AP": aps[0]}, {"iteration": 99, "bbox/AP": aps[1]}],
        )
    out = tmp_path / "study"
    result = convergence.main(
        ["--output-dir", str(out), "--from-metrics", f"a={tmp_path / 'a'}",
         "--from-metrics", f"b={tmp_path / 'b'}"]
    )
    assert result["first_reaching_reference_final_AP"]["a"]["iteration"] == 50
    assert json.loads((out / "convergence.json").read_text())["reference_system"] == "b"
    assert (out / "convergence.png").stat().st_size > 0


def test_bad_system_argument():
    with pytest.raises(ValueError, match="NAME=VALUE"):
        convergence.main(["--system", "no-equals-sign"])


@pytest.mark.slow
def test_two_systems_train_evaluate_and_resume(shapes_root, tmp_path):
    out = tmp_path / "study"
    argv = [
        "--output-dir", str(out), "--iterations", "4", "--eval-period", "2",
        "--system", f"one={INSTANT_CONFIG}", "--system", f"two={INSTANT_CONFIG}",
        "MODEL.DEVICE", "cpu", "SEED", "0",
    ]
    result = convergence.main(argv)
    for name in ("one", "two"):
        assert result["curves"][name]["iterations"] == [2, 4]
        assert (out / name / "model_final.pth").is_file()
    # the same seed and settings: the same curve
    assert result["curves"]["one"]["AP"] == result["curves"]["two"]["AP"]
    # run again: finished runs are kept as they are
    mtime = os.path.getmtime(out / "one" / "metrics.json")
    again = convergence.main(argv)
    assert again["curves"] == result["curves"]
    assert os.path.getmtime(out / "one" / "metrics.json") == mtime
