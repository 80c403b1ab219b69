"""Mobile-Former in Detectron2's own detectors: the FPN builders, RetinaNet and Faster R-CNN."""
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from helpers import ROOT

from mobileformer_det import setup_cfg
from mobileformer_det.checkpoint import MobileFormerCheckpointer, convert_official_state_dict
from mobileformer_det.modeling.backbone import MobileFormer

RETINANET = os.path.join(ROOT, "configs", "retinanet_mf52_fpn_toy.yaml")
FASTER_RCNN = os.path.join(ROOT, "configs", "faster_rcnn_mf52_fpn_toy.yaml")
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")


def _model(config, *opts):
    torch.manual_seed(0)
    return build_model(setup_cfg(config, list(opts)))


@pytest.mark.parametrize("config, levels", [(RETINANET, ["p3", "p4", "p5", "p6", "p7"]),
                                            (FASTER_RCNN, ["p2", "p3", "p4", "p5", "p6"])])
def test_fpn_levels_as_detectron2_builds_them_for_resnet(config, levels):
    """p3-p7 (P6 and P7 from res5) for RetinaNet, p2-p6 (P6 max-pooled) for Faster R-CNN, each as
    ``output_shape()`` says; Mobile-Former inside as the FPN's bottom-up network, without tokens;
    every parameter gets a gradient from the detector's losses (what DistributedDataParallel needs)."""
    model = _model(config)
    backbone = model.backbone
    assert isinstance(backbone.bottom_up, MobileFormer) and backbone.bottom_up.final_mobile_to_former is None
    shapes = backbone.output_shape()
    assert list(shapes) == levels and backbone.size_divisibility == 32  # its coarsest input, as for ResNet
    x = torch.randn(2, 3, 128, 256)
    features = backbone(x)
    assert list(features) == levels
    for name, f in features.items():
        assert f.shape == (2, shapes[name].channels, 128 // shapes[name].stride, 256 // shapes[name].stride)
    model.train()
    image = {"image": torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8).float(), "height": 128, "width": 160}
    image["instances"] = Instances((128, 160), gt_boxes=Boxes(torch.tensor([[10.0, 20.0, 60.0, 70.0], [80, 30, 150, 120]])),
                                   gt_classes=torch.tensor([0, 3]))
    from detectron2.utils.events import EventStorage

    with EventStorage():
        losses = model([image, image])
    sum(losses.values()).backward()
    without = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not without, without


def test_fpn_reads_only_maps_the_backbone_gives():
    with pytest.raises(ValueError, match=r"MODEL.FPN.IN_FEATURES .* reads \['res2'\].*add them to MODEL.MOBILEFORMER.OUT_FEATURES"):
        _model(FASTER_RCNN, "MODEL.MOBILEFORMER.OUT_FEATURES", "['res3', 'res4', 'res5']")


def test_converted_imagenet_weights_load_under_the_fpn(tmp_path):
    """The converter's output (``backbone.*`` and the classifier's ``head.*``) loads into the FPN's
    bottom-up Mobile-Former, as Detectron2's ImageNet ResNet loads under its FPN; the final bridge,
    which these detectors do not build, is the only part of it left out."""
    from helpers import synthetic_official_state_dict

    state = convert_official_state_dict(synthetic_official_state_dict("mf26"), "mf26")
    torch.save({"model": state, "mobileformer_variant": "mf26"}, tmp_path / "mf26_d2.pth")
    model = _model(RETINANET, "MODEL.MOBILEFORMER.VARIANT", "mf26")
    MobileFormerCheckpointer(model, variant="mf26").load(str(tmp_path / "mf26_d2.pth"))
    loaded = model.backbone.bottom_up.state_dict()
    backbone_keys = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    left_out = {k for k in backbone_keys if k not in loaded}
    assert left_out and all(k.startswith("final_mobile_to_former.") for k in left_out)
    for k, v in loaded.items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(v, backbone_keys[k], msg=k)


