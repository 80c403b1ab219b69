"""What a user gives the tools that must not lose their work: bad files and boxes, divergence, resumes
with another config, two trainings in one folder, and the demo's outputs. Each through the command line."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT

TOY_CONFIG = os.path.join(ROOT, "configs", "mf_detr_toy.yaml")
TOY_ROOT = os.path.join(ROOT, "datasets", "toy_coco")


def _tool(name, *args, timeout=600):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return result.returncode, result.stdout + result.stderr


def _train(*args):
    """train_net.py on the toy config; flags (``--resume``) first, then ``KEY VALUE`` overrides."""
    flags = [a for a in args if str(a).startswith("--")]
    return _tool("train_net.py", *flags, "--config-file", TOY_CONFIG, "DATASETS.TOY_ROOT", TOY_ROOT,
                 *[a for a in args if a not in flags])


def _small_run(out, *extra):
    """Overrides for a short run into ``out``: 2 images a step, no evaluation unless ``extra`` names a test set."""
    return ["OUTPUT_DIR", out, "SOLVER.IMS_PER_BATCH", 2, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()",
            "DATALOADER.NUM_WORKERS", 0, *extra]


def _toy_subset(tmp_path, split, count):
    """The first ``count`` images of a toy split (with at least one box each) as a COCO json of their own."""
    from mobileformer_det.data import ensure_toy_dataset

    full = json.load(open(os.path.join(ensure_toy_dataset(TOY_ROOT), f"{split}.json")))
    keep = sorted({a["image_id"] for a in full["annotations"]})[:count]
    return {"images": [im for im in full["images"] if im["id"] in keep],
            "annotations": [a for a in full["annotations"] if a["image_id"] in keep], "categories": full["categories"]}


@pytest.mark.slow
def test_bad_boxes_and_images_are_named_and_skipped_and_training_goes_on(tmp_path):
    """Invalid boxes dropped with a count per reason, a missing training image left out, a truncated
    validation image skipped by the periodic evaluation (which evaluates the others), exit 0."""
    train = _toy_subset(tmp_path, "train", 6)
    image = train["images"][0]
    bad_boxes = [[100, 80, -30, -20], [float("nan"), 10, 5, 5], [10, 10, float("inf"), 5], [5, 5, 1e30, 10],
                 [500, 500, 10, 10], [3, 4, 0, 8]]
    next_id = max(a["id"] for a in train["annotations"]) + 1
    for i, box in enumerate(bad_boxes):
        train["annotations"].append({"id": next_id + i, "image_id": image["id"], "category_id": 1, "bbox": box,
                                     "area": 1.0, "iscrowd": 0})
    train["images"].append({**train["images"][1], "id": 10 ** 6, "file_name": "not_there.png"})
    (tmp_path / "train.json").write_text(json.dumps(train))   # NaN / Infinity: Python's json writes and reads them

    val = _toy_subset(tmp_path, "val", 3)
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    for im in val["images"]:
        data = open(os.path.join(TOY_ROOT, "val", im["file_name"]), "rb").read()
        (val_dir / im["file_name"]).write_bytes(data[: len(data) // 3] if im is val["images"][0] else data)
    (tmp_path / "val.json").write_text(json.dumps(val))

    datasets = (f"[['mine_train', '{tmp_path / 'train.json'}', '{TOY_ROOT}/train'], "
                f"['mine_val', '{tmp_path / 'val.json'}', '{val_dir}']]")
    rc, log = _train(*_small_run(tmp_path / "out", "DATASETS.COCO_FORMAT", datasets, "DATASETS.TRAIN", "('mine_train',)",
                                 "DATASETS.TEST", "('mine_val',)", "SOLVER.MAX_ITER", 4, "TEST.EVAL_PERIOD", 2))
    assert rc == 0, log[-3000:]
    total = len(train["annotations"])
    assert f"dropped 6 of its {total} boxes as invalid" in log, log[-3000:]
    for reason in ("1 negative width or height", "2 NaN or infinite coordinate", "1 more than the image's size beyond",
                   "1 outside the image", "1 zero width or height"):
        assert reason in log, reason
    assert "1 of 7 images do not exist and are left out" in log and "not_there.png" in log
    truncated = val["images"][0]["file_name"]
    assert log.count(f"skipping image '{val_dir / truncated}'") == 2          # both evaluations, iterations 2 and 4
    assert log.count("evaluating 2 of the 3 images of the dataset") == 2
    metrics = [json.loads(line) for line in open(tmp_path / "out" / "metrics.json")]
    assert len([m for m in metrics if "bbox/AP" in m]) == 2

    # nothing usable at all: stops before training, saying the boxes were invalid
    only_bad = {**train, "annotations": [a for a in train["annotations"] if a["id"] >= next_id]}
    (tmp_path / "bad.json").write_text(json.dumps(only_bad))
    rc, log = _train(*_small_run(tmp_path / "out2", "DATASETS.COCO_FORMAT", f"[['only_bad', '{tmp_path / 'bad.json'}', "
                                 f"'{TOY_ROOT}/train']]", "DATASETS.TRAIN", "('only_bad',)", "DATASETS.TEST", "()"))
    assert rc != 0 and "holds no box to learn from" in log and "the 6 it had were invalid" in log, log[-2000:]
    assert "Starting training" not in log


@pytest.mark.slow
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "out"
    rc, log = _train(*_small_run(out, "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 1))
    assert rc == 0, log[-3000:]
    good = (out / "model_final.pth").read_bytes()
    # resumed at an absurd learning rate (the config's, not the checkpoint's): the first step's update
    # makes the next forward non-finite
    rc, log = _train("--resume", *_small_run(out, "SOLVER.MAX_ITER", 8, "SOLVER.CHECKPOINT_PERIOD", 1,
                                            "SOLVER.BASE_LR", 1e6))
    assert rc != 0
    assert "FloatingPointError: training diverged at iteration 3: a non-finite loss" in log, log[-3000:]
    assert "loss_class nan" in log and "Lower SOLVER.BASE_LR" in log
    assert "matrix contains invalid numeric entries" not in log
    assert (out / "model_0000002.pth.diverged").exists() and not (out / "model_0000002.pth").exists()
    assert (out / "last_checkpoint").read_text() in ("model_final.pth", "model_0000001.pth")
    assert (out / "model_final.pth").read_bytes() == good
    for name in os.listdir(out):
        if name.endswith(".pth"):
            weights = torch.load(out / name, weights_only=False)["model"]
            assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), name


def _tensorboard_steps(path):
    """The iterations of the ``total_loss`` points TensorBoard shows for an event file or a folder of them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path))
    events.Reload()
    return [e.step for e in events.Scalars("total_loss")] if "total_loss" in events.Tags()["scalars"] else []


