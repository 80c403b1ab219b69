"""Inference outside the training code: batch norm folding, the folded neck and channels-last
memory compute what the plain model computes; the ONNX export passes the checker; ONNX Runtime, OpenVINO and
torch.compile give the demo the same detections as eager PyTorch."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from helpers import ROOT, encode, toy_cfg
from mobileformer_det.deploy import Predictor, TensorDetector, letterbox

TOY_CONFIG = os.path.join(ROOT, "configs", "mf_detr_toy.yaml")
TOY_ROOT = os.path.join(ROOT, "datasets", "toy_coco")
# The exported graphs' size: the toy images' own, 128x160, a multiple of 32, so that eager PyTorch pads
# nothing either and the runtimes can agree to the pixel (the recipe tests at 160x200, which is not).
AT_GRAPH_SIZE = ("INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 160)
# Comparisons of two computations of the network turn the recipe's NMS off: of two duplicates with
# nearly equal scores, float rounding may keep either. The NMS itself is tested on its own.
NO_NMS = ("MODEL.MF_DETR.TEST.NMS_THRESH", 0.0)


def _subset_files(overfit_toy):
    """The four images the toy model was trained on (it detects their shapes with confidence)."""
    return [im["file_name"] for im in json.load(open(overfit_toy["json"]))["images"]]


def _rgb(root, name):
    return np.asarray(Image.open(os.path.join(root, name)).convert("RGB"))


def _with_batch_norm_statistics(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("variant", ["mf52", "mf26", "mf294"])
def test_folded_batch_norm_and_channels_last_compute_the_same_maps(variant):
    model = _with_batch_norm_statistics(build_model(toy_cfg("MODEL.MOBILEFORMER.VARIANT", variant)).eval())
    fast = copy.deepcopy(model).deploy()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.backbone.modules())
    x = torch.randn(2, 3, 128, 160)
    for sizes in (None, torch.tensor([[128, 160], [100, 130]])):          # unpadded, and padded with masks
        with torch.no_grad():
            expected, got = model.backbone(x, sizes), fast.backbone(x, sizes)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-4)
        assert got["res3"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("opts, factored", [
    ((), ["0", "1", "2", "3"]),
    # res4 (64 channels) and res5 (96) are not narrower than a 64-wide memory: their own factors
    (("MODEL.MF_DETR.NUM_FEATURE_LEVELS", 5, "MODEL.MF_DETR.HIDDEN_DIM", 64), ["0", "1"]),
])
def test_folded_neck_gives_every_memory_reader_what_the_neck_gives_it(opts, factored):
    """The value projections and the proposal projection of the factored memory equal those of the
    plain memory, level by level, with and without padding (factored lateral levels, lateral levels
    as wide as the memory, extra levels)."""
    torch.manual_seed(0)
    model = build_model(toy_cfg(*opts)).eval()
    with torch.no_grad():
        for p in model.neck.parameters():   # LayerNorm and biases away from their initial 1 and 0
            p.add_(torch.randn_like(p) * 0.3)
        model.level_embed.normal_()
    folded = copy.deepcopy(model)
    folded.transformer.convert_to_deploy(folded.neck.convert_to_deploy(folded.level_embed))
    assert list(folded.neck.variance) == factored
    x = torch.randn(2, 3, 96, 128)
    readers = [lambda t: t.decoder[i].cross_attn.value_proj for i in range(len(model.transformer.decoder))]
    readers.append(lambda t: t.enc_output[0])
    for sizes in (None, torch.tensor([[96, 128], [70, 100]])):
        with torch.no_grad():
            plain, factored = model.encode(x, sizes), folded.encode(x, sizes)
            shapes = plain["spatial_shapes"]
            assert factored["spatial_shapes"] == shapes
            assert [f.shape[2] for f in factored["memory"]] == [h * w for h, w in shapes]
            for reader in readers:
                expected = reader(model.transformer)(plain["memory"], shapes)
                maps = reader(folded.transformer)(factored["memory"], shapes)     # channels first
                torch.testing.assert_close(reader(folded.transformer)(factored["memory"]),
                                           reader(model.transformer)(plain["memory"]), atol=1e-4, rtol=1e-4)
                for e, m in zip(expected, maps):
                    torch.testing.assert_close(m, e, atol=1e-4, rtol=1e-4)


def test_a_model_prepared_for_inference_refuses_to_train():
    from helpers import make_instances

    model = build_model(toy_cfg()).deploy().train()
    batch = [{"image": torch.zeros(3, 64, 96, dtype=torch.uint8), "instances": make_instances([[4, 4, 40, 40]], [0], (64, 96))}]
    with pytest.raises(RuntimeError, match="prepared for inference"):
        model(batch)


def test_folded_neck_keeps_the_detections(overfit_toy):
    """The trained toy model, plain and prepared for inference (batch norm folded, neck folded,
    channels last): the same detections on one image and on a padded batch of two."""
    from detectron2.checkpoint import DetectionCheckpointer

    model = build_model(toy_cfg(*NO_NMS)).eval()
    DetectionCheckpointer(model).load(overfit_toy["weights"])
    fast = copy.deepcopy(model).deploy()
    assert fast.deployed and fast.neck.variance is not None
    normalised = []
    hook = fast.neck.lateral[0][1].register_forward_hook(lambda *a: normalised.append(1))
    files = _subset_files(overfit_toy)
    images = [torch.from_numpy(_rgb(overfit_toy["image_root"], f).transpose(2, 0, 1).copy()) for f in files[:2]]
    batch = [{"image": images[0]}, {"image": images[1][:, :-24, :-40]}]
    for inputs in (batch[:1], batch):
        with torch.no_grad():
            expected, got = model(inputs), fast(inputs)
        for e, g in zip(expected, got):
            # The detections that count (in the tail, queries with scores equal to 1e-4 may swap).
            n = int((e["instances"].scores > 0.05).sum())
            e, g = e["instances"][:n], g["instances"][:n]
            assert n >= 1 and g.pred_classes.tolist() == e.pred_classes.tolist()
            torch.testing.assert_close(g.scores, e.scores, atol=1e-4, rtol=0)
            torch.testing.assert_close(g.pred_boxes.tensor, e.pred_boxes.tensor, atol=1e-2, rtol=0)
    hook.remove()
    assert not normalised, "the folded model still normalised the memory"


@pytest.mark.parametrize("nms", [0.0, 0.7])
def test_two_stage_box_head_on_the_selected_positions_only(nms):
    """The box head runs on the Q chosen positions (and, with the proposal NMS, once before on its
    4 Q candidates), not on every position; the proposals' shapes stay the same."""
    torch.manual_seed(0)
    model = build_model(toy_cfg("MODEL.MF_DETR.PROPOSALS.NMS_THRESH", nms)).eval()
    transformer = model.transformer
    with torch.no_grad():
        encoded = encode(model, [{"image": torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)}])
        _, proposals = transformer._select_queries(encoded["memory"], encoded["padding_mask"],
                                                   encoded["spatial_shapes"], encoded["valid_ratios"],
                                                   transformer.num_queries)
        calls = []
        hook = transformer.enc_box_head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
        transformer._select_queries(encoded["memory"], None, encoded["spatial_shapes"], encoded["valid_ratios"],
                                    transformer.num_queries)
        hook.remove()
    q, dim = transformer.num_queries, transformer.query_embed.weight.shape[1]
    assert calls == ([torch.Size([1, 4 * q, dim])] if nms else []) + [torch.Size([1, q, dim])]
    assert proposals["pred_boxes"].shape == (1, q, 4)


