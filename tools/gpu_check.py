#!/usr/bin/env python
"""Prove the CUDA paths on a GPU machine in one prepared run, and rehearse that run on the CPU.

    python tools/gpu_check.py --prepare                       # here: the wheels the GPU machine lacks -> .whl/
    python tools/gpu_check.py --output gpu_check/             # on the GPU machine: install offline, every step
    python tools/gpu_check.py --dry-run --output out/         # the same steps on the CPU at toy sizes (make test)

``--prepare`` downloads, for CPython 3.12 on manylinux x86-64, every package this project and
Detectron2 import that a bare GPU machine with PyTorch lacks (detectron2 itself re-tagged as
``tools/install_detectron2.py`` does, fvcore, iopath, yacs, pycocotools, omegaconf, hydra-core,
antlr4, termcolor), at the versions this environment runs, never torch or torchvision (the
machine keeps its own CUDA build). Packages published as source only are built into pure-Python
wheels here. It then installs the set into a scratch folder as pip would for Python 3.12
(``--no-index``) to prove that it is complete, and prints the folder's size: it travels beside the
working tree, 64 MiB in all.

The check runs these steps, each timed, its output in ``<output>/<step>.log``; a failing step is
recorded and the next one runs; ``<output>/summary.md`` is rewritten after every step, so that a
run stopped from outside still leaves its table:

1. install: the wheels of ``.whl/`` with ``pip install --no-index --no-deps --target <output>/site``,
   unless those packages already import;
2. environment: torch, CUDA, the GPU;
3. cuda tests: ``pytest -m cuda tests`` (AMP float16 step vs float32, fused AdamW with clipping on
   unscaled gradients, padding invariance and the prepared model on CUDA, torch.compile, ONNX
   Runtime's CUDA provider where there is one);
4. train: ``tools/train_net.py --config-file configs/mf_detr.yaml`` with its own settings (AMP,
   FrozenBN from ImageNet-layout weights, denoising, the DETR crop, the COCO training sizes) at 2
   images per GPU for ``--iters`` iterations on a COCO-like set made here;
5. eval: the same command with ``--eval-only`` on the model it wrote;
6. benchmarks: ``tools/benchmark.py --task train --amp`` and ``--task eval`` in float32 and float16,
   batch 1 and 8, for mf508 and mf26 at 800x1344 and 640x640 (images/s, ms/image, peak memory).

``--dry-run`` runs the same steps on the CPU with tiny images, few iterations, one benchmark size,
batch 1 and float32 evaluation (the AMP flag is walked by the training benchmark), so that the day
this runs on a GPU it fails only for GPU reasons.
"""
import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELHOUSE = os.path.join(ROOT, ".whl")
# What a GPU machine with PyTorch lacks (its torch, torchvision, numpy, scipy, OpenCV, Pillow, pytest,
# PyYAML, tabulate, tqdm, matplotlib, tensorboard, cloudpickle, portalocker, onnx stay as they are).
MISSING_THERE = ["fvcore", "iopath", "yacs", "pycocotools", "omegaconf", "hydra-core", "antlr4-python3-runtime", "termcolor"]
IMPORTS = ["detectron2", "fvcore", "iopath", "yacs", "pycocotools", "omegaconf", "hydra", "termcolor"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
TRAVEL_LIMIT_MIB = 64


def _pip(*args):
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True)