def _last_checkpoint_iteration(out):
    return int((out / "last_checkpoint").read_text().strip()[len("model_"):-len(".pth")])


def _metrics_iterations(path):
    return [json.loads(line)["iteration"] for line in open(path)]


@pytest.mark.slow
def test_output_dir_lock_kill_and_resume(tmp_path):
    """A second training into a busy OUTPUT_DIR stops at once, naming the first; after a kill,
    --resume removes stale temporaries and the rows the killed run wrote after its checkpoint
    (metrics.json, and TensorBoard's view of the event files), applies the config's learning rate,
    and refuses another class count and a backbone multiplier that changes the optimizer's groups."""
    out = tmp_path / "out"
    args = _small_run(out, "SOLVER.MAX_ITER", 400, "SOLVER.CHECKPOINT_PERIOD", 15, "SOLVER.BASE_LR", 1e-3)
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", TOY_CONFIG,
                              "DATASETS.TOY_ROOT", TOY_ROOT, *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ((out / "metrics.json").exists() and 19 in _metrics_iterations(out / "metrics.json")):
            assert first.poll() is None and time.time() < deadline, "the first training ended or stalled"
            time.sleep(0.5)
        config_before = (out / "config.yaml").read_text()
        rc, log = _train(*_small_run(out, "SOLVER.MAX_ITER", 5))
        assert rc != 0 and f"is in use by another training (pid {first.pid}" in log, log[-2000:]
        assert "set OUTPUT_DIR to another folder" in log
        assert (out / "config.yaml").read_text() == config_before
        # killed once its event file holds a point past its last checkpoint (points at 19, 39, ...,
        # checkpoints at 14, 29, ...), so that both histories hold iterations from the resumed one on
        while _tensorboard_steps(out)[-1:] <= [_last_checkpoint_iteration(out)]:
            assert first.poll() is None and time.time() < deadline, "the first training ended or stalled"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # The resume starts after the last checkpoint, which a loaded machine may write after the last metrics row.
    resume_from = _last_checkpoint_iteration(out) + 1
    end = max(max(_metrics_iterations(out / "metrics.json")), resume_from) + 6
    (out / "model_0000029.pth.tmp.99999").write_bytes(b"half a checkpoint")   # a save the kill interrupted

    rc, log = _train("--resume", *_small_run(out, "SOLVER.MAX_ITER", end, "SOLVER.CHECKPOINT_PERIOD", 15,
                                            "SOLVER.BASE_LR", 5e-4))
    assert rc == 0, log[-3000:]
    assert "removed 1 temporary file(s) left by an interrupted save: model_0000029.pth.tmp.99999" in log
    assert "learning rate (SOLVER.BASE_LR x BACKBONE_MULTIPLIER) 0.001 -> 0.0005" in log
    assert not [f for f in os.listdir(out) if ".tmp." in f]
    rows = _metrics_iterations(out / "metrics.json")
    assert len(rows) == len(set(rows)) and max(rows) == end - 1, rows
    # TensorBoard, reading both runs' event files, shows each iteration once too
    first_file, second_file = sorted(f for f in os.listdir(out) if f.startswith("events.out.tfevents"))
    assert max(_tensorboard_steps(out / first_file)) >= resume_from     # the killed run wrote past its checkpoint
    shown = _tensorboard_steps(out)                                      # both files, as TensorBoard reads them
    assert shown == sorted(set(shown)) and shown[-1] == end - 1, shown
    assert [s for s in _tensorboard_steps(out / second_file) if s >= resume_from] == [s for s in shown if s >= resume_from]
    # the config's rate, from the resume on: what Detectron2's scheduler of the new config gives there
    from detectron2.solver import build_lr_scheduler

    from helpers import toy_cfg

    cfg = toy_cfg("SOLVER.BASE_LR", 5e-4, "SOLVER.MAX_ITER", end)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.SOLVER.BASE_LR)
    scheduler = build_lr_scheduler(cfg, optimizer)
    for _ in range(end - 1):
        scheduler.step()
    resumed = {m["iteration"]: m["lr"] for m in map(json.loads, open(out / "metrics.json")) if "lr" in m}
    assert resumed[end - 1] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-6)

    rc, log = _train("--resume", *_small_run(out, "SOLVER.MAX_ITER", end + 14, "SOLVER.BACKBONE_MULTIPLIER", 0.5))
    assert rc != 0 and "Starting training" not in log and "SOLVER.BACKBONE_MULTIPLIER" in log, log[-2000:]
    assert "parameter groups of [" in log and "without --resume" in log
    rc, log = _train("--resume", *_small_run(out, "SOLVER.MAX_ITER", end + 14, "MODEL.MF_DETR.NUM_CLASSES", 5))
    assert rc != 0 and "Starting training" not in log
    assert "transformer.class_heads.0.weight (4, 128) vs (5, 128)" in log and "MODEL.MF_DETR.NUM_CLASSES" in log, log[-2000:]
    rc, log = _train("--eval-only", *_small_run(out, "MODEL.WEIGHTS", out / "model_final.pth", "MODEL.MF_DETR.DECODER.NUM_LAYERS", 6))
    assert rc != 0 and "missing from the checkpoint: transformer.decoder.3." in log, log[-2000:]
    rc, log = _train("--eval-only", *_small_run(out))
    assert rc != 0 and "--eval-only needs trained weights" in log and "add --resume" in log