def test_tensor_detector_equals_the_detectron2_model(overfit_toy):
    cfg = toy_cfg("MODEL.WEIGHTS", overfit_toy["weights"], *NO_NMS)
    from mobileformer_det.deploy import load_model

    model = load_model(cfg)
    image = torch.from_numpy(_rgb(overfit_toy["image_root"], _subset_files(overfit_toy)[0]).transpose(2, 0, 1).copy())
    with torch.no_grad():
        expected = model([{"image": image}])[0]["instances"]
        boxes, scores, labels = TensorDetector(model)(image[None].float())
    keep = scores[0] > model.postprocess.score_thresh
    torch.testing.assert_close(boxes[0][keep], expected.pred_boxes.tensor, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(scores[0][keep], expected.scores)
    assert labels[0][keep].tolist() == expected.pred_classes.tolist()


def test_letterbox_keeps_the_aspect_and_pads_with_the_mean():
    rgb = np.full((100, 50, 3), 7, dtype=np.uint8)
    batch, scale = letterbox(rgb, (128, 160), (1.0, 2.0, 3.0))
    assert batch.shape == (1, 3, 128, 160) and scale == pytest.approx(1.28)
    assert (batch[0, :, :128, :64] == 7).all()
    assert (batch[0, 0, :, 64:] == 1.0).all() and (batch[0, 2, :, 64:] == 3.0).all()


def _tool(name, *args, timeout=600):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def exported_toy(overfit_toy, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("onnx") / "toy.onnx")
    log = _tool("export_onnx.py", "--config-file", TOY_CONFIG, "--output", path, "--input-size", 128, 160,
                "--dynamic-batch", "--opts", "MODEL.WEIGHTS", overfit_toy["weights"])
    assert "onnx.checker passed" in log and "labels equal: True" in log
    return path


def _demo_detections(out_dir, names):
    return {n: json.load(open(os.path.join(out_dir, n + ".json")))["detections"] for n in names}


@pytest.mark.slow
def test_runtimes_give_the_demo_the_same_detections(overfit_toy, exported_toy, tmp_path):
    images = _subset_files(overfit_toy)
    inputs = [os.path.join(overfit_toy["image_root"], f) for f in images]
    names = [os.path.splitext(f)[0] for f in images]
    results = {}
    for runtime in ("torch", "onnxruntime", "openvino"):
        out = tmp_path / runtime
        _tool("demo.py", "--config-file", TOY_CONFIG, "--input", *inputs, "--output", out,
              "--confidence-threshold", 0.2, "--runtime", runtime, "--onnx", exported_toy,
              "--opts", "MODEL.WEIGHTS", overfit_toy["weights"], "DATASETS.TOY_ROOT", TOY_ROOT, *AT_GRAPH_SIZE, *NO_NMS)
        results[runtime] = _demo_detections(out, names)
    assert sum(len(d) for d in results["torch"].values()) >= 4
    for runtime in ("onnxruntime", "openvino"):
        for name in names:
            ours, theirs = results["torch"][name], results[runtime][name]
            assert [d["category_id"] for d in theirs] == [d["category_id"] for d in ours], (runtime, name)
            for a, b in zip(ours, theirs):
                assert np.abs(np.array(a["bbox"]) - np.array(b["bbox"])).max() < 0.5
                assert abs(a["score"] - b["score"]) < 1e-3


@pytest.mark.slow
def test_the_demo_applies_nms_after_the_graph(overfit_toy, exported_toy, tmp_path):
    """ONNX Runtime through the demo, all detections kept: with TEST_NMS_THRESH 0.3 no two boxes of a
    class overlap by more than 0.3 IoU; with it off, some do (this model has no duplicates above 0.7)."""
    from torchvision.ops import box_iou

    inputs = [os.path.join(overfit_toy["image_root"], f) for f in _subset_files(overfit_toy)]
    overlapping = {}
    for nms in (0.3, 0.0):
        out = tmp_path / str(nms)
        _tool("demo.py", "--config-file", TOY_CONFIG, "--input", *inputs, "--output", out, "--confidence-threshold", 0.0,
              "--runtime", "onnxruntime", "--onnx", exported_toy, "--opts", "MODEL.WEIGHTS", overfit_toy["weights"],
              "DATASETS.TOY_ROOT", TOY_ROOT, "MODEL.MF_DETR.TEST.NMS_THRESH", nms)
        pairs = 0
        for detections in _demo_detections(out, [os.path.splitext(os.path.basename(f))[0] for f in inputs]).values():
            boxes = torch.tensor([d["bbox"] for d in detections], dtype=torch.float64).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]                                                     # xywh -> xyxy
            labels = torch.tensor([d["category_id"] for d in detections])
            same = (labels[:, None] == labels[None]) & ~torch.eye(len(labels), dtype=torch.bool)
            pairs += int(((box_iou(boxes, boxes) > 0.3) & same).sum())
        overlapping[nms] = pairs
    assert overlapping[0.3] == 0 and overlapping[0.0] > 0, overlapping


