"""What a cluster does to a long run: preemption signals, a disk that fills while a checkpoint is
written. Through tools/train_net.py's command line, in two gloo processes where it matters."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT

TOY_CONFIG = os.path.join(ROOT, "configs", "mf_detr_toy.yaml")
EXIT_PREEMPTED = 75


def _one_image_set(tmp_path):
    """One toy training image as a COCO json: with one image per process and step, no flip, one
    size and no denoising queries, every step sees the same input whatever the data order and the
    random draws, so that a resumed run can be compared bit for bit with an uninterrupted one."""
    from mobileformer_det.data import ensure_toy_dataset

    root = ensure_toy_dataset(os.path.join(ROOT, "datasets", "toy_coco"))
    full = json.load(open(os.path.join(root, "train.json")))
    first = next(a["image_id"] for a in full["annotations"])
    (tmp_path / "one.json").write_text(json.dumps({
        "images": [im for im in full["images"] if im["id"] == first], "categories": full["categories"],
        "annotations": [a for a in full["annotations"] if a["image_id"] == first]}))
    return [f"[('toy_one', '{tmp_path / 'one.json'}', '{os.path.join(root, 'train')}')]"]


def _command(out, data, *extra, flags=()):
    return [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--num-gpus", "2", *flags,
            "--config-file", TOY_CONFIG, "MODEL.DEVICE", "cpu", "DATASETS.COCO_FORMAT", *data, "DATASETS.TRAIN",
            "('toy_one',)", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0", "SOLVER.IMS_PER_BATCH", "2",
            "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.RANDOM_FLIP", "none", "MODEL.MF_DETR.DENOISING.NUM_QUERIES", "0",
            "DATALOADER.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "36", "SOLVER.CHECKPOINT_PERIOD", "4",
            "OUTPUT_DIR", str(out), *map(str, extra)]


def _children(pid):
    """The training processes ``pid`` started (not multiprocessing's resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


def _interrupt(out, data, signum, target, after, flags=()):
    """Start a 2-process training, send ``signum`` to ``target`` ("launcher" or one training process)
    once checkpoint ``after`` exists, and return (exit status, output)."""
    with open(out.parent / f"{out.name}.log", "w+") as output:  # a pipe nobody reads would block the training
        process = subprocess.Popen(_command(out, data, flags=flags), cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            deadline = time.time() + 400
            while not (out / after).exists():
                assert process.poll() is None and time.time() < deadline, "the training ended or stalled"
                time.sleep(0.2)
            pid = process.pid if target == "launcher" else _children(process.pid)[-1]
            os.kill(pid, signum)
            process.wait(timeout=400)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        output.seek(0)
        return process.returncode, output.read()


def _final_state(out):
    final = torch.load(out / "model_final.pth", weights_only=False)
    return final["model"], final["ema"]["model"], final["iteration"]


@pytest.mark.slow
def test_preempted_twice_and_resumed_ends_where_an_uninterrupted_run_ends(tmp_path):
    """SIGTERM to the launcher (forwarded to both processes), then SIGUSR1 to one training process only
    (the processes agree after every step): each time every process finishes its step, the main
    process writes model_<iteration>.pth and last_checkpoint, and the job exits with status 75;
    two --resume later the weights and their average equal an uninterrupted run's bit for bit."""
    data = _one_image_set(tmp_path)
    whole = tmp_path / "whole"
    done = subprocess.run(_command(whole, data), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "out"
    stops = []
    for signum, target, after in ((signal.SIGTERM, "launcher", "model_0000007.pth"),
                                  (signal.SIGUSR1, "one process", "model_0000023.pth")):
        rc, log = _interrupt(out, data, signum, target, after, flags=("--resume",) if stops else ())
        assert rc == EXIT_PREEMPTED, log[-3000:]
        name = signal.Signals(signum).name
        line = next(line for line in log.splitlines() if "training stopped at iteration" in line)
        assert (f"by {name}'s preemption signal" in line or "by another process's" in line) and "exit status 75" in line
        iteration = int(line.split("training stopped at iteration ")[1].split()[0])
        checkpoint = f"model_{iteration:07d}.pth"
        assert (out / "last_checkpoint").read_text() == checkpoint
        assert torch.load(out / checkpoint, weights_only=False)["iteration"] == iteration
        assert "Traceback" not in log and "Exception during training" not in log
        stops.append(iteration)
    assert 7 <= stops[0] < stops[1] < 35

    resumed = subprocess.run(_command(out, data, flags=("--resume",)), cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Starting training from iteration {stops[1] + 1}" in resumed.stdout + resumed.stderr
    (weights, average, last), (expected, expected_average, expected_last) = _final_state(out), _final_state(whole)
    assert last == expected_last == 35
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key
    for key, value in expected_average.items():
        assert torch.equal(average[key], value), key


FULL_DISK = '''
import errno, os, torch
_save = torch.save
def _full_disk(obj, f, *args, **kwargs):  # the disk fills while this checkpoint is written
    if os.path.basename(getattr(f, "name", str(f))).startswith(os.environ["MFDET_TEST_FULL_DISK_AT"]):
        f.write(b"PK half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _save(obj, f, *args, **kwargs)
torch.save = _full_disk
'''


@pytest.mark.slow
def test_a_disk_that_fills_during_a_checkpoint_stops_every_process_and_keeps_the_previous_one(tmp_path):
    """The write of model_0000007.pth fails part way (torch.save made to raise ENOSPC, in both
    processes through sitecustomize): training stops on both processes with a message naming the
    disk, model_0000003.pth is intact and still last_checkpoint, nothing half-written is left, and
    --resume continues from iteration 4 to the end."""
    data = _one_image_set(tmp_path)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FULL_DISK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")]),
               MFDET_TEST_FULL_DISK_AT="model_0000007.pth")
    out = tmp_path / "out"
    full = subprocess.run(_command(out, data, "SOLVER.MAX_ITER", 12), cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    log = full.stdout + full.stderr
    assert full.returncode != 0 and "could not write the checkpoint" in log, log[-3000:]
    assert f"the disk of {out} has" in log and "GiB free" in log and "No space left on device" in log
    assert "model_0000003.pth is intact and still last_checkpoint" in log and "then --resume" in log
    # the other process stopped at the same step, with the main process's error
    assert "on the main process: [Errno 28] could not write the checkpoint" in (out / "log.txt.rank1").read_text()
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"
    assert torch.load(out / "model_0000003.pth", weights_only=False)["iteration"] == 3
    assert sorted(f for f in os.listdir(out) if ".pth" in f) == ["model_0000003.pth"]

    resumed = subprocess.run(_command(out, data, "SOLVER.MAX_ITER", 12, flags=("--resume",)), cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Starting training from iteration 4" in resumed.stdout + resumed.stderr
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 11
