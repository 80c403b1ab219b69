"""D-FINE's fine-grained distribution refinement in MF-DETR (``DECODER.BOX_REFINEMENT distribution``):
its bins by hand and against D-FINE as ``transformers`` builds them, its losses against
``transformers``' D-FINE loss, its fresh decoder, and the training and export commands with it."""
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

from helpers import ROOT, encode, toy_cfg
from mobileformer_det.modeling.detr.distribution import (box_to_bins, decoupled_distillation_loss, distance_to_box,
                                                         fine_grained_localization_loss, integral, weighting_function)

FDR = ("MODEL.MF_DETR.DECODER.BOX_REFINEMENT", "distribution")


def test_weighting_function_by_hand_and_as_d_fine_builds_it():
    from transformers.loss.loss_d_fine import weighting_function as d_fine_weighting_function

    # bound = up * scale = 2, step = (2 + 1) ** (2 / (4 - 2)) = 3: inner values +-(3 - 1), ends +-2 * bound
    assert weighting_function(4, 0.5, 4.0).tolist() == [-4.0, -2.0, 0.0, 2.0, 4.0]
    expected = d_fine_weighting_function(32, torch.tensor([0.5]), 4.0)
    torch.testing.assert_close(weighting_function(32, 0.5, 4.0), expected)
    with pytest.raises(ValueError, match="REG_MAX must be an even number"):
        weighting_function(7, 0.5, 4.0)


def test_bins_of_a_box_give_back_the_box():
    """A target spread over its two bins as box_to_bins says has the target distance as its
    expectation: distance_to_box of that expectation is the box (within the bins' range)."""
    g = torch.Generator().manual_seed(0)
    project = weighting_function(32, 0.5, 4.0)
    anchors = torch.cat([torch.rand(50, 2, generator=g) * 0.6 + 0.2, torch.rand(50, 2, generator=g) * 0.3 + 0.1], -1)
    # edges moved by up to +-0.9 of the anchor's size: inside the +-1 the bins reach (2 * up)
    xyxy = torch.cat([anchors[:, :2] - anchors[:, 2:] / 2, anchors[:, :2] + anchors[:, 2:] / 2], -1)
    xyxy = xyxy + (torch.rand(50, 4, generator=g) - 0.5) * 0.9 * anchors[:, 2:].repeat(1, 2)
    boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], -1)
    left, right_weight = box_to_bins(anchors, boxes, project, 4.0)
    probs = torch.zeros(50, 4, 33)
    probs.scatter_(-1, left[..., None], (1 - right_weight)[..., None])
    probs.scatter_add_(-1, left[..., None] + 1, right_weight[..., None])
    torch.testing.assert_close(distance_to_box(anchors, integral(probs.clamp(min=1e-30).log().flatten(1), project), 4.0),
                               boxes, atol=1e-5, rtol=0)
    # the anchor itself is distance 0 on every edge: the middle bin, wholly
    left, right_weight = box_to_bins(anchors, anchors, project, 4.0)
    assert (left + right_weight).sub(16).abs().max() < 1e-4


def test_losses_equal_d_fine_as_transformers_computes_them():
    """FGL and DDF of random distributions, with matches whose targets lie near the boxes (one edge
    beyond the bins' range), equal transformers' DFineLoss.loss_local."""
    from transformers import DFineConfig
    from transformers.loss.loss_d_fine import DFineLoss

    g = torch.Generator().manual_seed(0)
    n, q, k = 2, 7, 3
    project = weighting_function(32, 0.5, 4.0)
    corners = torch.randn(n, q, 4 * 33, generator=g) * 2
    teacher, teacher_logits = torch.randn(n, q, 4 * 33, generator=g) * 2, torch.randn(n, q, k, generator=g)
    anchors = torch.cat([torch.rand(n, q, 2, generator=g) * 0.6 + 0.2, torch.rand(n, q, 2, generator=g) * 0.3 + 0.05], -1)
    boxes = distance_to_box(anchors, integral(corners, project), 4.0)
    indices = [(torch.tensor([4, 0, 2]), torch.tensor([1, 0, 2])), (torch.tensor([6, 3]), torch.tensor([0, 1]))]
    targets = []
    for i, (queries, order) in enumerate(indices):
        near = boxes[i, queries[order.argsort()]] * (1 + 0.15 * torch.randn(len(queries), 4, generator=g))
        targets.append({"boxes": near, "class_labels": torch.zeros(len(queries), dtype=torch.long)})
    targets[0]["boxes"][1, 2] = 0.9
    outputs = {"pred_corners": corners, "ref_points": anchors, "pred_boxes": boxes, "teacher_corners": teacher,
               "teacher_logits": teacher_logits}
    expected = DFineLoss(DFineConfig()).loss_local(outputs, targets, indices, num_boxes=5.0)

    b = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)])
    s = torch.cat([s for s, _ in indices])
    target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
    fgl = fine_grained_localization_loss(corners[b, s], boxes[b, s], anchors[b, s], target_boxes, project, 4.0) / 5.0
    ddf = decoupled_distillation_loss(corners, teacher, teacher_logits, (b, s), boxes[b, s], target_boxes, 5.0)
    assert expected["loss_fgl"] > 0.5 and expected["loss_ddf"] > 0.5
    torch.testing.assert_close(fgl, expected["loss_fgl"])
    torch.testing.assert_close(ddf, expected["loss_ddf"])


