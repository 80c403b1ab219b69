"""The command-line tools: demo, analyze_model, benchmark (smoke runs)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from PIL import Image

from helpers import ROOT, toy_cfg
from mobileformer_det.checkpoint import MobileFormerCheckpointer

TOY_CONFIG = os.path.join(ROOT, "configs", "mf_detr_toy.yaml")


def _tool(name, *args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def toy_weights(tmp_path_factory):
    """A randomly initialised toy detector, saved as a checkpoint (the demo only needs some weights)."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("weights")
    model = build_model(toy_cfg())
    MobileFormerCheckpointer(model, str(out), variant="mf52").save("model")
    return str(out / "model.pth")


@pytest.mark.slow
def test_demo_on_awkward_images(tmp_path, toy_weights):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (120, 150), dtype=np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(rng.randint(0, 255, (100, 90, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "tiny.jpg")
    Image.fromarray(rng.randint(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(folder / "large.jpg", quality=50)
    Image.fromarray(rng.randint(0, 65535, (64, 80), dtype=np.uint16)).save(folder / "deep16.png")
    Image.fromarray(rng.randint(0, 255, (1, 5000, 3), dtype=np.uint8)).save(folder / "thin.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    result = _tool("demo.py", "--config-file", TOY_CONFIG, "--input", folder, "--output", out,
                   "--confidence-threshold", 0.0, "--opts", "MODEL.WEIGHTS", toy_weights, "DATASETS.TOY_ROOT",
                   os.path.join(ROOT, "datasets", "toy_coco"))
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr  # Detectron2's logger writes to stdout
    assert "cannot read" in log and "corrupt.jpg" in log and "skipped" in log
    assert "cannot detect on" in log and "thin.png' (5000x1 pixels)" in log     # skipped; the images after it go on
    good = ["deep16", "gray", "large", "rgba", "tiny"]
    assert sorted(f for f in os.listdir(out)) == sorted([g + ".png" for g in good] + [g + ".json" for g in good])
    large = json.load(open(out / "large.json"))
    assert (large["height"], large["width"]) == (3000, 4000)
    assert Image.open(out / "large.png").size == (2048, 1536)                # drawn at --max-draw-size
    assert max(d["bbox"][0] + d["bbox"][2] for d in large["detections"]) > 2048  # the JSON in the image's pixels

    # the JSON holds exactly what the model detects at that threshold, in the input's pixels
    cfg = toy_cfg("MODEL.WEIGHTS", toy_weights)
    predictor = DefaultPredictor(cfg)
    rgb = np.asarray(Image.open(folder / "gray.png").convert("RGB"))
    expected = predictor(rgb[:, :, ::-1])["instances"]
    detections = json.load(open(out / "gray.json"))["detections"]
    assert len(detections) == len(expected) > 0
    first = expected.pred_boxes.tensor[0].tolist()
    assert detections[0]["bbox"] == pytest.approx([first[0], first[1], first[2] - first[0], first[3] - first[1]], abs=1e-3)
    assert detections[0]["score"] == pytest.approx(expected.scores[0].item(), abs=1e-5)
    assert detections[0]["category"] in ("square", "disk", "triangle", "cross")


@pytest.mark.slow
def test_demo_fails_when_nothing_is_readable(tmp_path, toy_weights):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nothing")
    result = _tool("demo.py", "--config-file", TOY_CONFIG, "--input", bad, "--output", tmp_path / "out",
                   "--opts", "MODEL.WEIGHTS", toy_weights, "DATASETS.TOY_ROOT", os.path.join(ROOT, "datasets", "toy_coco"))
    assert result.returncode == 1 and "bad.png" in result.stdout + result.stderr
    missing = _tool("demo.py", "--config-file", TOY_CONFIG, "--input", bad, "--output", tmp_path / "out",
                    "--opts", "MODEL.WEIGHTS", tmp_path / "none.pth")
    assert missing.returncode == 2 and "does not exist" in missing.stdout + missing.stderr
    too_few = _tool("demo.py", "--config-file", TOY_CONFIG, "--input", bad, "--output", tmp_path / "out",
                    "--opts", "MODEL.WEIGHTS", toy_weights, "MODEL.MF_DETR.NUM_CLASSES", 3,
                    "DATASETS.TOY_ROOT", os.path.join(ROOT, "datasets", "toy_coco"))
    assert too_few.returncode == 2, too_few.stderr[-2000:]
    assert "MODEL.MF_DETR.NUM_CLASSES is 3, but dataset 'toy_coco_val' has 4 categories" in too_few.stdout + too_few.stderr


@pytest.mark.slow
def test_analyze_model_smoke():
    result = _tool("analyze_model.py", "--config-file", TOY_CONFIG, "--tasks", "flop", "parameter", "structure")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| backbone" in result.stdout and "| total" in result.stdout and "MFDETR(" in result.stdout


def test_analyze_model_takes_overrides_right_after_the_tasks():
    """KEY VALUE pairs written after --tasks's list reach the config (argparse's nargs="+" takes
    them as tasks); a misspelt task is named before any work."""
    def neck_gflops(*opts):
        result = _tool("analyze_model.py", "--config-file", TOY_CONFIG, "--tasks", "flop", *opts)
        assert result.returncode == 0, result.stderr[-3000:]
        return float(next(line for line in result.stdout.splitlines() if line.startswith("| neck")).split("|")[2])

    assert neck_gflops("MODEL.MF_DETR.AIFI_LAYERS", 1) > neck_gflops()
    bad = _tool("analyze_model.py", "--config-file", TOY_CONFIG, "--tasks", "flops")
    assert bad.returncode != 0 and "unknown task 'flops'" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["eval", "train", "data", "checks"])
def test_benchmark_smoke(task):
    result = _tool("benchmark.py", "--config-file", TOY_CONFIG, "--task", task, "--runs", 1, "--warmup", 0,
                   "--batch-sizes", 1, "--train-batch", 2, "--input-size", 64, 96, "--images", 50,
                   "DATASETS.TOY_ROOT", os.path.join(ROOT, "datasets", "toy_coco"), "SOLVER.IMS_PER_BATCH", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device: cpu" in result.stdout
    if task == "checks":
        assert "| missing files (50 images)" in result.stdout and "| invalid boxes (" in result.stdout
    if task == "eval":  # the default runtimes and torchvision's detector, each with its ratio to the first
        rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
        assert {"MF-DETR mf52 plain", "MF-DETR mf52 torch", "torchvision FRCNN-MobileNetV3-FPN"} <= set(rows)
        assert "/ plain" in result.stdout and rows["MF-DETR mf52 plain"].rstrip(" |").endswith("1")


@pytest.mark.slow
def test_benchmark_table_of_the_seven_variants():
    result = _tool("benchmark.py", "--config-file", TOY_CONFIG, "--task", "variants", "--runtime", "torch",
                   "--runs", 1, "--warmup", 0, "--input-size", 64, 96)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("| mf")}
    assert list(rows) == ["mf508", "mf294", "mf214", "mf151", "mf96", "mf52", "mf26"]
    assert {r[1] for r in rows.values()} == {"128x3"}  # the toy config's decoder on every backbone
    params = [float(r[2]) for r in rows.values()]
    assert params == sorted(params, reverse=True) and all(float(r[5]) > 0 for r in rows.values())
    assert all(0 < float(r[4]) < float(r[3]) for r in rows.values())  # prepared: batch norm and neck folded


@pytest.mark.slow
def test_benchmark_variants_builds_each_recipe_with_its_own_decoder():
    """Several configs: one row each, with the decoder its recipe sets (the size rule of the configs);
    KEY VALUE pairs written right after the configs are still overrides."""
    configs = [os.path.join(ROOT, "configs", f) for f in ("mf_detr.yaml", "mf_detr_151m.yaml", "mf_detr_26m.yaml")]
    result = _tool("benchmark.py", "--task", "variants", "--runtime", "torch", "--runs", 1, "--warmup", 0,
                   "--input-size", 64, 96, "--config-file", *configs, "MODEL.MF_DETR.NUM_QUERIES", 20)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in result.stdout.splitlines()
            if line.startswith("| mf")]
    assert [r[:3] for r in rows] == [["mf508", "mf_detr.yaml", "256x6"], ["mf151", "mf_detr_151m.yaml", "256x3"],
                                     ["mf26", "mf_detr_26m.yaml", "128x3"]]
    result = _tool("benchmark.py", "--task", "eval", "--config-file", *configs[:2])
    assert result.returncode == 2 and "takes one --config-file, got 2" in result.stderr


@pytest.mark.slow
def test_benchmark_breakdown_lists_every_part():
    """Eager parts timed by hooks; the exported graph's by ONNX Runtime's profile, its nodes found by
    their module scopes (so every stage and layer gets time of its own)."""
    result = _tool("benchmark.py", "--config-file", TOY_CONFIG, "--task", "eval", "--breakdown", "--runs", 2,
                   "--warmup", 1, "--input-size", 64, 96, "--runtime", "plain", "torch", "onnxruntime")
    assert result.returncode == 0, result.stderr[-3000:]
    tables = [[]]
    for line in result.stdout.splitlines():
        if line.startswith("|:"):  # the header's rule
            continue
        if line.startswith("| "):
            tables[-1].append([c.strip() for c in line.split("|")[1:-1]])
        elif tables[-1]:
            tables.append([])
    table, ops = tables[0], tables[1]
    assert table[0][1:6] == ["GFLOPs", "GFLOPs (torch)", "plain ms", "torch ms", "onnxruntime ms"]
    # the profile per operator type: every kernel counted once, so they sum to no more than the run
    assert ops[0] == ["op type", "nodes", "onnxruntime ms", "share"]
    op_rows = {r[0]: r for r in ops[1:]}
    assert int(op_rows["Conv"][1]) > 0 and "TopK" in op_rows and "ReorderInput" in op_rows, result.stdout
    total = float({r[0]: r for r in table[1:]}["total"][5])
    assert 0 < sum(float(r[2]) for r in ops[1:]) <= total * 1.05, result.stdout
    rows = {r[0]: r for r in table[1:]}
    for part in ("backbone stem", "neck", "query selection (two-stage)", "decoder layer 0", "decoder layer 2",
                 "post-processing (top-k, boxes)", "layout reorders (onnxruntime only)", "total"):
        assert part in rows, (part, result.stdout)
    for part in ("backbone res2", "backbone res3", "backbone res4", "backbone res5", "neck", "decoder layer 0",
                 "decoder layer 2", "total"):
        assert float(rows[part][5]) > 0, (part, result.stdout)
    # the folded neck: each decoder layer projects the backbone's narrower maps, not the memory
    for part in ("decoder layer 0", "query selection (two-stage)", "total"):
        assert float(rows[part][2]) < float(rows[part][1]), (part, result.stdout)


@pytest.mark.slow
def test_demo_json_scores_with_cocoeval_against_the_dataset(tmp_path, overfit_toy):
    """The demo's detections carry the dataset's own category ids (the toy json numbers its classes
    from 1): pycocotools scores them against the annotations as COCOEvaluator scores the model."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(overfit_toy["json"])
    files = {im["file_name"]: im["id"] for im in gt.dataset["images"]}
    out = tmp_path / "out"
    result = _tool("demo.py", "--config-file", TOY_CONFIG, "--input",
                   *[os.path.join(overfit_toy["image_root"], f) for f in files], "--output", out,
                   "--confidence-threshold", 0.0, "--opts", "MODEL.WEIGHTS", overfit_toy["weights"],
                   "DATASETS.TOY_ROOT", os.path.join(ROOT, "datasets", "toy_coco"))
    assert result.returncode == 0, result.stderr[-3000:]
    detections = []
    for name, image_id in files.items():
        for d in json.load(open(out / (os.path.splitext(name)[0] + ".json")))["detections"]:
            detections.append({"image_id": image_id, "category_id": d["category_id"], "bbox": d["bbox"], "score": d["score"]})
            assert gt.cats[d["category_id"]]["name"] == d["category"]
    evaluation = COCOeval(gt, gt.loadRes(detections), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    ap50 = 100 * evaluation.stats[1]
    assert ap50 > 80 and ap50 == pytest.approx(overfit_toy["result"]["AP50"], abs=1.0)


@pytest.mark.slow
def test_benchmark_peers_times_each_peer_at_its_input_beside_mf_detr(tmp_path):
    """--task peers: each peer at its published input (DEIMv2-Atto and SSDLite at 320x320, Femto at
    416x416), MF-DETR at both, one table per size with ratios to the size's first peer, and the plot."""
    plot = tmp_path / "peers.png"
    result = _tool("benchmark.py", "--config-file", os.path.join(ROOT, "configs", "mf_detr_26m.yaml"), "--task", "peers",
                   "--peers", "DEIMv2-Atto", "DEIMv2-Femto", "SSDLite320-MobileNetV3", "--runtime", "torch", "onnxruntime",
                   "--runs", 1, "--warmup", 0, "--plot", plot)
    assert result.returncode == 0, result.stderr[-3000:]
    tables = {}
    for line in result.stdout.splitlines():
        if line.endswith("x320:") or line.endswith("x416:"):
            size = line[:-1]
        elif line.startswith("| ") and "---" not in line:
            cells = [c.strip() for c in line.split("|")[1:-1]]
            tables.setdefault(size, {})[cells[0]] = cells[1:]
    assert list(tables) == ["320x320", "416x416"]
    assert list(tables["320x320"]) == ["model", "MF-DETR mf26", "DEIMv2-Atto", "SSDLite320-MobileNetV3"]
    assert list(tables["416x416"]) == ["model", "MF-DETR mf26", "DEIMv2-Femto"]
    assert tables["320x320"]["model"][-1] == "onnxruntime / DEIMv2-Atto"
    assert tables["320x320"]["DEIMv2-Atto"][0] == "23.8" and tables["320x320"]["DEIMv2-Atto"][-2:] == ["1.00", "1.00"]
    assert tables["416x416"]["DEIMv2-Femto"][0] == "31.0" and tables["416x416"]["DEIMv2-Femto"][-2:] == ["1.00", "1.00"]
    assert all(float(v) > 0 for t in tables.values() for v in t["MF-DETR mf26"][3:])  # both runtimes timed, and ratios
    assert tables["320x320"]["SSDLite320-MobileNetV3"][4] == "-" and "keeps NMS" in result.stdout   # eager only
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10000
