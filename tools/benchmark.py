#!/usr/bin/env python
"""Speed of MF-DETR: inference latency and throughput, training seconds per iteration, data loading.

    python tools/benchmark.py --config-file configs/mf_detr_294m.yaml --task eval --input-size 640 640 \
        --compare-size 800 800
    python tools/benchmark.py --config-file configs/mf_detr.yaml --task eval --input-size 800 1216 \
        --runtime plain torch onnxruntime openvino --batch-sizes 1
    python tools/benchmark.py --config-file configs/mf_detr.yaml --task eval --input-size 800 1216 --breakdown
    python tools/benchmark.py --config-file configs/mf_detr_26m.yaml --task eval --input-size 640 640 \
        --runtime onnxruntime onnxruntime-unmasked openvino openvino-unmasked --batch-sizes 1
    python tools/benchmark.py --config-file configs/mf_detr.yaml configs/mf_detr_{294,214,151,96,52,26}m.yaml \
        --task variants --input-size 640 640 --runtime torch onnxruntime
    python tools/benchmark.py --config-file configs/mf_detr_{26,52,96}m.yaml configs/mf_detr.yaml --task peers \
        --runtime torch onnxruntime --plot peers.png
    python tools/benchmark.py --config-file configs/mf_detr_toy.yaml --task train
    python tools/benchmark.py --config-file configs/mf_detr_toy.yaml --task data
    python tools/benchmark.py --config-file configs/mf_detr_toy.yaml --task checks --images 118287

``train`` times the trainer's own step (forward, backward, clipping, optimizer; AMP with ``--amp``
on CUDA) on a synthetic batch. ``eval`` times each ``--runtime`` at batch 1 and batch 8 (median and
p90 over ``--runs`` after ``--warmup``, the runtimes taken in turns) and, in the same run,
torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` (random weights: speed only) at
``--compare-size`` (default: the same size), with each one's ratio to the first runtime.
``variants`` prints parameters, GFLOPs (as trained, and as the prepared model computes them:
batch norm and neck folded) and the latency of each ``--runtime`` at batch 1 for each
config's detector when given several configs (e.g. every variant's recipe, each with its own decoder),
or for one config's detector on each of the seven backbones. ``peers`` times each config's detector
beside DEIMv2, D-FINE, RT-DETRv2, Deformable DETR and DETR (Hugging Face ``transformers``) and
torchvision's SSDLite and Faster R-CNN (``mobileformer_det.modeling.peers``; ``pip install -e
".[bench]"``), each peer at its published input size and MF-DETR at each of those, in one
interleaved loop, with ratios to the first peer at each size and, with ``--plot``, a PNG of
milliseconds against GFLOPs. ``--breakdown`` splits one inference
into parts (backbone stages, neck, query selection, decoder layers ...) beside their fvcore GFLOPs:
eager PyTorch timed by hooks and, with ``--runtime onnxruntime``, the exported graph from ONNX
Runtime's profile. On CUDA every timing is synchronised; ``--amp`` runs under autocast (float16 on CUDA, bfloat16 on the CPU).
"""
import argparse
import contextlib
import copy
import itertools
import json
import logging
import os
import tempfile
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


def autocast(device, enabled):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def build_eval_model(cfg):
    """The config's detector in eval mode, its weights as distinct as a trained model's.

    Freshly built, the decoder layers are copies of one layer; ONNX Runtime and OpenVINO merge equal
    computations on equal inputs, so the layers' value projections of the same memory would run
    once instead of once per layer, and they would look faster than they are on trained weights.
    Every parameter gets independent noise (std 1e-3): no two weight tensors are equal any more.
    """
    model = build_model(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=generator).to(p))
    return model