def test_class_count_is_read_from_the_detectors_own_key(tmp_path):
    """The trainer checks the dataset's classes against MODEL.RETINANET.NUM_CLASSES for a RetinaNet
    (MODEL.ROI_HEADS.NUM_CLASSES for Faster R-CNN), not MF-DETR's key."""
    from mobileformer_det.config import num_classes

    assert num_classes(setup_cfg(RETINANET)) == (4, "MODEL.RETINANET.NUM_CLASSES")
    assert num_classes(setup_cfg(FASTER_RCNN)) == (4, "MODEL.ROI_HEADS.NUM_CLASSES")
    result = subprocess.run([sys.executable, TRAIN_NET, "--config-file", RETINANET, "MODEL.RETINANET.NUM_CLASSES", "3",
                             "OUTPUT_DIR", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "MODEL.RETINANET.NUM_CLASSES is 3, but dataset 'toy_coco_train' has 4 categories" in result.stderr + result.stdout


def _run(args, timeout=600):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _small_val(tmp_path):
    from mobileformer_det.data import ensure_toy_dataset

    root = ensure_toy_dataset(os.path.join(ROOT, "datasets", "toy_coco"))
    val = json.load(open(os.path.join(root, "val.json")))
    few = {im["id"] for im in val["images"][:6]}
    (tmp_path / "val6.json").write_text(json.dumps({
        "images": [im for im in val["images"] if im["id"] in few], "categories": val["categories"],
        "annotations": [a for a in val["annotations"] if a["image_id"] in few]}))
    return ["DATASETS.COCO_FORMAT", f"[('toy_val6', '{tmp_path / 'val6.json'}', '{os.path.join(root, 'val')}')]",
            "DATASETS.TEST", "('toy_val6',)"], os.path.join(root, "val")


@pytest.mark.slow
@pytest.mark.parametrize("config", [RETINANET, FASTER_RCNN])
def test_train_resume_eval_only_and_demo_through_the_command_line(tmp_path, config):
    """``train_net.py --num-gpus 2`` trains the detector in two processes (gloo) to equal weights,
    ``--resume`` goes on from its checkpoint in one, ``--eval-only`` evaluates the final weights to
    the figure training ended with, and ``demo.py`` draws their detections."""
    data, images = _small_val(tmp_path)
    out = tmp_path / "out"
    common = ["--config-file", config, *data, "SOLVER.IMS_PER_BATCH", 2, "INPUT.MIN_SIZE_TRAIN", "(96,)",
              "DATALOADER.NUM_WORKERS", 0, "SOLVER.CHECKPOINT_PERIOD", 3, "OUTPUT_DIR", out]
    log = _run([TRAIN_NET, "--num-gpus", 2, *common, "SOLVER.MAX_ITER", 3, "TEST.EVAL_PERIOD", 0])
    assert "weights identical on all 2 processes" in log, log[-3000:]
    log = _run([TRAIN_NET, "--resume", *common, "SOLVER.MAX_ITER", 6, "TEST.EVAL_PERIOD", 6])
    assert "Starting training from iteration 3" in log
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 5
    again = _run([TRAIN_NET, "--eval-only", *common, "MODEL.WEIGHTS", out / "model_final.pth"])
    trained, evaluated = (next(line for line in text.splitlines()[::-1] if "copypaste: " in line and "AP," not in line)
                          for text in (log, again))
    assert trained.split("copypaste: ")[1] == evaluated.split("copypaste: ")[1]

    image = sorted(os.listdir(images))[0]
    _run([os.path.join(ROOT, "tools", "demo.py"), "--config-file", config, "--input", os.path.join(images, image),
          "--output", tmp_path / "demo", "--confidence-threshold", "0.0", "--opts", *data,
          "MODEL.WEIGHTS", out / "model_final.pth"])
    drawn = os.listdir(tmp_path / "demo")
    assert any(name.endswith(".jpg") or name.endswith(".png") for name in drawn), drawn


def test_analyze_model_splits_the_flops_of_detectron2_detectors():
    """``analyze_model.py --tasks flop`` on Faster R-CNN: Mobile-Former, the FPN, the RPN and the box
    head, which add up to the total."""
    text = _run([os.path.join(ROOT, "tools", "analyze_model.py"), "--config-file", FASTER_RCNN, "--tasks", "flop"])
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in text.splitlines()
            if line.startswith("| ") and "GFLOPs" not in line}
    assert list(rows) == ["backbone", "fpn", "proposal_generator", "roi_heads", "total"], rows
    assert all(v > 0 for v in rows.values())
    assert sum(rows.values()) - rows["total"] == pytest.approx(rows["total"], abs=0.003)


def test_faster_rcnn_exports_through_detectron2s_tracing(tmp_path):
    """Detectron2's own exporter (``TracingAdapter``, as its ``export_model.py --export-method
    tracing``) writes Faster R-CNN on Mobile-Former as ONNX at a fixed size, and ONNX Runtime
    computes the detections PyTorch computes."""
    import numpy as np
    import onnxruntime as ort
    from detectron2.export import TracingAdapter

    model = _model(FASTER_RCNN).eval()
    image = torch.randint(0, 255, (3, 128, 160)).float()

    def inference(model, inputs):
        return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]

    adapter = TracingAdapter(model, [{"image": image}], inference).eval()
    with torch.no_grad():
        torch.onnx.export(adapter, (image,), str(tmp_path / "frcnn.onnx"), opset_version=17, dynamo=False)
        expected = [t.numpy() for t in adapter(image)]
    session = ort.InferenceSession(str(tmp_path / "frcnn.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    assert len(expected[0]) > 10
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_export_onnx_names_the_exporter_for_detectron2_detectors(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_onnx.py"), "--config-file", RETINANET,
                             "--output", str(tmp_path / "m.onnx")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "exports MF-DETR only" in result.stderr and "TracingAdapter" in result.stderr
    assert not os.path.exists(tmp_path / "m.onnx")
