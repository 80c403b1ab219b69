"""tools/gpu_check.py: its dry run on the CPU (every step of the GPU check, at toy sizes), and how it
records a failing step and goes on."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_walks_every_step_of_the_gpu_check(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--dry-run", "--output",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "summary.md").read_text()
    assert result.returncode == 0, summary + result.stdout[-3000:]
    names = [name for name, _, _ in gpu_check.steps(gpu_check.argparse.Namespace(dry_run=True, iters=None), str(tmp_path))]
    for name in names:
        assert f"| {name} | ok" in summary, name
    assert "| MF-DETR mf26 torch" in summary and "| MF-DETR mf26 " in summary     # the benchmarks' tables
    assert "AP,AP50,AP75,APs,APm,APl" in summary                                  # train's and eval's COCO AP
    assert (tmp_path / "train" / "model_final.pth").exists()
    assert "mf_detr.yaml" in (tmp_path / "train.log").read_text()                 # the COCO recipe's own config


def test_a_failing_step_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    py = sys.executable
    monkeypatch.setattr(gpu_check, "steps", lambda args, out: [
        ("breaks", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 60),
        ("hangs", [py, "-c", "import time; time.sleep(30)"], 1),
        ("works", [py, "-c", "print('| model | ms |')"], 60)])
    code = gpu_check.main(["--output", str(tmp_path)])
    summary = (tmp_path / "summary.md").read_text()
    assert code == 1
    assert "| breaks | FAILED (exit 3) |" in summary and "| hangs | FAILED (over 1 s) |" in summary
    assert "| works | ok |" in summary and "1 of 3 steps ok" in summary and "| model | ms |" in summary
    assert "boom" in (tmp_path / "breaks.log").read_text()


@pytest.mark.slow
def test_install_without_a_wheelhouse_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "IMPORTS", ["detectron2", "mfdet_no_such_module"])
    monkeypatch.setattr(gpu_check, "WHEELHOUSE", str(tmp_path / "empty"))
    log = tmp_path / "install.log"
    with open(log, "w") as f:
        status = gpu_check._install(str(tmp_path), dict(os.environ), f)
    assert status == "FAILED (no wheelhouse; missing mfdet_no_such_module)"
    assert "run tools/gpu_check.py --prepare first" in log.read_text()
