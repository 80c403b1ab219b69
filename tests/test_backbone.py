"""Mobile-Former: the reference's numbers, shapes, gradients, freezing, checkpoints."""
import math
import os
import subprocess
import sys

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone

from helpers import reference_input, synthetic_official_state_dict
from mobileformer_det import setup_cfg
from mobileformer_det.checkpoint import MobileFormerCheckpointer, convert_official_state_dict
from mobileformer_det.modeling import VARIANTS, MobileFormer, mobile_former_classifier
from mobileformer_det.utils.flops import flop_count_analysis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Logits of the authors' implementation (AAboys/MobileFormer, run beside this project) for
# helpers.synthetic_official_state_dict(variant) on helpers.reference_input(): [:, :6], sum.
REFERENCE_LOGITS = {
    "mf294": ([[-1.508702, -0.143999, 2.324766, 1.122948, 0.604326, -0.25722],
               [-1.261047, 0.106227, 2.286185, 0.993244, 0.602684, -0.439982]], -164.54639),
    "mf26": ([[0.673465, -0.530314, -0.59742, 0.396442, 1.206494, -0.442806],
              [0.674641, -0.740262, -0.636324, 0.420675, 1.182543, -0.516413]], -49.72669),
}
# Reference implementation (AAboys/MobileFormer) counted with fvcore at 224x224: params (M), FLOPs (M).
REFERENCE_COUNTS = {
    "mf508": (13.977, 510.6), "mf294": (11.423, 295.4), "mf214": (9.426, 215.3), "mf151": (7.596, 152.0),
    "mf96": (4.585, 96.3), "mf52": (3.469, 51.8), "mf26": (3.233, 26.0),
}


def backbone_cfg(variant="mf294", **overrides):
    cfg = setup_cfg(opts=["MODEL.MOBILEFORMER.VARIANT", variant, "MODEL.BACKBONE.NAME", "build_mobileformer_backbone",
                          "MODEL.MOBILEFORMER.OUT_FEATURES", ["res2", "res3", "res4", "res5"]], freeze=False)
    for key, value in overrides.items():
        setattr(cfg.MODEL.MOBILEFORMER, key, value)
    return cfg


@pytest.mark.parametrize("variant", sorted(REFERENCE_LOGITS))
def test_converted_reference_weights_give_reference_logits(variant):
    model = mobile_former_classifier(variant).eval()
    model.load_state_dict(convert_official_state_dict(synthetic_official_state_dict(variant), variant), strict=True)
    with torch.no_grad():
        logits = model(reference_input())
    head, total = REFERENCE_LOGITS[variant]
    torch.testing.assert_close(logits[:, :6], torch.tensor(head), atol=1e-4, rtol=1e-4)
    assert logits.sum().item() == pytest.approx(total, abs=2e-3)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_params_and_flops_match_reference_table(variant):
    model = mobile_former_classifier(variant).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    flops = flop_count_analysis(model, torch.zeros(1, 3, 224, 224)).total() / 1e6
    ref_params, ref_flops = REFERENCE_COUNTS[variant]
    assert params == pytest.approx(ref_params, rel=0.01)
    assert flops == pytest.approx(ref_flops, rel=0.03)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("size", [(224, 224), (333, 517)])
def test_backbone_shapes_and_strides(variant, size):
    backbone = build_backbone(backbone_cfg(variant), ShapeSpec(channels=3)).eval()
    shapes = backbone.output_shape()
    assert [shapes[f"res{k}"].stride for k in range(2, 6)] == [4, 8, 16, 32]
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, *size))
    for name, spec in shapes.items():
        expected = (2, spec.channels, math.ceil(size[0] / spec.stride), math.ceil(size[1] / spec.stride))
        assert tuple(out[name].shape) == expected, name
    spec = VARIANTS[variant]
    assert tuple(out["tokens"].shape) == (2, spec.num_tokens, spec.token_dim)
    assert (backbone.num_tokens, backbone.token_dim) == (spec.num_tokens, spec.token_dim)


@pytest.mark.parametrize("variant", ["mf26", "mf294"])
def test_gradients_reach_every_parameter(variant):
    # no stochastic depth here: a dropped branch rightly gets no gradient
    torch.manual_seed(0)
    backbone = build_backbone(backbone_cfg(variant), ShapeSpec(channels=3)).train()
    out = backbone(torch.randn(2, 3, 96, 128))
    sum(v.square().mean() for v in out.values()).backward()
    missing = [n for n, p in backbone.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_freeze_at_and_frozen_bn_really_freeze():
    backbone = build_backbone(backbone_cfg("mf52", FREEZE_AT=2, NORM="FrozenBN"), ShapeSpec(channels=3)).train()
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    stages = backbone._stage_of_block
    assert "tokens" in frozen and "stem.weight" in frozen
    for i, stage in enumerate(stages):
        block_params = {n for n, _ in backbone.blocks[i].named_parameters()}
        assert all((f"blocks.{i}.{n}" in frozen) == (stage in ("stem", "res2")) for n in block_params), (i, stage)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    out = backbone(torch.randn(2, 3, 64, 64))
    sum(v.mean() for v in out.values()).backward()
    optimizer.step()
    after = backbone.state_dict()
    for name in before:
        block = name.split(".")[1] if name.startswith("blocks.") else None
        if name.startswith("stem") or name == "tokens" or (block is not None and stages[int(block)] in ("stem", "res2")):
            assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("blocks.11") or n.startswith("blocks.8"))


