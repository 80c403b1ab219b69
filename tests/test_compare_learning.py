"""tools/compare_learning.py: MF-DETR beside a peer (PeerDETR) for the same CPU time."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from detectron2.modeling import build_model

from helpers import ROOT, toy_cfg

sys.path.insert(0, os.path.join(ROOT, "tools"))
import compare_learning  # noqa: E402

TOY_CONFIG = os.path.join(ROOT, "configs", "mf_detr_toy.yaml")


@pytest.mark.slow
def test_compare_learning_trains_both_for_the_same_time_and_resumes(tmp_path, capsys):
    """Through the command line: both models trained, the peer (DEIMv2-Atto, with its recipe's
    optimiser and weight average) for the iterations its measured step time allows in the
    reference's time, evaluated at the same fractions; a second call reuses the calibration and the
    finished runs instead of training again."""
    from mobileformer_det.data import ensure_toy_dataset

    root = ensure_toy_dataset(os.path.join(ROOT, "datasets", "toy_coco"))
    val = json.load(open(os.path.join(root, "val.json")))
    few = {im["id"] for im in val["images"][:6]}
    (tmp_path / "val6.json").write_text(json.dumps({
        "images": [im for im in val["images"] if im["id"] in few], "categories": val["categories"],
        "annotations": [a for a in val["annotations"] if a["image_id"] in few]}))
    out = tmp_path / "out"
    command = [sys.executable, os.path.join(ROOT, "tools", "compare_learning.py"), "--config-file", TOY_CONFIG,
               "--models", "mf52", "DEIMv2-Atto", "--seeds", "0", "--schedule", "0.006", "--points", "2", "--calibration-rounds", "1",
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
    assert list(runs) == ["mf52", "DEIMv2-Atto"]
    assert runs["mf52"]["iterations"] == 10                      # 1800 x 0.006 = 10.8, to a multiple of 2
    expected = max(2, round(10.8 * times["mf52"] / times["DEIMv2-Atto"] / 2) * 2)
    assert runs["DEIMv2-Atto"]["iterations"] == expected
    assert runs["DEIMv2-Atto"]["lr"] == 2e-3 and runs["mf52"]["lr"] == 2e-3
    atto = yaml.safe_load((out / "DEIMv2-Atto" / "lr1" / "seed0" / "config.yaml").read_text())
    assert (atto["MODEL"]["META_ARCHITECTURE"], atto["MODEL"]["PEER"]["NAME"], atto["SOLVER"]["BACKBONE_MULTIPLIER"],
            atto["MODEL_EMA"]["ENABLED"]) == ("PeerDETR", "DEIMv2-Atto", 0.5, True)
    for run in runs.values():
        assert [p[0] for p in run["points"]] == [run["iterations"] // 2, run["iterations"]]
        assert all(0 <= v <= 100 for p in run["points"] for v in p[1:])
        assert run["s_per_iter"] > 0
    assert "| mf52" in first.stdout and "| DEIMv2-Atto" in first.stdout and "AP / AP50 / AP75 at" in first.stdout

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "step times from" in log and log.count("finished earlier") == 2 and "Starting training" not in log
    assert json.load(open(out / "results.json"))["runs"] == saved["runs"]

    # Options of MF-DETR beside it: only the new model is timed (beside the reference), and trained.
    with_ema = subprocess.run(command[:4] + ["--models", "mf52", "mf52+ema+mal"] + command[7:], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
    assert with_ema.returncode == 0, with_ema.stderr[-3000:]
    log = with_ema.stdout + with_ema.stderr
    assert "timed ['mf52+ema+mal'] beside mf52" in log and log.count("finished earlier") == 1
    times = json.load(open(out / "calibration.json"))
    assert times["mf52"] == saved["step_times"]["mf52"] and times["DEIMv2-Atto"] == saved["step_times"]["DEIMv2-Atto"]
    run = {r["model"]: r for r in json.load(open(out / "results.json"))["runs"]}["mf52+ema+mal"]
    assert run["iterations"] == max(2, round(10.8 * times["mf52"] / times["mf52+ema+mal"] / 2) * 2)
    folder = out / "mf52+ema+mal" / "lr1" / "seed0"
    final = torch.load(folder / "model_final.pth", weights_only=False)
    assert final["ema"]["updates"] == run["iterations"]
    loss = yaml.safe_load((folder / "config.yaml").read_text())["MODEL"]["MF_DETR"]["LOSS"]
    assert (loss["CLASS_TYPE"], loss["CLASS_WEIGHT"]) == ("mal", 1.0)
    for models, message in [("mf52+emma", "unknown option 'emma' in 'mf52+emma'"),
                            ("DEIMv2-Atto+ema", "a peer trains as its own recipe does"),
                            ("DETR-R50", "unknown model 'DETR-R50'")]:
        with pytest.raises(SystemExit) as bad:
            compare_learning.main(["--config-file", TOY_CONFIG, "--models", models])
        assert bad.value.code == 2 and message in capsys.readouterr().err


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


def test_input_scale_multiplies_every_image_size_of_the_config():
    """--input-scale 2: the training sizes, the cap and the test size doubled, for every model."""
    args = compare_learning.argparse.Namespace(config_file=TOY_CONFIG, opts=[], input_scale=2.0)
    for name in ("mf52", "DEIMv2-Pico"):
        cfg = compare_learning.build_cfg(args, name)
        assert (tuple(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST,
                cfg.INPUT.MAX_SIZE_TEST) == ((224, 256, 288), 400, 320, 400)
    assert compare_learning.input_scale_overrides(toy_cfg(), 1.0) == []