def prepare(folder):
    """Fill ``folder`` with the cp312 manylinux wheels of :data:`MISSING_THERE` and detectron2; prove
    that they install for Python 3.12 without an index; print the size. Returns an exit code."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from install_detectron2 import WHEEL_REQUIREMENT, retag_wheel

    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    for name in MISSING_THERE:
        spec = f"{name}=={importlib.metadata.version(name)}"
        got = _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                   *platform_args, "-d", folder, spec)
        if got.returncode != 0:  # published as source only: build its (pure-Python) wheel here
            got = _pip("wheel", "--no-deps", "-w", folder, spec)
            if got.returncode != 0:
                print(f"error: no wheel for {spec}:\n{got.stdout[-1500:]}{got.stderr[-1500:]}", file=sys.stderr)
                return 1
    with tempfile.TemporaryDirectory() as tmp:
        got = _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.10", "-d", tmp, WHEEL_REQUIREMENT)
        if got.returncode != 0:
            print(f"error: could not download {WHEEL_REQUIREMENT}: {got.stderr[-1500:]}", file=sys.stderr)
            return 1
        retag_wheel(os.path.join(tmp, next(f for f in os.listdir(tmp) if f.endswith(".whl"))), folder)
    wheels = sorted(f for f in os.listdir(folder) if f.endswith(".whl"))
    not_pure = [w for w in wheels if not w.endswith("-none-any.whl") and "cp312" not in w]
    if not_pure:
        print(f"error: wheels built for another Python than 3.12: {not_pure}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as target:   # what the GPU machine will do, for Python 3.12
        got = _pip("install", "--no-index", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                   "--implementation", "cp", *platform_args, "--target", target, *[os.path.join(folder, w) for w in wheels])
        if got.returncode != 0:
            print(f"error: the wheels do not install for Python 3.12: {got.stderr[-2000:]}", file=sys.stderr)
            return 1
    size = sum(os.path.getsize(os.path.join(folder, w)) for w in wheels) / 2 ** 20
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout.split("\0")
    paths = [os.path.join(ROOT, f) for f in tracked if f]
    tree = sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) / 2 ** 20
    print(f"{len(wheels)} wheels in {folder}: {size:.1f} MiB; with the tracked working tree ({tree:.1f} MiB): "
          f"{size + tree:.1f} MiB of the {TRAVEL_LIMIT_MIB} MiB that travel to the GPU machine")
    for w in wheels:
        print("  ", w)
    return 0 if size + tree <= TRAVEL_LIMIT_MIB else 1


def _imports_missing(env):
    probe = ("import importlib, sys\n"
             "for m in sys.argv[1:]:\n    try: importlib.import_module(m)\n    except Exception: print(m)")
    out = subprocess.run([sys.executable, "-c", probe, *IMPORTS], capture_output=True, text=True, env=env)
    return out.stdout.split()


def steps(args, out):
    """[(name, argv or None, timeout seconds)] of the check; None: done in this process (install)."""
    py = sys.executable
    dry = args.dry_run
    data = os.path.join(out, "data")
    size = (160, 120) if dry else (640, 480)
    make_data = (
        "import sys; from mobileformer_det.data.coco_like import make_coco_like, write_imagenet_like_weights as w; "
        f"make_coco_like({data!r}, 'train', {8 if dry else 200}, 0, size={size}); "
        f"make_coco_like({data!r}, 'val', {4 if dry else 20}, 1, size={size}); "
        f"w('mf508', {os.path.join(data, 'mf508_imagenet.pth')!r})")
    datasets = (f"[['gc_train', '{data}/train.json', '{data}/train'], "
                f"['gc_val', '{data}/val.json', '{data}/val']]")
    recipe = [os.path.join(ROOT, "tools", "train_net.py"), "--config-file", os.path.join(ROOT, "configs", "mf_detr.yaml")]
    common = ["DATASETS.COCO_FORMAT", datasets, "DATASETS.TRAIN", "('gc_train',)", "DATASETS.TEST", "('gc_val',)",
              "MODEL.MF_DETR.NUM_CLASSES", "3", "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", os.path.join(out, "train")]
    if dry:
        common += ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", "(96, 128)", "INPUT.MAX_SIZE_TRAIN", "192",
                   "INPUT.DETR_CROP.RESIZE_SHORT", "(96, 128)", "INPUT.DETR_CROP.SIZE", "(64, 96)",
                   "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192", "DATALOADER.NUM_WORKERS", "0"]
    iters = args.iters or (4 if dry else 300)
    train = recipe + common + ["MODEL.WEIGHTS", os.path.join(data, "mf508_imagenet.pth"), "SOLVER.MAX_ITER", str(iters),
                               "SOLVER.STEPS", f"({max(1, iters * 4 // 5)},)", "SOLVER.CHECKPOINT_PERIOD", str(iters),
                               "TEST.EVAL_PERIOD", "0"]
    evaluate = [*recipe[:1], "--eval-only", *recipe[1:], *common,
                "MODEL.WEIGHTS", os.path.join(out, "train", "model_final.pth")]
    result = [
        ("install", None, 300),
        ("environment", [py, "-c", "import torch, detectron2; print('torch', torch.__version__, '| CUDA', "
                                   "torch.version.cuda, '| available', torch.cuda.is_available(), '| device', "
                                   "torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', "
                                   "'| detectron2', detectron2.__version__)"], 60),
        ("cuda tests", [py, "-m", "pytest", os.path.join(ROOT, "tests", "test_devices.py"), "-m", "cuda", "-v", "-rs"], 600),
        ("data", [py, "-c", make_data], 300),
        ("train", [py, *train], 900),
        ("eval", [py, *evaluate], 600),
    ]
    bench = [py, os.path.join(ROOT, "tools", "benchmark.py")]
    variants = ["mf_detr_26m.yaml"] if dry else ["mf_detr.yaml", "mf_detr_26m.yaml"]
    sizes = [(64, 96)] if dry else [(800, 1344), (640, 640)]
    timing = ["--runs", "1", "--warmup", "0"] if dry else ["--runs", "20", "--warmup", "5"]
    device = ["--device", "cpu"] if dry else []
    for config in variants:
        for h, w in sizes:
            name = f"{config[:-5]} {h}x{w}"
            cfg = ["--config-file", os.path.join(ROOT, "configs", config), "--input-size", str(h), str(w), *timing, *device]
            result.append((f"bench train AMP {name}", [*bench, *cfg, "--task", "train", "--amp", "--train-batch", "2"], 600))
            for precision in ("fp32",) if dry else ("fp32", "fp16"):  # float16 is CUDA's: on the CPU --amp is bfloat16
                amp = ["--amp"] if precision == "fp16" else []
                batches = ["1"] if dry else ["1", "8"]
                result.append((f"bench eval {precision} {name}", [*bench, *cfg, "--task", "eval", "--runtime", "plain",
                                                                  "torch", "--batch-sizes", *batches, *amp], 600))
    return result


def _figures(log_path):
    """The lines of a step's log worth reading in the summary: tables, COCO AP, training speed, pytest's count."""
    keep = []
    for line in open(log_path, errors="replace"):
        line = line.rstrip()
        if line.startswith("|") or "Overall training speed" in line or (" passed" in line or " skipped" in line) and \
                line.startswith("="):
            keep.append(line)
        elif "copypaste: " in line and "Task:" not in line:
            keep.append(line.split("copypaste: ", 1)[1])
    return keep


def _write_summary(out, rows, started):
    lines = ["| step | result | seconds |", "|---|---|--:|"]
    lines += [f"| {name} | {status} | {seconds:.1f} |" for name, status, seconds, _ in rows]
    lines.append(f"\n{sum(1 for r in rows if r[1].startswith('ok'))} of {len(rows)} steps ok, "
                 f"{time.time() - started:.0f} s in all; each step's output is in <step>.log beside this file.")
    for name, _, _, figures in rows:
        if figures:
            lines += ["", f"## {name}", "", *figures]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _log_name(name):
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) + ".log"


def check(args):
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    started, rows = time.time(), []
    for name, argv, timeout in steps(args, out):
        start = time.time()
        log_path = os.path.join(out, _log_name(name))
        with open(log_path, "w") as log:
            if argv is None:
                status = _install(out, env, log)
            else:
                log.write("+ " + " ".join(argv) + "\n")
                log.flush()
                try:
                    code = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          timeout=timeout).returncode
                    status = "ok" if code == 0 else f"FAILED (exit {code})"
                except subprocess.TimeoutExpired:
                    status = f"FAILED (over {timeout} s)"
        rows.append((name, status, time.time() - start, _figures(log_path)))
        print(f"[gpu_check] {name}: {status} in {rows[-1][2]:.1f} s ({log_path})", flush=True)
        _write_summary(out, rows, started)
    print(open(os.path.join(out, "summary.md")).read())
    return 0 if all(row[1].startswith("ok") for row in rows) else 1


def _install(out, env, log):
    """Step 1: install the wheelhouse into ``<out>/site`` (put first on ``env``'s PYTHONPATH) when
    the packages do not import yet. Returns the step's status."""
    missing = _imports_missing(env)
    if not missing:
        log.write(f"{', '.join(IMPORTS)} already import: nothing to install\n")
        return "ok (already installed)"
    wheels = sorted(os.path.join(WHEELHOUSE, w) for w in os.listdir(WHEELHOUSE)) if os.path.isdir(WHEELHOUSE) else []
    if not wheels:
        log.write(f"missing {missing} and no wheels in {WHEELHOUSE}: run tools/gpu_check.py --prepare first\n")
        return f"FAILED (no wheelhouse; missing {', '.join(missing)})"
    site = os.path.join(out, "site")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", site,
           *wheels]
    log.write("+ " + " ".join(cmd) + "\n")
    log.flush()
    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    env["PYTHONPATH"] = os.pathsep.join([site, env["PYTHONPATH"]])
    still = _imports_missing(env)
    if code or still:
        return f"FAILED (pip exit {code}; still missing: {', '.join(still) or 'none'})"
    return f"ok ({len(wheels)} wheels)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true", help=f"download the wheels the GPU machine lacks into {WHEELHOUSE}")
    mode.add_argument("--dry-run", action="store_true", help="the check's steps on the CPU at toy sizes")
    parser.add_argument("--output", help="folder for summary.md and the steps' logs (required unless --prepare)")
    parser.add_argument("--iters", type=int, help="training iterations (default 300; 4 with --dry-run)")
    args = parser.parse_args(argv)
    if args.prepare:
        return prepare(WHEELHOUSE)
    if not args.output:
        parser.error("--output DIR is required (the summary and the logs go there)")
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
