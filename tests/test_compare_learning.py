"""tools/compare_learning.py and the D-FINE-N it trains beside MF-DETR (peers.DFineDetector)."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from detectron2.modeling import build_model

from helpers import ROOT, make_instances, toy_cfg

sys.path.insert(0, os.path.join(ROOT, "tools"))
import compare_learning  # noqa: E402
import peers  # noqa: E402,F401 (registers DFineDetector)

TOY_CONFIG = os.path.join(ROOT, "configs", "mf_detr_toy.yaml")


def _d_fine_toy():
    return build_model(toy_cfg("MODEL.META_ARCHITECTURE", peers.DFineDetector.__name__, "MODEL.MF_DETR.TEST.NMS_THRESH", 0.0))


def test_d_fine_detector_takes_boxes_relative_to_the_padded_batch():
    """D-FINE has no padding mask: its targets are normalised by the padded tensor's size (160 x 128
    for images of 140 x 100 and 90 x 120), and its pixels are RGB / 255, zero-padded."""
    model = _d_fine_toy().train()
    seen = {}

    def fake(pixel_values, labels=None):
        seen.update(pixel_values=pixel_values, labels=labels)
        return SimpleNamespace(loss_dict={"loss_vfl": pixel_values.sum() * 0})

    model.detector.forward = fake
    images = [torch.full((3, 100, 140), 255, dtype=torch.uint8), torch.full((3, 120, 90), 51, dtype=torch.uint8)]
    inputs = [{"image": images[0], "instances": make_instances([[14, 10, 42, 60]], [2], (100, 140))},
              {"image": images[1], "instances": make_instances([[0, 0, 80, 32], [40, 64, 90, 120]], [0, 3], (120, 90))}]
    losses = model(inputs)
    assert list(losses) == ["loss_vfl"]
    x = seen["pixel_values"]
    assert x.shape == (2, 3, 128, 160)
    assert torch.all(x[0, :, :100, :140] == 1.0) and torch.all(x[0, :, 100:] == 0) and torch.all(x[0, :, :, 140:] == 0)
    assert torch.allclose(x[1, :, :120, :90], torch.tensor(0.2))
    # cx, cy, w, h over (160, 128, 160, 128), by hand
    torch.testing.assert_close(seen["labels"][0]["boxes"], torch.tensor([[28 / 160, 35 / 128, 28 / 160, 50 / 128]]))
    torch.testing.assert_close(seen["labels"][1]["boxes"],
                               torch.tensor([[40 / 160, 16 / 128, 80 / 160, 32 / 128], [65 / 160, 92 / 128, 50 / 160, 56 / 128]]))
    assert seen["labels"][1]["class_labels"].tolist() == [0, 3]


def test_d_fine_detector_maps_detections_back_to_the_original_image():
    """Boxes relative to the padded batch, to pixels of the resized image, clipped to it, then scaled
    to the requested output size, with the sigmoid scores and classes of the top (query, class) pairs."""
    model = _d_fine_toy().eval()
    logits = torch.full((1, 30, 4), -20.0)
    logits[0, 3, 1], logits[0, 7, 2] = 2.0, 0.0                 # scores 0.881 and 0.5
    boxes = torch.full((1, 30, 4), 0.5)
    boxes[0, 3] = torch.tensor([0.25, 0.25, 0.25, 0.25])        # 20..60 x 16..48 in the 160 x 128 batch
    boxes[0, 7] = torch.tensor([0.75, 0.5, 0.5, 0.5])           # 80..160 x 32..96: clipped at x = 140
    model.detector.forward = lambda pixel_values: SimpleNamespace(logits=logits, pred_boxes=boxes)
    out = model([{"image": torch.zeros(3, 100, 140, dtype=torch.uint8), "height": 200, "width": 280}])
    inst = out[0]["instances"]
    assert inst.image_size == (200, 280)
    torch.testing.assert_close(inst.scores[:2], torch.tensor([0.8808, 0.5]), atol=1e-4, rtol=0)
    assert inst.pred_classes[:2].tolist() == [1, 2]
    torch.testing.assert_close(inst.pred_boxes.tensor[:2], torch.tensor([[40.0, 32, 120, 96], [160, 64, 280, 192]]))


@pytest.mark.slow
def test_compare_learning_trains_both_for_the_same_time_and_resumes(tmp_path, capsys):
    """Through the command line: both models trained, the peer for the iterations its measured step
    time allows in the reference's time, evaluated at the same fractions; a second call reuses the
    calibration and the finished runs instead of training again."""
    from mobileformer_det.data import ensure_toy_dataset

    root = ensure_toy_dataset(os.path.join(ROOT, "datasets", "toy_coco"))
    val = json.load(open(os.path.join(root, "val.json")))
    few = {im["id"] for im in val["images"][:6]}
    (tmp_path / "val6.json").write_text(json.dumps({
        "images": [im for im in val["images"] if im["id"] in few], "categories": val["categories"],
        "annotations": [a for a in val["annotations"] if a["image_id"] in few]}))
    out = tmp_path / "out"
    command = [sys.executable, os.path.join(ROOT, "tools", "compare_learning.py"), "--config-file", TOY_CONFIG,
               "--seeds", "0", "--schedule", "0.006", "--points", "2", "--calibration-rounds", "1",
               "--calibration-steps", "1", "--output", str(out), "DATALOADER.NUM_WORKERS", "0",
               "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
               "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
               "DATASETS.COCO_FORMAT", f"[('toy_val6', '{tmp_path / 'val6.json'}', '{os.path.join(root, 'val')}')]",
               "DATASETS.TEST", "('toy_val6',)"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = json.load(open(out / "results.json"))
    times = saved["step_times"]
    runs = {r["model"]: r for r in saved["runs"]}
    assert list(runs) == ["mf52", "D-FINE-N"]
    assert runs["mf52"]["iterations"] == 10                      # 1800 x 0.006 = 10.8, to a multiple of 2
    expected = max(2, round(10.8 * times["mf52"] / times["D-FINE-N"] / 2) * 2)
    assert runs["D-FINE-N"]["iterations"] == expected
    for run in runs.values():
        assert [p[0] for p in run["points"]] == [run["iterations"] // 2, run["iterations"]]
        assert all(0 <= v <= 100 for p in run["points"] for v in p[1:])
        assert run["s_per_iter"] > 0
    assert "| mf52" in first.stdout and "| D-FINE-N" in first.stdout and "AP / AP50 / AP75 at" in first.stdout

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "step times from" in log and log.count("finished earlier") == 2 and "Starting training" not in log
    assert json.load(open(out / "results.json"))["runs"] == saved["runs"]

    # Options of MF-DETR beside it: only the new model is timed (beside the reference), and trained.
    with_ema = subprocess.run(command[:2] + ["--models", "mf52", "mf52+ema+mal"] + command[2:], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
    assert with_ema.returncode == 0, with_ema.stderr[-3000:]
    log = with_ema.stdout + with_ema.stderr
    assert "timed ['mf52+ema+mal'] beside mf52" in log and log.count("finished earlier") == 1
    times = json.load(open(out / "calibration.json"))
    assert times["mf52"] == saved["step_times"]["mf52"] and times["D-FINE-N"] == saved["step_times"]["D-FINE-N"]
    run = {r["model"]: r for r in json.load(open(out / "results.json"))["runs"]}["mf52+ema+mal"]
    assert run["iterations"] == max(2, round(10.8 * times["mf52"] / times["mf52+ema+mal"] / 2) * 2)
    folder = out / "mf52+ema+mal" / "lr1" / "seed0"
    final = torch.load(folder / "model_final.pth", weights_only=False)
    assert final["ema"]["updates"] == run["iterations"]
    loss = yaml.safe_load((folder / "config.yaml").read_text())["MODEL"]["MF_DETR"]["LOSS"]
    assert (loss["CLASS_TYPE"], loss["CLASS_WEIGHT"]) == ("mal", 1.0)
    with pytest.raises(SystemExit) as bad:
        compare_learning.main(["--config-file", TOY_CONFIG, "--models", "mf52+emma"])
    assert bad.value.code == 2 and "unknown option 'emma' in 'mf52+emma'" in capsys.readouterr().err


@pytest.mark.parametrize("option", sorted(compare_learning.OPTIONS))
def test_every_option_is_a_config_the_detector_builds_with(option):
    """Each ``+option`` names keys of the config, and the toy recipe with it builds its model."""
    cfg = toy_cfg(*compare_learning.model_overrides(f"mf52+{option}"))
    assert cfg.MODEL.MOBILEFORMER.VARIANT == "mf52"
    build_model(cfg)
    with pytest.raises(ValueError, match="unknown option 'mosiac'"):
        compare_learning.model_overrides("mf52+mosiac")


def test_the_schedule_scales_the_augmentations_ends_with_the_steps():
    """At half the schedule, the mosaic's and D-FINE's augmentation's ends come at half their
    iterations, as the learning-rate step does; an end of 0 (never) stays unset."""
    cfg = toy_cfg("INPUT.MOSAIC.UNTIL_ITER", 900, "INPUT.DFINE_AUG.UNTIL_ITER", 1650)
    overrides = compare_learning.schedule(cfg, 900, 3)
    pairs = dict(zip(overrides[::2], overrides[1::2]))
    assert pairs["SOLVER.STEPS"] == (750,) and pairs["TEST.EVAL_PERIOD"] == 300
    assert pairs["INPUT.MOSAIC.UNTIL_ITER"] == 450 and pairs["INPUT.DFINE_AUG.UNTIL_ITER"] == 825
    assert "INPUT.MOSAIC.UNTIL_ITER" not in compare_learning.schedule(toy_cfg(), 900, 3)