@pytest.fixture(scope="module")
def toy_weights(tmp_path_factory):
    from detectron2.modeling import build_model

    from helpers import toy_cfg
    from mobileformer_det.checkpoint import MobileFormerCheckpointer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("weights")
    MobileFormerCheckpointer(build_model(toy_cfg()), str(out), variant="mf52").save("model")
    return str(out / "model.pth")


def _demo(*args):
    return _tool("demo.py", "--config-file", TOY_CONFIG, *args)


@pytest.mark.slow
def test_the_demo_never_overwrites_its_inputs(tmp_path, toy_weights):
    folder, other = tmp_path / "photos", tmp_path / "more"
    folder.mkdir()
    other.mkdir()
    rng = np.random.RandomState(0)
    for path in (folder / "a.png", folder / "b.png", other / "a.png"):
        Image.fromarray(rng.randint(0, 255, (64, 80, 3), dtype=np.uint8)).save(path)
    before = {p: p.read_bytes() for p in (folder / "a.png", folder / "b.png", other / "a.png")}
    opts = ["--opts", "MODEL.WEIGHTS", toy_weights, "DATASETS.TOY_ROOT", TOY_ROOT]

    rc, log = _demo("--input", folder, "--output", folder, *opts)
    assert rc == 2 and "would overwrite the input" in log and "a.png" in log, log[-2000:]
    assert sorted(os.listdir(folder)) == ["a.png", "b.png"]
    assert all(p.read_bytes() == data for p, data in before.items())

    rc, log = _demo("--input", folder, other, "--output", tmp_path / "out", *opts)
    assert rc == 0, log[-2000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["a.json", "a.png", "a_1.json", "a_1.png", "b.json", "b.png"]
    assert json.load(open(tmp_path / "out" / "a_1.json"))["file_name"] == str(other / "a.png")
    assert "also named 'a': written as a_1.png" in log and "3 image(s) written" in log

    import cv2

    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (80, 64))
    for _ in range(5):
        writer.write(rng.randint(0, 255, (64, 80, 3), dtype=np.uint8))
    writer.release()
    data = video.read_bytes()
    rc, log = _demo("--video-input", video, "--output", tmp_path, *opts)
    assert rc == 2 and "would overwrite the video" in log and video.read_bytes() == data