def _runners(args, cfg, model, height, width, tmpdir):
    """name -> callable(batch size) -> callable() running that runtime on a batch (random images)."""
    from mobileformer_det.deploy import TensorDetector, export_onnx, graph_runner

    device = torch.device(cfg.MODEL.DEVICE)
    runners = {}
    for runtime in args.runtime:
        if runtime in ("plain", "torch"):
            net = model if runtime == "plain" else copy.deepcopy(model).deploy()

            def make(batch, net=net):
                inputs = [{"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8), "height": height,
                           "width": width} for _ in range(batch)]
                return lambda: net(inputs)
        elif runtime == "compile":
            net = torch.compile(TensorDetector(copy.deepcopy(model).deploy()), dynamic=False)

            def make(batch, net=net):
                images = torch.randint(0, 256, (batch, 3, height, width), device=device).float()
                return lambda: net(images)
        else:  # onnxruntime / openvino, on the graph, its -unmasked form (no image_sizes) or its -int8 form
            engine, _, form = runtime.partition("-")
            path = (form != "unmasked" and args.onnx) or os.path.join(tmpdir, f"model{'-unmasked' * (form == 'unmasked')}.onnx")
            if not os.path.exists(path):
                export_onnx(copy.deepcopy(model), path, height, width, dynamic_batch=True, masked=form != "unmasked")
            if form == "int8":
                from mobileformer_det.quantize import quantize_graph

                int8 = os.path.join(tmpdir, "model-int8.onnx")
                if not os.path.exists(int8):  # speed only: random weights, calibrated on random images
                    rng = np.random.RandomState(0)
                    quantize_graph(path, int8, cfg, [rng.randint(0, 256, (height, width, 3), dtype=np.uint8)
                                                     for _ in range(4)])
                path = int8
            run = graph_runner(path, engine, torch.get_num_threads())

            def make(batch, run=run):
                images = np.random.randint(0, 256, (batch, 3, height, width)).astype(np.float32)
                return lambda: run(images)
        runners[f"MF-DETR {cfg.MODEL.MOBILEFORMER.VARIANT} {runtime}"] = ((height, width), make)
    return runners


def bench_eval(args, cfg):
    """Latency of each ``--runtime`` and of torchvision's detector, interleaved run by run."""
    import torchvision

    device = torch.device(cfg.MODEL.DEVICE)
    height, width = args.input_size or (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
    comp_h, comp_w = args.compare_size or (height, width)
    model = build_eval_model(cfg)
    reference = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=min(comp_h, comp_w), max_size=max(comp_h, comp_w),
    ).eval().to(device)

    def make_reference(batch):
        images = [torch.rand(3, comp_h, comp_w, device=device) for _ in range(batch)]
        return lambda: reference(images)

    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        runners = _runners(args, cfg, model, height, width, tmpdir)
        runners["torchvision FRCNN-MobileNetV3-FPN"] = ((comp_h, comp_w), make_reference)
        for batch in args.batch_sizes:
            calls = {name: make(batch) for name, (_, make) in runners.items()}
            with torch.no_grad(), autocast(device, args.amp):
                times = time_interleaved(calls, device, args.runs, args.warmup)
            first = next(iter(runners))
            for name, t in times.items():
                size = runners[name][0]
                rows.append([name, f"{size[0]}x{size[1]}", batch, f"{1000 * np.median(t):.1f}",
                             f"{1000 * np.percentile(t, 90):.1f}", f"{batch / np.median(t):.2f}",
                             f"{np.median(t) / np.median(times[first]):.2f}"])
                if device.type == "cuda":  # each runtime once more, alone, for its peak memory
                    torch.cuda.reset_peak_memory_stats(device)
                    with torch.no_grad(), autocast(device, args.amp):
                        calls[name]()
                    rows[-1].append(f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}")
    headers = ["model", "input", "batch", "median ms", "p90 ms", "images/s", f"/ {first.split()[-1]}"]
    print(tabulate(rows, headers + (["peak GiB"] if device.type == "cuda" else []), tablefmt="pipe"))