def test_fresh_distribution_decoder_places_every_layer_on_the_proposals():
    """Zero-initialised heads: uniform distributions (expectation 0) around anchors that are the
    two-stage proposals themselves; the training losses include the anchors' own set and FGL/DDF."""
    torch.manual_seed(0)
    model = build_model(toy_cfg(*FDR)).eval()
    assert model.transformer.box_heads[0].layers[-1].out_features == 4 * 33
    with torch.no_grad():
        images = torch.randint(0, 256, (2, 3, 128, 160), dtype=torch.uint8)
        encoded = encode(model, [{"image": image} for image in images])
        outputs, enc, distributions = model.transformer(**encoded)
    for _, boxes in outputs:
        torch.testing.assert_close(boxes, enc["pred_boxes"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(distributions["anchors"], enc["pred_boxes"])
    with pytest.raises(ValueError, match="AUX_LOSS True"):
        build_model(toy_cfg(*FDR, "MODEL.MF_DETR.DECODER.AUX_LOSS", False))


@pytest.mark.slow
def test_train_net_and_export_with_distribution_refinement(tmp_path):
    """The documented commands with the key: train_net.py trains (FGL and DDF in its log, finite),
    export_onnx.py writes a graph whose ONNX Runtime detections equal PyTorch's."""
    def run(tool, *args):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *map(str, args)], cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        return result.stdout + result.stderr

    config = os.path.join(ROOT, "configs", "mf_detr_toy.yaml")
    run("train_net.py", "--config-file", config, *FDR, "SOLVER.MAX_ITER", 20, "TEST.EVAL_PERIOD", 0,
        "SOLVER.CHECKPOINT_PERIOD", 100000, "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", tmp_path)
    import json

    last = [row for row in map(json.loads, open(tmp_path / "metrics.json")) if "total_loss" in row][-1]
    assert last["iteration"] == 19 and "loss_fgl" in last and "loss_ddf_0" in last and "loss_bbox_pre" in last, last
    assert all(v == v and abs(v) < 1e4 for v in last.values())
    log = run("export_onnx.py", "--config-file", config, "--output", tmp_path / "fdr.onnx", "--opts",
              *FDR, "MODEL.WEIGHTS", tmp_path / "model_final.pth")
    line = next(x for x in log.splitlines() if "ONNX Runtime vs PyTorch" in x)
    boxes_px, scores = (float(x.split()[0].rstrip(",")) for x in line.split("boxes ")[1].split("scores ")[:2])
    assert boxes_px < 1e-2 and scores < 1e-4 and "labels equal: True" in line, line


def test_flops_count_the_expectation_of_the_distributions():
    """The expectation is a product with a vector, which fvcore's matmul handle rejects: one
    multiply-add per bin and edge; a product of matrices keeps fvcore's count."""
    from mobileformer_det.utils.flops import flop_count_analysis

    class Expectation(torch.nn.Module):
        def forward(self, corners):
            return integral(corners, weighting_function(32, 0.5, 4.0))

    class Product(torch.nn.Module):
        def forward(self, a, b):
            return a @ b

    assert flop_count_analysis(Expectation(), (torch.zeros(2, 30, 4 * 33),)).total() == 2 * 30 * 4 * 33
    assert flop_count_analysis(Product(), (torch.zeros(2, 3, 4), torch.zeros(4, 5))).total() == 2 * 3 * 4 * 5
