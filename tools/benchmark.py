#!/usr/bin/env python
"""Speed of MF-DETR: inference latency and throughput, training seconds per iteration, data loading.

    python tools/benchmark.py --config-file configs/mf_detr_294m.yaml --task eval --input-size 640 640 \
        --compare-size 800 800
    python tools/benchmark.py --config-file configs/mf_detr_toy.yaml --task train
    python tools/benchmark.py --config-file configs/mf_detr_toy.yaml --task data

``train`` times the trainer's own step (forward, backward, clipping, optimizer; AMP with ``--amp``
on CUDA) on a synthetic batch. ``eval`` times batch 1 and batch 8 (median and p90 over ``--runs`` after ``--warmup``), and in the
same run torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` (random weights: speed only) at
``--compare-size`` (default: the same size), then prints the ratio. On CUDA every timing is
synchronised; ``--amp`` runs under autocast (float16 on CUDA, bfloat16 on the CPU).
"""
import argparse
import contextlib
import itertools
import logging
import time

import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from mobileformer_det import setup_cfg
from mobileformer_det.engine import (
    ClippingAMPTrainer,
    ClippingTrainer,
    Trainer,
    build_optimizer,
    clip_norm_from_config,
)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, runs, warmup):
    """Seconds of each of ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return np.array(times)


def autocast(device, enabled):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def bench_eval(args, cfg):
    device = torch.device(cfg.MODEL.DEVICE)
    height, width = args.input_size or (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
    comp_h, comp_w = args.compare_size or (height, width)
    model = build_model(cfg).eval()
    import torchvision

    reference = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=min(comp_h, comp_w), max_size=max(comp_h, comp_w),
    ).eval().to(device)
    rows = []
    for batch in args.batch_sizes:
        images = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8) for _ in range(batch)]
        inputs = [{"image": im, "height": height, "width": width} for im in images]
        ref_inputs = [torch.rand(3, comp_h, comp_w, device=device) for _ in range(batch)]
        with torch.no_grad(), autocast(device, args.amp):
            ours = time_fn(lambda: model(inputs), device, args.runs, args.warmup)
            theirs = time_fn(lambda: reference(ref_inputs), device, args.runs, args.warmup)
        for name, size, t in ((f"MF-DETR {cfg.MODEL.MOBILEFORMER.VARIANT}", (height, width), ours),
                              ("torchvision FRCNN-MobileNetV3-FPN", (comp_h, comp_w), theirs)):
            rows.append([name, f"{size[0]}x{size[1]}", batch, f"{1000 * np.median(t):.1f}",
                         f"{1000 * np.percentile(t, 90):.1f}", f"{batch / np.median(t):.2f}"])
        rows.append(["ratio (MF-DETR / torchvision)", "", batch, f"{np.median(ours) / np.median(theirs):.2f}", "", ""])
    print(tabulate(rows, ["model", "input", "batch", "median ms", "p90 ms", "images/s"], tablefmt="pipe"))


def _synthetic_batch(cfg, batch, height, width, rng):
    """Images with 1-5 random boxes each, as the DETR mapper would produce them."""
    inputs = []
    for _ in range(batch):
        n = int(rng.randint(1, 6))
        xy = rng.uniform(0, 0.7, size=(n, 2)) * [width, height]
        wh = rng.uniform(0.05, 0.3, size=(n, 2)) * [width, height]
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32))
        inst.gt_classes = torch.tensor(rng.randint(0, cfg.MODEL.MF_DETR.NUM_CLASSES, size=n))
        inputs.append({"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8), "instances": inst})
    return inputs


def bench_train(args, cfg):
    """Seconds per training step of the trainer's own step (forward, backward, clipping, optimizer)."""
    device = torch.device(cfg.MODEL.DEVICE)
    height, width = args.input_size or (max(cfg.INPUT.MIN_SIZE_TRAIN),) * 2
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    batch = args.train_batch or cfg.SOLVER.IMS_PER_BATCH
    inputs = _synthetic_batch(cfg, batch, height, width, np.random.RandomState(0))
    amp = args.amp and device.type == "cuda"
    kwargs = {"grad_scaler": torch.amp.GradScaler("cuda")} if amp else {}
    step_trainer = (ClippingAMPTrainer if amp else ClippingTrainer)(
        model, itertools.repeat(inputs), optimizer, clip_norm=clip_norm_from_config(cfg), **kwargs)
    with EventStorage():
        t = time_fn(step_trainer.run_step, device, args.runs, args.warmup)
    rows = [[f"MF-DETR {cfg.MODEL.MOBILEFORMER.VARIANT}", f"{height}x{width}", batch, len(optimizer.param_groups),
             f"{np.median(t):.3f}", f"{np.percentile(t, 90):.3f}", f"{batch / np.median(t):.2f}"]]
    if device.type == "cuda":
        rows[0].append(f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}")
    headers = ["model", "input", "batch", "param groups", "median s/iter", "p90 s/iter", "images/s"]
    print(tabulate(rows, headers + (["peak GiB"] if device.type == "cuda" else []), tablefmt="pipe"))


def bench_data(args, cfg):
    from mobileformer_det.data import register_datasets_from_config

    register_datasets_from_config(cfg)
    loader = iter(Trainer.build_train_loader(cfg))
    batch = cfg.SOLVER.IMS_PER_BATCH
    for _ in range(args.warmup):
        next(loader)
    start = time.perf_counter()
    for _ in range(args.runs):
        next(loader)
    elapsed = time.perf_counter() - start
    print(tabulate([[cfg.DATASETS.TRAIN[0], cfg.DATALOADER.NUM_WORKERS, batch, f"{args.runs * batch / elapsed:.1f}"]],
                   ["dataset", "workers", "batch", "images/s"], tablefmt="pipe"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--task", choices=["eval", "train", "data"], default="eval")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"))
    parser.add_argument("--compare-size", nargs=2, type=int, metavar=("H", "W"),
                        help="input size of the torchvision detector (default: --input-size)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--train-batch", type=int, help="training batch (default SOLVER.IMS_PER_BATCH)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA, bfloat16 on CPU)")
    parser.add_argument("--device", help="override MODEL.DEVICE")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    setup_logger(name="fvcore")
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = setup_cfg(args.config_file, args.opts + (["MODEL.DEVICE", args.device] if args.device else [])
                    + ["MODEL.WEIGHTS", ""])
    device = torch.device(cfg.MODEL.DEVICE)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}); torch {torch.__version__}; CPU threads: {torch.get_num_threads()}; "
          f"AMP: {args.amp}; runs: {args.runs} after {args.warmup} warm-up")
    {"eval": bench_eval, "train": bench_train, "data": bench_data}[args.task](args, cfg)


if __name__ == "__main__":
    main()