def test_fine_tuning_to_another_class_count_restarts_only_the_class_heads(tmp_path, toy_weights, caplog):
    """A new training from MODEL.WEIGHTS may change the class count (Detectron2's fine-tuning); nothing else."""
    from detectron2.modeling import build_model

    from helpers import toy_cfg
    from mobileformer_det.checkpoint import MobileFormerCheckpointer

    model = build_model(toy_cfg("MODEL.MF_DETR.NUM_CLASSES", 7))
    saved = torch.load(toy_weights, weights_only=False)["model"]
    with caplog.at_level(logging.WARNING):
        MobileFormerCheckpointer(model, variant="mf52", fine_tune=True).load(toy_weights)
    assert "fine-tuning to 7 classes from a checkpoint with 4" in caplog.text
    state = model.state_dict()
    assert torch.equal(state["transformer.decoder.0.ffn.fc1.weight"], saved["transformer.decoder.0.ffn.fc1.weight"])
    assert state["transformer.class_heads.0.weight"].shape == (7, 128)
    with pytest.raises(ValueError, match="class_heads.0.weight .4, 128. vs .7, 128."):
        MobileFormerCheckpointer(model, variant="mf52").load(toy_weights)           # resume, eval, demo: refused
    wider = build_model(toy_cfg("MODEL.MF_DETR.NUM_CLASSES", 7, "MODEL.MF_DETR.DECODER.DIM_FEEDFORWARD", 256))
    with pytest.raises(ValueError, match="ffn.fc1.weight"):
        MobileFormerCheckpointer(wider, variant="mf52", fine_tune=True).load(toy_weights)