def test_onnx_runtime_with_a_batch_equals_pytorch(overfit_toy, exported_toy):
    import onnxruntime as ort

    from mobileformer_det.deploy import load_model

    model = load_model(toy_cfg("MODEL.WEIGHTS", overfit_toy["weights"]))
    images = torch.stack([torch.from_numpy(_rgb(overfit_toy["image_root"], f).transpose(2, 0, 1).copy())
                          for f in _subset_files(overfit_toy)[:3]]).float()
    with torch.no_grad():
        expected = TensorDetector(model)(images)
    got = ort.InferenceSession(exported_toy, providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})
    confident = expected[1] > 0.2
    assert confident.sum() >= 3
    np.testing.assert_allclose(got[0][confident.numpy()], expected[0][confident].numpy(), atol=0.5)
    np.testing.assert_allclose(got[1][confident.numpy()], expected[1][confident].numpy(), atol=1e-3)
    assert (got[2][confident.numpy()] == expected[2][confident].numpy()).all()


def test_evaluation_the_predictor_and_the_graph_post_process_alike(overfit_toy, exported_toy, monkeypatch):
    """The three inference paths (the Detectron2 model as evaluation runs it, ``Predictor`` with
    PyTorch, ``Predictor`` with the exported graph in ONNX Runtime) each run ``PostProcess``'s two
    steps once per image (the graph's first step is inside it), and give the same detections with
    the recipe's score threshold and NMS on."""
    from mobileformer_det.deploy import load_model
    from mobileformer_det.modeling.detr.postprocess import PostProcess

    calls = []
    for step in ("forward", "select"):
        original = getattr(PostProcess, step)
        monkeypatch.setattr(PostProcess, step, lambda self, *a, _f=original, _s=step: calls.append(_s) or _f(self, *a))
    cfg = toy_cfg("MODEL.WEIGHTS", overfit_toy["weights"], *AT_GRAPH_SIZE, "MODEL.MF_DETR.TEST.SCORE_THRESH", 0.2,
                  "MODEL.MF_DETR.TEST.NMS_THRESH", 0.7)
    rgb = _rgb(overfit_toy["image_root"], _subset_files(overfit_toy)[0])
    with torch.no_grad():
        evaluated = load_model(cfg)([{"image": torch.from_numpy(rgb.transpose(2, 0, 1).copy())}])[0]["instances"]
    assert calls == ["forward", "select"]
    results = {"evaluation": evaluated}
    for runtime in ("torch", "onnxruntime"):
        calls.clear()
        results[runtime] = Predictor(cfg, runtime, onnx_path=exported_toy)(rgb)
        assert calls == (["forward", "select"] if runtime == "torch" else ["select"]), runtime
    assert len(evaluated) >= 1 and evaluated.scores.min() > 0.2
    for name, result in results.items():
        assert result.pred_classes.tolist() == evaluated.pred_classes.tolist(), name
        torch.testing.assert_close(result.scores, evaluated.scores, atol=1e-3, rtol=0)
        torch.testing.assert_close(result.pred_boxes.tensor, evaluated.pred_boxes.tensor, atol=0.5, rtol=0)


