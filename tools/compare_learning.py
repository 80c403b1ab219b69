#!/usr/bin/env python
"""MF-DETR beside today's small DETRs, each trained as its own recipe trains it, for the same CPU time, over several seeds.

    python tools/compare_learning.py --config-file configs/mf_detr_toy.yaml --seeds 0 1 2
    python tools/compare_learning.py --config-file configs/mf_detr_toy_crowd.yaml --models mf52 mf26 DEIMv2-Atto D-FINE-N
    python tools/compare_learning.py --config-file configs/mf_detr_toy.yaml --reference mf52 --models DEIMv2-Femto \
        --lr-factors 0.25 4 --seeds 0
    python tools/compare_learning.py --config-file configs/mf_detr_toy.yaml --models mf52 DEIMv2-Pico --input-scale 2
    python tools/compare_learning.py --config-file configs/mf_detr_toy.yaml --models mf52 mf52+mal --schedule 0.5

Every model trains through this project's ``Trainer`` on the config's datasets: the same images,
augmentations, batch size, test size, ``COCOEvaluator``, post-processing (top-k, threshold, NMS of
``MODEL.MF_DETR.TEST``) and learning-rate schedule shape (warm-up, steps). ``mfXX`` is MF-DETR as
the config builds it on that backbone variant (by default the config's own). A peer (D-FINE-N,
DEIMv2-Atto, -Femto, -Pico, -N) is ``transformers``' model in its published configuration
(``mobileformer_det.modeling.peers``, meta architecture ``PeerDETR``), from random weights like
MF-DETR here, its batch norms trained, with its authors' losses and its own optimiser
(``recipe_overrides``: AdamW at its learning rate, its backbone multiplier, weight decay 1e-4,
gradient norm clipped to 0.1, its weight average), with ``MODEL.MF_DETR.NUM_QUERIES`` queries.

**Equal time.** First the training step of every model is timed on this machine, the models taking
turns (``--calibration-rounds``), so that a load that comes and goes hits them alike. The first
model of ``--models`` (or ``--reference``) trains the config's ``SOLVER.MAX_ITER`` x ``--schedule``
iterations; every other model the iterations that take the same time at its measured step time, with its warm-up,
learning-rate steps and ``--points`` evaluations at the same fractions of its schedule: the
evaluations are at equal training time. The measured step times are kept in
``OUTPUT/calibration.json`` and reused by a later call (``--recalibrate`` measures again); a model
it lacks is timed beside the reference and scaled to the reference's saved time. A finished run
(``result.json`` in its folder) is not trained again: a comparison can be split over several
calls, e.g. one per seed, interrupted, and extended by another model.

**Options.** ``--input-scale 2`` trains and tests every model at twice the config's image sizes
(its own output folder by default). An MF-DETR name may carry ``+option`` (``OPTIONS``):
``mf52+ema`` is MF-DETR mf52 trained with D-FINE's weight average (``MODEL_EMA``), ``mf52+mal``
with DEIM's matchability-aware class loss, ``mf52+fdr`` with D-FINE's distribution refinement of
the boxes, ``mf52+aifi`` with one AIFI encoder layer on the coarsest map, ``mf52+mosaic`` with
DEIM's mosaics (dense one-to-one matching), ``mf52+dfineaug`` with D-FINE's photometric
distortion, zoom-out and IoU crop, timed and trained beside ``mf52``; ``mf52+ema+mal`` with both
of the first two.

Prints a table of AP / AP50 / AP75 (mean and standard deviation over the seeds) at each point, with
the training minutes it stands for, and writes it with every run's figures to ``OUTPUT/results.json``.
"""
import argparse
import json
import logging
import os
import sys

import numpy as np
import torch
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import time_interleaved  # noqa: E402

from mobileformer_det import setup_cfg  # noqa: E402
from mobileformer_det.data import register_datasets_from_config  # noqa: E402
from mobileformer_det.engine import Trainer  # noqa: E402
from mobileformer_det.modeling.peers import PEERS, recipe_overrides  # noqa: E402

logger = logging.getLogger("mobileformer_det")

TRAINABLE_PEERS = [name for name, peer in PEERS.items() if peer.trainable]