@pytest.mark.slow
def test_files_that_are_not_checkpoints_are_named_as_such(tmp_path, toy_weights):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    cut = tmp_path / "cut.pth"
    data = open(toy_weights, "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    Image.new("RGB", (80, 64)).save(tmp_path / "photo.png")
    rc, log = _demo("--input", tmp_path, "--output", tmp_path / "out", "--opts", "MODEL.WEIGHTS", text,
                    "DATASETS.TOY_ROOT", TOY_ROOT)
    assert rc == 2 and "is not a PyTorch checkpoint" in log and "weights_only" not in log, log[-2000:]
    from detectron2.modeling import build_model

    from helpers import toy_cfg
    from mobileformer_det.checkpoint import MobileFormerCheckpointer

    with pytest.raises(ValueError, match="damaged or truncated checkpoint"):
        MobileFormerCheckpointer(build_model(toy_cfg()), variant="mf52").load(str(cut))
    rc, log = _tool("convert_official_weights.py", text, tmp_path / "x.pth", "--variant", "mf26")
    assert rc == 1 and "is not a PyTorch checkpoint" in log and "weights_only" not in log, log
    assert not (tmp_path / "x.pth").exists()


def test_a_norm_the_backbone_cannot_take_is_named():
    from detectron2.modeling import build_model

    from helpers import toy_cfg

    with pytest.raises(ValueError, match="NORM='GN' is not supported.*BN, FrozenBN, SyncBN"):
        build_model(toy_cfg("MODEL.MOBILEFORMER.NORM", "GN"))


def test_a_coco_format_entry_must_not_reuse_a_registered_name(tmp_path):
    from helpers import toy_cfg
    from mobileformer_det.data import register_datasets_from_config

    cfg = toy_cfg("DATASETS.TOY_ROOT", TOY_ROOT)
    cfg.DATASETS.COCO_FORMAT = [["toy_coco_val", str(tmp_path / "mine.json"), str(tmp_path)]]
    with pytest.raises(ValueError, match="'toy_coco_val', but that name is already registered.*another name"):
        register_datasets_from_config(cfg)
    cfg.DATASETS.COCO_FORMAT = [["mfdet_twice", os.path.join(TOY_ROOT, "val.json"), os.path.join(TOY_ROOT, "val")]]
    register_datasets_from_config(cfg)
    register_datasets_from_config(cfg)              # the same entry again (each process of a run): fine


def test_a_training_set_whose_images_are_all_missing_stops_before_the_model(tmp_path):
    from mobileformer_det.data import drop_missing_images

    records = [{"file_name": str(tmp_path / "nowhere" / f"{i}.jpg")} for i in range(3)]
    with pytest.raises(FileNotFoundError, match="none of the 3 images of \\['x'\\] exists.*image_root"):
        drop_missing_images(records, ["x"])
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "nowhere" / "1.jpg").write_bytes(b"")
    assert drop_missing_images(records, ["x"]) == [records[1]]


@pytest.mark.slow
def test_a_graph_exported_for_another_class_count_is_refused(tmp_path, toy_weights, caplog):
    """...and an image that does not fit one exported smaller than the config's test size is warned about."""
    from helpers import toy_cfg
    from mobileformer_det.deploy import Predictor, export_onnx, load_model

    path = str(tmp_path / "toy.onnx")
    export_onnx(load_model(toy_cfg("MODEL.WEIGHTS", toy_weights)), path, 64, 64)
    predictor = Predictor(toy_cfg(), "onnxruntime", onnx_path=path)
    with caplog.at_level(logging.WARNING):
        found = predictor(np.zeros((128, 160, 3), dtype=np.uint8))
    assert found.image_size == (128, 160)
    assert "an image of 160x200 after the test resize does not fit the network's 64x64: shrunk" in caplog.text
    with pytest.raises(ValueError, match="exported for 4 classes, but the config has MODEL.MF_DETR.NUM_CLASSES 80"):
        Predictor(toy_cfg("MODEL.MF_DETR.NUM_CLASSES", 80), "onnxruntime", onnx_path=path)