@pytest.mark.slow
def test_compiled_runtime_equals_eager(overfit_toy):
    cfg = toy_cfg("MODEL.WEIGHTS", overfit_toy["weights"], *AT_GRAPH_SIZE, *NO_NMS)
    rgb = _rgb(overfit_toy["image_root"], _subset_files(overfit_toy)[0])
    eager = Predictor(cfg, "torch")(rgb)
    compiled = Predictor(cfg, "compile", input_size=(128, 160))(rgb)
    keep = eager.scores > 0.2
    assert keep.sum() >= 1
    torch.testing.assert_close(compiled.pred_boxes.tensor[: keep.sum()], eager.pred_boxes.tensor[keep], atol=0.5, rtol=0)
    torch.testing.assert_close(compiled.scores[: keep.sum()], eager.scores[keep], atol=1e-3, rtol=0)
    assert compiled.pred_classes[: keep.sum()].tolist() == eager.pred_classes[keep].tolist()


@pytest.mark.slow
def test_benchmark_models_do_not_let_onnxruntime_merge_the_decoder_layers(tmp_path):
    """A freshly built detector's decoder layers are copies of one layer, and ONNX Runtime merges
    equal computations: their value projections of the same memory would run once, as no trained
    model's would. The benchmark's models keep one value projection per layer in the optimised graph."""
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from benchmark import build_eval_model

    from mobileformer_det.deploy import export_onnx

    cfg = toy_cfg()
    counts = {}
    for name, model in (("fresh", build_model(cfg).eval()), ("benchmark", build_eval_model(cfg))):
        path = export_onnx(model, str(tmp_path / f"{name}.onnx"), 64, 96)
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}_optimised.onnx")
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        nodes = onnx.load(options.optimized_model_filepath).graph.node
        counts[name] = sum("value_proj" in n.name and n.op_type in ("MatMul", "Gemm", "FusedMatMul") for n in nodes)
    levels = cfg.MODEL.MF_DETR.NUM_FEATURE_LEVELS  # the folded neck: one product per level and layer
    assert counts == {"fresh": levels, "benchmark": levels * cfg.MODEL.MF_DETR.DECODER.NUM_LAYERS}, counts