def test_freeze_at_with_bn_converts_frozen_part_only():
    backbone = build_backbone(backbone_cfg("mf294", FREEZE_AT=1), ShapeSpec(channels=3))
    assert isinstance(backbone.stem.norm, FrozenBatchNorm2d)
    assert isinstance(backbone.blocks[-1].dw.norm, torch.nn.BatchNorm2d)


def test_autocast_bfloat16_close_to_float32():
    model = mobile_former_classifier("mf52").eval()
    x = torch.randn(2, 3, 160, 128)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_converter_accepts_wrapped_and_prefixed_checkpoints():
    raw = synthetic_official_state_dict("mf26")
    plain = convert_official_state_dict(raw, "mf26")
    for wrapped in ({"state_dict": raw}, {"state_dict_ema": {f"module.{k}": v for k, v in raw.items()}, "epoch": 3},
                    {"model": raw}):
        converted = convert_official_state_dict(wrapped, "mf26")
        assert converted.keys() == plain.keys()
    # every reference key is mapped, and the result is exactly the classifier's state_dict
    expected = mobile_former_classifier("mf26").state_dict()
    assert set(plain) == set(expected)
    assert all(plain[k].shape == expected[k].shape for k in plain)


@pytest.mark.parametrize("source,target", [("mf294", "mf508"), ("mf26", "mf52"), ("mf294", "mf26")])
def test_converter_rejects_another_variant(source, target):
    with pytest.raises(ValueError, match=f"not a Mobile-Former {target}"):
        convert_official_state_dict(synthetic_official_state_dict(source), target)


def test_converter_rejects_missing_key():
    raw = synthetic_official_state_dict("mf294")
    del raw["features.3.global_local.k.weight"]
    with pytest.raises(ValueError, match="missing: backbone.blocks.3.former_to_mobile.k.weight"):
        convert_official_state_dict(raw, "mf294")


@pytest.mark.slow
def test_converted_file_loads_into_classifier_and_detector_backbone(tmp_path):
    src, dst = tmp_path / "ref.pth.tar", tmp_path / "mf294_d2.pth"
    torch.save({"state_dict": synthetic_official_state_dict("mf294"), "epoch": 1}, src)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_official_weights.py"), str(src), str(dst),
                    "--variant", "mf294"], check=True, capture_output=True)
    checkpoint = torch.load(dst, weights_only=False)
    classifier = mobile_former_classifier("mf294")
    classifier.load_state_dict(checkpoint["model"], strict=True)

    cfg = backbone_cfg("mf294")
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    holder = torch.nn.Module()
    holder.backbone = backbone
    MobileFormerCheckpointer(holder, variant="mf294").load(str(dst))
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, checkpoint["model"][f"backbone.{key}"]), key

    with pytest.raises(ValueError, match="made for Mobile-Former mf294"):
        other = torch.nn.Module()
        other.backbone = build_backbone(backbone_cfg("mf508"), ShapeSpec(channels=3))
        MobileFormerCheckpointer(other, variant="mf508").load(str(dst))


@pytest.mark.slow
def test_converter_cli_reports_wrong_variant(tmp_path):
    src = tmp_path / "ref.pth.tar"
    torch.save(synthetic_official_state_dict("mf26"), src)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_official_weights.py"), str(src),
                             str(tmp_path / "out.pth"), "--variant", "mf96"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "not a Mobile-Former mf96" in result.stderr
    assert not (tmp_path / "out.pth").exists()


def test_unknown_variant_and_output_are_clear_errors():
    with pytest.raises(ValueError, match="choose one of mf508"):
        build_backbone(backbone_cfg("mf300"), ShapeSpec(channels=3))
    with pytest.raises(ValueError, match="unknown Mobile-Former output"):
        MobileFormer(VARIANTS["mf52"], out_features=("res6",))


def test_mobile_from_former_exports_its_softmax_over_the_tokens_as_the_formula(tmp_path):
    """Mobile<-Former normalises its [N, h, M, HW] scores over the M tokens (axis 2). ONNX Runtime's
    Softmax kernel transposes for a non-last axis, so the export writes the formula instead; the
    graph must still compute the eager bridge (and keep Softmax, where any, on the last axis)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from mobileformer_det.modeling.backbone.bridge import FormerToMobile

    torch.manual_seed(0)
    bridge = FormerToMobile(channels=24, token_dim=32, num_heads=2).eval()
    x, tokens = torch.randn(2, 24, 10, 12), 3 * torch.randn(2, 6, 32)
    path = str(tmp_path / "bridge.onnx")
    torch.onnx.export(bridge, (x, tokens), path, input_names=["x", "tokens"], opset_version=17, dynamo=False)
    graph = onnx.load(path).graph
    axes = [a.i for n in graph.node if n.op_type == "Softmax" for a in n.attribute if a.name == "axis"]
    assert all(axis in (-1, 3) for axis in axes), axes
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy(), "tokens": tokens.numpy()})[0]
    with torch.no_grad():
        expected = bridge(x, tokens).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