# Training options a model name can carry after "+" (e.g. mf52+ema), to measure what a peer's
# recipe brings to MF-DETR at equal time.
OPTIONS = {
    # D-FINE's weight average with its horizon scaled to these sets' schedules: 1 / (1 - 0.99) = 100
    # iterations, about 1.3 epochs of 600 images at batch 8 (D-FINE's 0.9999 spans 1.4 COCO epochs
    # at batch 32), its decay ramped up over 100 iterations (D-FINE: 1000).
    "ema": ["MODEL_EMA.ENABLED", True, "MODEL_EMA.DECAY", 0.99, "MODEL_EMA.WARMUP_ITERS", 100],
    # DEIM's matchability-aware class loss with its gamma and weight (the box losses keep theirs).
    "mal": ["MODEL.MF_DETR.LOSS.CLASS_TYPE", "mal", "MODEL.MF_DETR.LOSS.MAL_GAMMA", 1.5,
            "MODEL.MF_DETR.LOSS.CLASS_WEIGHT", 1.0],
    # D-FINE's fine-grained distribution refinement with its losses (FGL, and GO-LSD's DDF) at its weights.
    "fdr": ["MODEL.MF_DETR.DECODER.BOX_REFINEMENT", "distribution"],
    # RT-DETR's and D-FINE's lightweight encoder: one AIFI layer on the coarsest backbone map.
    "aifi": ["MODEL.MF_DETR.AIFI_LAYERS", 1],
    # DEIM's dense one-to-one matching: half of the training images are 2x2 mosaics (its probability).
    "mosaic": ["INPUT.MOSAIC.ENABLED", True],
    # D-FINE's strong augmentation (photometric distortion, zoom-out, IoU crop); it stops where
    # INPUT.DFINE_AUG.UNTIL_ITER says (scaled with the schedule, as the mosaic's end).
    "dfineaug": ["INPUT.DFINE_AUG.ENABLED", True],
}


def model_overrides(name):
    """Config overrides that turn the config's detector into model ``name``: a peer trained as its
    recipe trains it (``TRAINABLE_PEERS``), or ``mfXX`` followed by ``+option`` (``OPTIONS``) any
    number of times."""
    base, *options = name.split("+")
    if base in TRAINABLE_PEERS:
        if options:
            raise ValueError(f"{name!r}: a peer trains as its own recipe does; +options are MF-DETR's")
        return recipe_overrides(base)
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} in {name!r}: one of {list(OPTIONS)}")
    if base.startswith("mf"):
        return ["MODEL.MOBILEFORMER.VARIANT", base] + [x for o in options for x in OPTIONS[o]]
    raise ValueError(f"unknown model {name!r}: mfXX (MF-DETR on that backbone variant, with +option for any of "
                     f"{list(OPTIONS)}) or one of {TRAINABLE_PEERS}")


def input_scale_overrides(cfg, scale):
    """Overrides that train and test at ``scale`` times the config's image sizes."""
    if scale == 1:
        return []
    return ["INPUT.MIN_SIZE_TRAIN", tuple(round(s * scale) for s in cfg.INPUT.MIN_SIZE_TRAIN),
            "INPUT.MAX_SIZE_TRAIN", round(cfg.INPUT.MAX_SIZE_TRAIN * scale),
            "INPUT.MIN_SIZE_TEST", round(cfg.INPUT.MIN_SIZE_TEST * scale),
            "INPUT.MAX_SIZE_TEST", round(cfg.INPUT.MAX_SIZE_TEST * scale)]


def build_cfg(args, name, extra=()):
    opts = list(args.opts) + model_overrides(name)
    return setup_cfg(args.config_file, opts + input_scale_overrides(setup_cfg(args.config_file, opts), args.input_scale)
                     + list(extra))


def calibrate(args, names):
    """Seconds per training step of each model, timed in turns on the config's training data."""
    trainers = {}
    for name in names:
        cfg = build_cfg(args, name, ["OUTPUT_DIR", os.path.join(args.output, "calibration", name)])
        seed_all_rng(0)
        trainers[name] = Trainer(cfg)
    with EventStorage(0):
        calls = {name: (lambda t=t: [t.run_step() for _ in range(args.calibration_steps)]) for name, t in trainers.items()}
        times = time_interleaved(calls, torch.device("cpu"), args.calibration_rounds, warmup=1, pause=0.0)
    return {name: float(np.median(t)) / args.calibration_steps for name, t in times.items()}