def time_interleaved(calls, device, runs, warmup, pause=0.05):
    """Seconds of ``runs`` calls of each function, taken in turns (a load that comes and goes on a
    shared machine then hits all of them alike), ``pause`` seconds apart."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in calls}
    for _ in range(runs):
        for name, fn in calls.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            time.sleep(pause)  # ONNX Runtime's threads spin after a run: let them stop before the next timing
    return {name: np.array(t) for name, t in times.items()}


def _parts(model):
    """Named parts of MF-DETR for the breakdown: name -> modules (timed by hooks) or a bound method."""
    backbone, transformer = model.backbone, model.transformer
    parts = {"preprocess (normalise, pad)": "preprocess_image", "backbone stem": [backbone.stem]}
    for block, stage in zip(backbone.blocks, backbone._stage_of_block):
        parts.setdefault(f"backbone {stage}", []).append(block)
    parts["backbone final Mobile->Former"] = [backbone.final_mobile_to_former]
    parts["neck"] = [model.neck]
    parts["token projection"] = [model.token_proj]
    if len(transformer.encoder):
        parts["encoder"] = list(transformer.encoder)
    if transformer.two_stage:
        parts["query selection (two-stage)"] = "transformer._select_queries"
    for i, layer in enumerate(transformer.decoder):
        parts[f"decoder layer {i}"] = [layer]
    parts["class and box heads"] = (list(transformer.class_heads) + list(transformer.box_heads)
                                    + ([transformer.pre_box_head] if transformer.distribution else []))
    parts["post-processing (top-k, boxes)"] = [model.postprocess]
    return parts


def _modules_of(model, target):
    """The modules a ``_parts`` entry covers (query selection: its three heads; methods: none)."""
    if not isinstance(target, str):
        return target
    t = model.transformer
    return [t.enc_output, t.enc_class_head, t.enc_box_head] if "select" in target else []


def _flops_by_part(model, parts, height, width):
    from mobileformer_det.utils.flops import detector_flops_by_module

    total, by_module = detector_flops_by_module(model, height, width)
    names = {module: name for name, module in model.named_modules()}
    flops = {}
    for part, target in parts.items():
        flops[part] = sum(by_module.get(names[m], 0.0) for m in _modules_of(model, target))
    return flops, total


REORDERS = "layout reorders (onnxruntime only)"
OTHER = "other (glue, masks, flattening)"


def _onnxruntime_by_part(profile, model, parts, skip):
    """ms per part and per operator type of each ONNX Runtime run in ``profile`` (the session's JSON)
    after the first ``skip``: a node belongs to the part whose module scope starts its name (torch.onnx
    names nodes ``/backbone/blocks.3/...``); ONNX Runtime's own layout reorders (NCHWc) are a part of
    their own. Returns two lists with a dict per run: part -> ms (and "total"), op type -> (nodes, ms)."""
    names = {module: name for name, module in model.named_modules()}
    scopes = [("." + names[m] + ".", part) for part, target in parts.items() for m in _modules_of(model, target)]
    with open(profile) as f:
        events = json.load(f)
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    records, by_op = [], []
    for run in [e for e in events if e.get("name") == "model_run"][skip:]:
        record, ops = {"total": run["dur"] / 1e3}, {}
        for e in nodes:
            if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]:
                op = e["args"].get("op_name", "?")
                count, ms = ops.get(op, (0, 0.0))
                ops[op] = (count + 1, ms + e["dur"] / 1e3)
                dotted = e["name"].replace("/", ".")
                part = REORDERS if op.startswith("Reorder") else next(
                    (p for scope, p in scopes if dotted.startswith(scope)), None)
                if part:
                    record[part] = record.get(part, 0.0) + e["dur"] / 1e3
        records.append(record)
        by_op.append(ops)
    return records, by_op


def _op_table(by_op, total_ms):
    """Rows (op type, nodes per run, median ms, share of the run) for ONNX Runtime's operator types,
    slowest first; ``by_op`` as ``_onnxruntime_by_part`` returns it."""
    types = {op for ops in by_op for op in ops}
    rows = [[op, max(ops.get(op, (0, 0.0))[0] for ops in by_op),
             float(np.median([ops.get(op, (0, 0.0))[1] for ops in by_op]))] for op in types]
    rows.sort(key=lambda r: -r[2])
    return [[op, n, f"{ms:.1f}", f"{100 * ms / total_ms:.0f}%"] for op, n, ms in rows]


def bench_breakdown(args, cfg):
    """Milliseconds per part of one image's inference, plain model and prepared (batch norm and
    neck folded, channels-last backbone), and, with ``--runtime onnxruntime``, the exported graph (profiled by
    ONNX Runtime), interleaved, beside each part's GFLOPs."""
    from mobileformer_det.deploy import export_onnx, graph_feed, onnx_session

    height, width = args.input_size or (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
    plain = build_eval_model(cfg)
    models = {"plain": plain, "torch": copy.deepcopy(plain).deploy()}
    flops, total_flops = _flops_by_part(plain, _parts(plain), height, width)
    fast_flops, fast_total = _flops_by_part(models["torch"], _parts(models["torch"]), height, width)
    inputs = [{"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8), "height": height, "width": width}]
    tmpdir = tempfile.TemporaryDirectory()
    if "onnxruntime" in args.runtime:  # exported before the timing hooks go on
        path = export_onnx(copy.deepcopy(plain),
                           os.path.join(tmpdir.name, "model.onnx"), height, width)
    records, calls = {}, {}
    for name, model in models.items():
        seconds, starts = {}, {}
        for part, target in _parts(model).items():
            if isinstance(target, str):
                owner, attr = (model.transformer, target.split(".")[1]) if "." in target else (model, target)
                setattr(owner, attr, _timed(getattr(owner, attr), part, seconds))
            else:
                for module in target:
                    module.register_forward_pre_hook(
                        lambda m, i, part=part, starts=starts: starts.__setitem__(part, time.perf_counter()))
                    module.register_forward_hook(lambda m, i, o, part=part, seconds=seconds, starts=starts: seconds.__setitem__(
                        part, seconds.get(part, 0.0) + time.perf_counter() - starts[part]))
        records[name] = []

        def run(model=model, seconds=seconds, record=records[name]):
            seconds.clear()
            start = time.perf_counter()
            model(inputs)
            record.append({part: 1e3 * t for part, t in dict(seconds, total=time.perf_counter() - start).items()})
        calls[name] = run
    with tmpdir:
        if "onnxruntime" in args.runtime:
            session = onnx_session(path, torch.get_num_threads(), profile_prefix=os.path.join(tmpdir.name, "profile"))
            images = np.random.randint(0, 256, (1, 3, height, width)).astype(np.float32)
            feed = dict(zip([i.name for i in session.get_inputs()], graph_feed(True, images)))
            calls["onnxruntime"] = lambda: session.run(None, feed)
        with torch.no_grad():
            time_interleaved(calls, torch.device(cfg.MODEL.DEVICE), args.runs, args.warmup)
        if "onnxruntime" in calls:
            records["onnxruntime"], by_op = _onnxruntime_by_part(session.end_profiling(), plain, _parts(plain),
                                                                 args.warmup)
    medians = {name: {part: np.median([r.get(part, 0.0) for r in record[-args.runs:]])
                      for part in list(flops) + [REORDERS, "total"]} for name, record in records.items()}
    rows = []
    for part in list(flops) + ([REORDERS] if "onnxruntime" in medians else []) + [OTHER, "total"]:
        if part == OTHER:
            values = {n: m["total"] - sum(v for k, v in m.items() if k != "total") for n, m in medians.items()}
            part_flops = [total_flops - sum(flops.values()), fast_total - sum(fast_flops.values())]
        else:
            values = {n: m[part] for n, m in medians.items()}
            part_flops = [total_flops, fast_total] if part == "total" else [flops.get(part, 0.0), fast_flops.get(part, 0.0)]
        rows.append([part, *(f"{f:.3f}" for f in part_flops), *(f"{v:.1f}" for v in values.values()),
                     f"{100 * values['torch'] / medians['torch']['total']:.0f}%"])
    print(f"\nMF-DETR {cfg.MODEL.MOBILEFORMER.VARIANT} at {height}x{width}, batch 1: median ms per part over "
          f"{args.runs} interleaved runs (plain: as trained; torch: batch norm folded, neck folded into the "
          "memory's readers, channels-last backbone"
          + ("; onnxruntime: the exported graph, profiled, its top-level nodes (normalisation, top-k) in other"
             if "onnxruntime" in medians else "") + ")")
    print(tabulate(rows, ["part", "GFLOPs", "GFLOPs (torch)", *(f"{n} ms" for n in medians), "share (torch)"],
                   tablefmt="pipe"))
    if "onnxruntime" in medians:
        print(f"\nONNX Runtime by operator type (kernel time; the run's total {medians['onnxruntime']['total']:.1f} ms "
              "includes the time between kernels):")
        print(tabulate(_op_table(by_op[-args.runs:], medians["onnxruntime"]["total"]),
                       ["op type", "nodes", "onnxruntime ms", "share"], tablefmt="pipe"))


def _timed(fn, part, current):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        current[part] = current.get(part, 0.0) + time.perf_counter() - start
        return out
    return wrapper


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
        t = time_interleaved({"train": step_trainer.run_step}, device, args.runs, args.warmup)["train"]
    rows = [[f"MF-DETR {cfg.MODEL.MOBILEFORMER.VARIANT}", f"{height}x{width}", batch, len(optimizer.param_groups),
             f"{np.median(t):.3f}", f"{np.percentile(t, 90):.3f}", f"{batch / np.median(t):.2f}"]]
    if device.type == "cuda":
        rows[0].append(f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}")
    headers = ["model", "input", "batch", "param groups", "median s/iter", "p90 s/iter", "images/s"]
    print(tabulate(rows, headers + (["peak GiB"] if device.type == "cuda" else []), tablefmt="pipe"))


def bench_variants(args, cfgs):
    """Parameters, GFLOPs and the median latency of each ``--runtime`` (taken in turns) at
    ``--input-size``, batch 1: each config's detector, or, given one config, its detector on every
    Mobile-Former variant."""
    from mobileformer_det.modeling import VARIANTS
    from mobileformer_det.utils.flops import detector_flops_by_module

    if len(cfgs) == 1:
        cfgs = [cfgs[0].clone() for _ in VARIANTS]
        for c, variant in zip(cfgs, VARIANTS):
            c.defrost()
            c.MODEL.MOBILEFORMER.VARIANT = variant
    cfg = cfgs[0]
    height, width = args.input_size or (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for i, (c, path) in enumerate(zip(cfgs, itertools.cycle(args.config_file))):
            d = c.MODEL.MF_DETR
            model = build_eval_model(c)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            gflops, _ = detector_flops_by_module(model, height, width)
            prepared_gflops, _ = detector_flops_by_module(copy.deepcopy(model).deploy(), height, width)
            os.makedirs(os.path.join(tmpdir, str(i)))
            runners = _runners(args, c, model, height, width, os.path.join(tmpdir, str(i)))
            with torch.no_grad():
                times = time_interleaved({name: make(1) for name, (_, make) in runners.items()},
                                         torch.device(c.MODEL.DEVICE), args.runs, args.warmup)
            medians = [1000 * np.median(t) for t in times.values()]
            rows.append([c.MODEL.MOBILEFORMER.VARIANT, os.path.basename(path),
                         f"{d.HIDDEN_DIM}x{d.DECODER.NUM_LAYERS}", f"{params:.2f}", f"{gflops:.2f}", f"{prepared_gflops:.2f}",
                         *(f"{m:.1f}" for m in medians)])
    print(f"\nMF-DETR on each backbone at {height}x{width}, batch 1 (decoder: width x layers):")
    print(tabulate(rows, ["variant", "config", "decoder", "params (M)", "GFLOPs", "GFLOPs (torch)",
                          *(f"{r} ms" for r in args.runtime)], tablefmt="pipe"))


def bench_peers(args, cfgs):
    """MF-DETR (each config's detector, deployed) beside today's small detectors
    (``mobileformer_det.modeling.peers``), each peer at its published input size (or all at
    ``--input-size``) and MF-DETR at each of those sizes, batch 1, each ``--runtime`` (torch:
    eager; onnxruntime / openvino: the graph exported here), all timed in one interleaved loop.
    Prints a table per input size: parameters, fvcore GFLOPs (MF-DETR: as trained and deployed),
    milliseconds, and each time's ratio to the first of ``--peers`` at that size in the same
    runtime; ``--plot`` draws milliseconds against GFLOPs (see :func:`plot_peers`)."""
    from mobileformer_det.deploy import TensorDetector, export_onnx, graph_runner
    from mobileformer_det.modeling.peers import PEERS, build_peer
    from mobileformer_det.utils.flops import detector_flops_by_module, flop_count_analysis

    runtimes = [r for r in args.runtime if r in ("torch", "onnxruntime", "openvino")]
    peer_sizes = {name: tuple(args.input_size or PEERS[name].input_size) for name in args.peers}
    sizes = list(dict.fromkeys(peer_sizes.values())) or [tuple(args.input_size or (640, 640))]
    rows, calls, notes = {}, {}, []  # rows: (name, size) -> [COCO AP, params, GFLOPs, GFLOPs text]
    tmpdir = tempfile.TemporaryDirectory()
    inputs = {}
    for height, width in sizes:
        images = torch.randint(0, 256, (1, 3, height, width)).float()
        inputs[(height, width)] = (images, images.numpy())
    for c in cfgs:
        model = build_eval_model(c)
        name = f"MF-DETR {c.MODEL.MOBILEFORMER.VARIANT}"
        deployed = copy.deepcopy(model).deploy()
        net = TensorDetector(deployed)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for size in sizes:
            images, array = inputs[size]
            gflops, _ = detector_flops_by_module(model, *size)
            deployed_gflops, _ = detector_flops_by_module(deployed, *size)
            rows[(name, size)] = ["not measured", params, gflops, f"{gflops:.2f} ({deployed_gflops:.2f})"]
            graph = os.path.join(tmpdir.name, f"{len(rows)}.onnx")
            if set(runtimes) - {"torch"}:
                export_onnx(copy.deepcopy(model), graph, *size)
            for runtime in runtimes:
                calls[(name, size, runtime)] = (lambda net=net, x=images: net(x)) if runtime == "torch" else \
                    (lambda run=graph_runner(graph, runtime, torch.get_num_threads()), x=array: run(x))
    for name in args.peers:
        size = peer_sizes[name]
        images, array = inputs[size]
        module, exportable = build_peer(name)
        try:
            gflops = flop_count_analysis(module, (images,)).total() / 1e9
        except Exception as e:  # fvcore cannot trace every peer's forward
            gflops = float("nan")
            notes.append(f"{name}: fvcore could not count its FLOPs ({type(e).__name__})")
        rows[(name, size)] = [f"{PEERS[name].ap}", sum(p.numel() for p in module.parameters()) / 1e6, gflops,
                              "-" if np.isnan(gflops) else f"{gflops:.2f}"]
        graph = os.path.join(tmpdir.name, f"{len(rows)}.onnx")
        for runtime in runtimes:
            if runtime == "torch":
                calls[(name, size, runtime)] = lambda module=module, x=images: module(x)
                continue
            if not exportable:
                notes.append(f"{name}: no {runtime} figure (its graph keeps NMS and data-dependent shapes)")
                continue
            if not os.path.exists(graph):
                try:
                    with torch.no_grad():
                        torch.onnx.export(module, (images,), graph, input_names=["images"], opset_version=17, dynamo=False)
                except Exception as e:
                    notes.append(f"{name}: ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    break
            try:
                run = graph_runner(graph, runtime, torch.get_num_threads())
                run(array)
            except Exception as e:
                notes.append(f"{name}: {runtime} cannot run its graph ({type(e).__name__}: {str(e).splitlines()[0][-160:]})")
                continue
            calls[(name, size, runtime)] = lambda run=run, x=array: run(x)
    with tmpdir, torch.no_grad():
        times = time_interleaved(calls, torch.device("cpu"), args.runs, args.warmup)
    medians = {key: 1000 * np.median(t) for key, t in times.items()}
    print(f"\nDetectors at each peer's published input, batch 1, {torch.get_num_threads()} CPU threads, fp32, random "
          f"weights (made distinct), {args.runs} interleaved runs after {args.warmup} warm-up; COCO AP: published")
    for size in sizes:
        reference = next((n for n in args.peers if peer_sizes[n] == size), None)
        table = []
        for (name, at), (ap, params, _, gflops) in rows.items():
            if at != size:
                continue
            ms = [medians.get((name, size, r)) for r in runtimes]
            ratios = [medians.get((name, size, r), np.nan) / medians.get((reference, size, r), np.nan) for r in runtimes]
            table.append([name, ap, f"{params:.2f}", gflops, *("-" if m is None else f"{m:.1f}" for m in ms),
                          *("-" if np.isnan(q) else f"{q:.2f}" for q in ratios)])
        print(f"\n{size[0]}x{size[1]}:")
        print(tabulate(table, ["model", "COCO AP", "params (M)", "GFLOPs", *(f"{r} ms" for r in runtimes),
                               *(f"{r} / {reference}" for r in runtimes)], tablefmt="pipe", disable_numparse=True))
    for note in notes:
        print(f"- {note}")
    if args.plot:
        runtime = "onnxruntime" if "onnxruntime" in runtimes else runtimes[0]
        points = [(name, size, rows[(name, size)][2], medians[(name, size, runtime)], rows[(name, size)][0])
                  for (name, size) in rows if (name, size, runtime) in medians and not np.isnan(rows[(name, size)][2])]
        plot_peers(points, runtime, args.plot)
        print(f"- plot: {args.plot} ({runtime})")


def plot_peers(points, runtime, path):
    """Milliseconds against fvcore GFLOPs, log-log, one colour per input size; MF-DETR's variants at
    one size joined by a line, each peer labelled with its published COCO AP. ``points``: (name,
    (H, W), GFLOPs, ms, published AP or "not measured")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(9, 6))
    sizes = list(dict.fromkeys(size for _, size, *_ in points))
    colors = dict(zip(sizes, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for size in sizes:
        ours = sorted((g, ms, n) for n, s, g, ms, _ in points if s == size and n.startswith("MF-DETR"))
        if ours:
            ax.plot([g for g, *_ in ours], [ms for _, ms, _ in ours], "o-", color=colors[size], markersize=4,
                    label=f"MF-DETR at {size[0]}x{size[1]}")
            for k, (g, ms, n) in enumerate(ours):  # alternately above and below the line
                ax.annotate(n.split()[-1], (g, ms), textcoords="offset points", xytext=(-6, 7 if k % 2 else -11),
                            fontsize=7, color=colors[size])
    peers = sorted(((ms, g, name, size, ap) for name, size, g, ms, ap in points if not name.startswith("MF-DETR")))
    last = 0.0
    for ms, g, name, size, ap in peers:
        ax.plot([g], [ms], "s", color=colors[size], markeredgecolor="black", label=None)
        lift = 9 if ms < last * 1.08 else 0  # a peer just above the previous one: its label higher
        ax.annotate(f"{name} ({ap} AP, {size[0]}x{size[1]})", (g, ms), textcoords="offset points",
                    xytext=(6, -3 + lift), fontsize=7)
        last = ms
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    ax.tick_params(which="minor", labelsize=7)
    ax.set_xlabel("GFLOPs (fvcore: a multiply-add is one; MF-DETR as trained)")
    ax.set_ylabel(f"ms, batch 1, {runtime}, {torch.get_num_threads()} CPU threads")
    ax.set_title("Each peer at its published input, MF-DETR at each of them (random weights: speed only;\n"
                 "AP: the peers' published COCO val2017 figures)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def bench_checks(args, cfg):
    """The cost of the training set's checks before training (missing files, invalid boxes) on a
    listing of ``--images`` images in one folder, with COCO train2017's 7.3 boxes per image."""
    from detectron2.structures import BoxMode

    from mobileformer_det.data import drop_invalid_boxes, drop_missing_images

    rng = np.random.RandomState(0)
    with tempfile.TemporaryDirectory() as folder:
        records = []
        for i in range(args.images):
            path = os.path.join(folder, f"{i:012d}.jpg")
            open(path, "wb").close()
            w, h = rng.randint(200, 641, 2)
            boxes = rng.rand(rng.poisson(7.3), 4) * [w / 2, h / 2, w / 2, h / 2]
            records.append({"file_name": path, "height": int(h), "width": int(w), "image_id": i, "annotations": [
                {"bbox": b.tolist(), "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 0} for b in boxes]})
        rows = []
        for _ in range(args.runs):
            start = time.perf_counter()
            drop_missing_images(records, ["listing"])
            middle = time.perf_counter()
            drop_invalid_boxes(records, ["listing"])
            rows.append((middle - start, time.perf_counter() - middle))
    boxes = sum(len(r["annotations"]) for r in records)
    print(tabulate([[f"missing files ({args.images} images)", f"{np.median([r[0] for r in rows]):.3f}"],
                    [f"invalid boxes ({boxes} boxes)", f"{np.median([r[1] for r in rows]):.3f}"]],
                   ["check", "seconds (median)"], tablefmt="pipe"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, nargs="+", metavar="FILE",
                        help="one config; --task variants takes several (one row each)")
    parser.add_argument("--task", choices=["eval", "train", "data", "checks", "variants", "peers"], default="eval")
    parser.add_argument("--peers", nargs="*", metavar="NAME", help="peers: the detectors beside MF-DETR, each at its "
                        "published input size unless --input-size is given (default: the DEIMv2 and D-FINE models; "
                        "also RT-DETRv2-R18, Deformable DETR-R50, DETR-R50, SSDLite320-MobileNetV3, "
                        "FRCNN-MobileNetV3-FPN; pip install -e '.[bench]')")
    parser.add_argument("--plot", metavar="FILE.png", help="peers: draw milliseconds against GFLOPs into this PNG")
    parser.add_argument("--images", type=int, default=118287, help="checks: images in the listing (COCO train2017's)")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"))
    parser.add_argument("--compare-size", nargs=2, type=int, metavar=("H", "W"),
                        help="input size of the torchvision detector (default: --input-size)")
    parser.add_argument("--runtime", nargs="+", default=["plain", "torch"],
                        choices=["plain", "torch", "compile", "onnxruntime", "openvino", "onnxruntime-unmasked",
                                 "openvino-unmasked", "onnxruntime-int8", "openvino-int8"],
                        help="eval: plain = the model as trained; torch = batch norm folded, channels-last "
                             "backbone; compile = that under torch.compile; onnxruntime / openvino = the ONNX "
                             "export (--onnx, or exported here at --input-size); -unmasked: the graph exported "
                             "without image_sizes; -int8: that graph quantized here, calibrated on random images "
                             "(speed only; tools/export_onnx.py --int8 calibrates on data)")
    parser.add_argument("--onnx", help="an exported graph for the onnxruntime / openvino runtimes")
    parser.add_argument("--breakdown", action="store_true",
                        help="eval: milliseconds and GFLOPs per part (backbone stages, neck, selection, decoder layers ...)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--train-batch", type=int, help="training batch (default SOLVER.IMS_PER_BATCH)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA, bfloat16 on CPU)")
    parser.add_argument("--device", help="override MODEL.DEVICE")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    # nargs="+" also takes KEY VALUE pairs written right after the configs: hand those back to opts.
    n = next((i for i, a in enumerate(args.config_file) if not a.endswith((".yaml", ".yml"))), len(args.config_file))
    if n == 0:
        parser.error(f"--config-file needs a .yaml file, got {args.config_file[0]!r}")
    args.config_file, args.opts = args.config_file[:n], args.config_file[n:] + args.opts
    if args.task in ("variants", "peers") and args.onnx:
        parser.error(f"--task {args.task} exports each variant's graph itself: drop --onnx")
    if args.task == "peers":
        from mobileformer_det.modeling.peers import PEERS

        args.peers = [n for n in PEERS if n.startswith(("DEIMv2", "D-FINE"))] if args.peers is None else args.peers
        unknown = sorted(set(args.peers) - set(PEERS))
        if unknown:
            parser.error(f"--peers: unknown {unknown}; choose among {list(PEERS)}")
    if args.task not in ("variants", "peers") and len(args.config_file) > 1:
        parser.error(f"--task {args.task} takes one --config-file, got {len(args.config_file)}")
    setup_logger(name="fvcore")
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfgs = [setup_cfg(path, args.opts + (["MODEL.DEVICE", args.device] if args.device else []) + ["MODEL.WEIGHTS", ""])
            for path in args.config_file]
    cfg = cfgs[0]
    device = torch.device(cfg.MODEL.DEVICE)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}); torch {torch.__version__}; CPU threads: {torch.get_num_threads()}; "
          f"AMP: {args.amp}; runs: {args.runs} after {args.warmup} warm-up")
    if args.task == "variants":
        bench_variants(args, cfgs)
    elif args.task == "peers":
        bench_peers(args, cfgs)
    elif args.task == "eval" and args.breakdown:
        bench_breakdown(args, cfg)
    else:
        {"eval": bench_eval, "train": bench_train, "data": bench_data, "checks": bench_checks}[args.task](args, cfg)


if __name__ == "__main__":
    main()