def step_times_of(args, timed):
    """Seconds per step of the models ``timed`` (the reference first), from ``calibration.json`` where
    it has them. Models it lacks are timed in turns with the reference, and their times scaled by
    the reference's saved time over its time now: the ratios stay measured side by side, and the
    runs already made keep their lengths."""
    path = os.path.join(args.output, "calibration.json")
    saved = {}
    if os.path.exists(path) and not args.recalibrate:
        with open(path) as f:
            saved = json.load(f)
    reference = timed[0]
    missing = [name for name in timed if name not in saved] if reference in saved else list(timed)
    if not missing:
        logger.info(f"step times from {path}: {saved} (--recalibrate to measure again)")
        return saved
    measured = calibrate(args, list(dict.fromkeys([reference, *missing])))
    scale = saved[reference] / measured[reference] if reference in saved else 1.0
    if reference in saved:
        logger.info(f"timed {missing} beside {reference} ({measured}); scaled by {scale:.3f} to the saved "
                    f"{reference} step of {saved[reference]:.3f} s")
    saved.update({name: measured[name] * scale for name in missing})
    with open(path, "w") as f:
        json.dump(saved, f, indent=1)
    return saved


def schedule(cfg, iters, points):
    """Overrides that stretch the config's schedule to ``iters`` iterations (a multiple of ``points``)
    with ``points`` evaluations: warm-up, learning-rate steps and the augmentations' ends at the
    same fractions."""
    scale = iters / cfg.SOLVER.MAX_ITER
    ends = []
    for key in ("MOSAIC", "DFINE_AUG"):
        until = cfg.INPUT[key].UNTIL_ITER
        if until > 0:
            ends += [f"INPUT.{key}.UNTIL_ITER", max(1, round(until * scale))]
    return ["SOLVER.MAX_ITER", iters, "SOLVER.STEPS", tuple(max(1, round(s * scale)) for s in cfg.SOLVER.STEPS),
            "SOLVER.WARMUP_ITERS", max(1, round(cfg.SOLVER.WARMUP_ITERS * scale)),
            "TEST.EVAL_PERIOD", iters // points, "SOLVER.CHECKPOINT_PERIOD", iters] + ends


def evaluations(output_dir, iterations):
    """``[(iterations trained, AP, AP50, AP75)]`` and the median seconds per iteration, from ``metrics.json``."""
    points, times = [], []
    with open(os.path.join(output_dir, "metrics.json")) as f:
        for line in f:
            row = json.loads(line)
            if "bbox/AP" in row:
                # a periodic evaluation is logged at its step's index, the final one after the last step
                points.append((min(row["iteration"] + 1, iterations), row["bbox/AP"], row["bbox/AP50"], row["bbox/AP75"]))
            if "time" in row:
                times.append(row["time"])
    return points, float(np.median(times)) if times else float("nan")


def train_one(args, name, lr_factor, seed, iters):
    """Train model ``name`` for ``iters`` iterations (or read the result of a finished run)."""
    out = os.path.join(args.output, name, f"lr{lr_factor:g}", f"seed{seed}")
    done = os.path.join(out, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            result = json.load(f)
        if result["iterations"] == iters:
            logger.info(f"{name} lr x{lr_factor:g} seed {seed}: finished earlier ({done})")
            return result
    base = build_cfg(args, name)
    cfg = build_cfg(args, name, schedule(base, iters, args.points) + [
        "SEED", seed, "SOLVER.BASE_LR", base.SOLVER.BASE_LR * lr_factor, "OUTPUT_DIR", out])
    if os.path.exists(os.path.join(out, "metrics.json")):
        os.remove(os.path.join(out, "metrics.json"))  # an interrupted run's: this one starts afresh
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    logger.info(f"training {name} (lr {cfg.SOLVER.BASE_LR:g}, seed {seed}) for {iters} iterations into {out}")
    seed_all_rng(seed)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    points, s_per_iter = evaluations(out, iters)
    result = {"model": name, "lr": cfg.SOLVER.BASE_LR, "lr_factor": lr_factor, "seed": seed, "iterations": iters,
              "s_per_iter": s_per_iter, "points": points}
    with open(done, "w") as f:
        json.dump(result, f, indent=1)
    return result


def table(results, step_times, points):
    """Rows per (model, lr): s/iter, then mean +- std over seeds of AP/AP50/AP75 at each point."""
    groups = {}
    for r in results:
        groups.setdefault((r["model"], r["lr"]), []).append(r)
    headers = ["model", "lr", "seeds", "iterations", "s/iter (timed in turns)"]
    rows = []
    for (name, lr), runs in groups.items():
        row = [name, f"{lr:g}", " ".join(str(r["seed"]) for r in runs), runs[0]["iterations"], f"{step_times[name]:.3f}"]
        for k in range(points):
            values = np.array([r["points"][k][1:] for r in runs if len(r["points"]) > k])
            if len(values) == 0:
                row.append("-")
                continue
            mean, std = values.mean(0), values.std(0)
            row.append(" / ".join(f"{m:.1f}" for m in mean) + f" (+-{std[0]:.1f})")
        rows.append(row)
    first = next(iter(groups.values()), [{"model": None, "points": []}])[0]
    minutes = [step_times[first["model"]] * it / 60 for it, *_ in first["points"]]  # the same for every model
    for k in range(points):
        headers.append(f"AP / AP50 / AP75 at {minutes[k]:.1f} min" if k < len(minutes) else f"point {k + 1}")
    return tabulate(rows, headers, tablefmt="pipe")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"mfXX (MF-DETR on that backbone variant, +ema for an option of OPTIONS) or a peer: "
                             f"{', '.join(TRAINABLE_PEERS)} (default: the config's variant and every peer)")
    parser.add_argument("--reference", default=None,
                        help="the model that trains the config's schedule; the others train as long (default: "
                             "the first of --models)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr-factors", type=float, nargs="+", default=[1.0],
                        help="multiply each model's SOLVER.BASE_LR by these (a learning-rate sweep)")
    parser.add_argument("--schedule", type=float, default=1.0,
                        help="fraction of the config's SOLVER.MAX_ITER the reference model trains")
    parser.add_argument("--points", type=int, default=3, help="evaluations per run, at equal fractions of its time")
    parser.add_argument("--calibration-rounds", type=int, default=5)
    parser.add_argument("--calibration-steps", type=int, default=4, help="training steps per model per round")
    parser.add_argument("--recalibrate", action="store_true", help="time the steps again instead of reusing calibration.json")
    parser.add_argument("--input-scale", type=float, default=1.0,
                        help="train and test at this multiple of the config's image sizes")
    parser.add_argument("--output", default=None, help="default: output/compare_learning/<config name>[_x<scale>]")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every model")
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = [setup_cfg(args.config_file, args.opts).MODEL.MOBILEFORMER.VARIANT, *TRAINABLE_PEERS]
    args.reference = args.reference or args.models[0]
    for name in {*args.models, args.reference}:
        try:
            model_overrides(name)
        except ValueError as e:
            parser.error(f"--models: {e}")
    if args.schedule <= 0 or args.points < 1 or args.input_scale <= 0:
        parser.error("--schedule and --input-scale must be > 0 and --points >= 1")
    scale = f"_x{args.input_scale:g}" if args.input_scale != 1 else ""
    args.output = args.output or os.path.join("output", "compare_learning",
                                              os.path.splitext(os.path.basename(args.config_file))[0] + scale)
    os.makedirs(args.output, exist_ok=True)
    setup_logger(args.output, name="mobileformer_det", abbrev_name="mfdet")
    setup_logger(args.output)
    cfg = build_cfg(args, args.reference)
    timed = list(dict.fromkeys([args.reference, *args.models]))
    register_datasets_from_config(cfg)

    step_times = step_times_of(args, timed)
    base_iters = cfg.SOLVER.MAX_ITER * args.schedule
    results = []
    for lr_factor in args.lr_factors:
        for seed in args.seeds:
            for name in args.models:
                iters = base_iters * step_times[args.reference] / step_times[name]
                iters = max(args.points, int(round(iters / args.points)) * args.points)
                results.append(train_one(args, name, lr_factor, seed, iters))
    text = table(results, step_times, args.points)
    print(text)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump({"config": args.config_file, "opts": args.opts, "input_scale": args.input_scale,
                   "step_times": step_times, "runs": results,
                   "table": text}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
