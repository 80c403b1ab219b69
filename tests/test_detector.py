"""MF-DETR: matching, losses, pre/post-processing, padding, the role of the global tokens."""
import itertools
import os
import sys

import pytest
import torch
from detectron2.modeling import build_model, detector_postprocess
from torchvision.ops import box_convert, generalized_box_iou

from helpers import encode, image_input, make_instances, toy_cfg
from mobileformer_det.modeling import VARIANTS, MFDETR
from mobileformer_det.modeling.detr import HungarianMatcher, SetCriterion
from mobileformer_det.modeling.detr.matcher import focal_class_cost
from mobileformer_det.modeling.detr.postprocess import PostProcess


def random_targets(g, num_boxes, num_classes):
    cxcy = torch.rand(num_boxes, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(num_boxes, 2, generator=g) * 0.3 + 0.05
    return {"labels": torch.randint(0, num_classes, (num_boxes,), generator=g), "boxes": torch.cat([cxcy, wh], 1)}


@pytest.mark.parametrize("seed", range(6))
def test_matcher_is_optimal_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, num_boxes, num_classes = 6, 1 + seed % 4, 5
    logits = torch.randn(1, num_queries, num_classes, generator=g)
    boxes = torch.cat([torch.rand(1, num_queries, 2, generator=g) * 0.6 + 0.2,
                       torch.rand(1, num_queries, 2, generator=g) * 0.3 + 0.05], -1)
    target = random_targets(g, num_boxes, num_classes)
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    ((rows, cols),), = matcher([(logits, boxes)], [target])

    xyxy = lambda b: box_convert(b, "cxcywh", "xyxy")  # noqa: E731
    cost = (2.0 * focal_class_cost(logits[0], target["labels"]) + 5.0 * torch.cdist(boxes[0], target["boxes"], p=1)
            - 2.0 * generalized_box_iou(xyxy(boxes[0]), xyxy(target["boxes"])))
    best = min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(num_queries), num_boxes))
    assert len(rows) == num_boxes and sorted(cols.tolist()) == list(range(num_boxes))
    assert cost[rows, cols].sum().item() == pytest.approx(best.item(), abs=1e-4)


def test_matching_several_sets_at_once_equals_matching_each_alone():
    """All decoder layers and images share one host transfer; the assignments must not change."""
    g = torch.Generator().manual_seed(0)
    targets = [random_targets(g, 3, 4), random_targets(g, 0, 4), random_targets(g, 7, 4)]
    sets = [(torch.randn(3, q, 4, generator=g), torch.rand(3, q, 4, generator=g) * 0.5 + 0.2) for q in (10, 10, 6)]
    matcher = HungarianMatcher()
    together = matcher(sets, targets)
    for s, prediction_set in enumerate(sets):
        (alone,) = matcher([prediction_set], targets)
        for (q1, t1), (q2, t2) in zip(together[s], alone):
            assert q1.tolist() == q2.tolist() and t1.tolist() == t2.tolist()
    assert [len(q) for q, _ in together[2]] == [3, 0, 6]


def test_perfect_prediction_has_zero_box_loss_and_minimal_class_loss():
    g = torch.Generator().manual_seed(0)
    target = random_targets(g, 3, 4)
    logits = torch.full((1, 10, 4), -30.0)
    boxes = torch.rand(1, 10, 4, generator=g) * 0.1 + 0.3
    for i, (label, box) in enumerate(zip(target["labels"], target["boxes"])):
        logits[0, 2 * i, label] = 30.0
        boxes[0, 2 * i] = box
    criterion = SetCriterion(4, HungarianMatcher())
    losses = criterion([(logits, boxes)], [target])
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-5)   # torchvision's eps: 1e-7 on areas
    assert 0.0 <= losses["loss_class"].item() < 1e-6
    # a wrong class costs
    logits[0, 0] = logits[0, 0].roll(1)
    assert criterion([(logits, boxes)], [target])["loss_class"].item() > 1.0


def test_losses_without_boxes_are_finite_and_zero_for_boxes():
    criterion = SetCriterion(4, HungarianMatcher())
    logits = torch.randn(2, 5, 4, requires_grad=True)
    boxes = torch.rand(2, 5, 4).requires_grad_()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = criterion([(logits, boxes)], [empty, empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all()


def test_prepare_targets_normalises_to_cxcywh():
    inst = make_instances([[10, 20, 50, 60]], [2], (100, 200))
    (target,) = MFDETR.prepare_targets([inst], [(100, 200)])
    torch.testing.assert_close(target["boxes"], torch.tensor([[30 / 200, 40 / 100, 40 / 200, 40 / 100]]))
    assert target["labels"].tolist() == [2]


def _detections(postprocess, logits, boxes, size):
    """The one image's detections, both steps of ``PostProcess``."""
    tensors = postprocess(logits, boxes, torch.tensor([size], dtype=torch.float32))
    return postprocess.select(*(t[0] for t in tensors), size)


def test_postprocess_coordinates_on_a_resized_non_square_image():
    logits = torch.full((1, 4, 4), -10.0)
    logits[0, 1, 3] = 5.0
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]]])
    result = _detections(PostProcess(topk=3), logits, boxes, (100, 200))      # input is 100 x 200 (h x w)
    assert result.pred_classes[0].item() == 3 and len(result) == 3
    torch.testing.assert_close(result.pred_boxes.tensor[0], torch.tensor([80.0, 30.0, 120.0, 70.0]))
    resized = detector_postprocess(result, 250, 500)                        # original image 250 x 500
    torch.testing.assert_close(resized.pred_boxes.tensor[0], torch.tensor([200.0, 75.0, 300.0, 175.0]))
    assert resized.image_size == (250, 500)


def test_postprocess_clips_to_the_valid_image_of_each_in_a_batch():
    boxes = torch.tensor([[[0.9, 0.9, 0.4, 0.4]], [[0.9, 0.9, 0.4, 0.4]]])        # reaches past the border
    out, _, _ = PostProcess(topk=1)(torch.zeros(2, 1, 1), boxes, torch.tensor([[100.0, 200.0], [50.0, 60.0]]))
    torch.testing.assert_close(out[:, 0], torch.tensor([[140.0, 70.0, 200.0, 100.0], [42.0, 35.0, 60.0, 50.0]]))


def test_score_threshold_drops_low_scores():
    logits = torch.tensor([[[3.0, -3.0], [-3.0, -3.0]]])
    result = _detections(PostProcess(score_thresh=0.5), logits, torch.full((1, 2, 4), 0.5), (10, 10))
    assert len(result) == 1 and result.scores[0] > 0.5


@pytest.mark.parametrize("nms, classes", [(0.7, [0, 1, 0]), (0.0, [0, 0, 1, 0])])
def test_nms_drops_only_overlapping_boxes_of_the_same_class(nms, classes):
    """TEST.NMS_THRESH 0.7: a box of the same class at IoU 0.81 goes; the same box with another class
    and a box of the same class at IoU 0.5 stay. 0 keeps all."""
    logits = torch.full((1, 4, 2), -10.0)
    logits[0, 0, 0], logits[0, 1, 0], logits[0, 2, 1], logits[0, 3, 0] = 4.0, 3.0, 2.0, 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.36, 0.36], [0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.2, 0.4]]])
    result = _detections(PostProcess(score_thresh=0.5, nms_thresh=nms), logits, boxes, (100, 100))
    assert result.pred_classes.tolist() == classes
    expected = [4.0, 2.0, 1.0] if nms else [4.0, 3.0, 2.0, 1.0]
    torch.testing.assert_close(result.scores, torch.tensor(expected).sigmoid())


def test_postprocess_is_built_from_the_test_keys():
    model = build_model(toy_cfg("MODEL.MF_DETR.TEST.TOPK", 7, "MODEL.MF_DETR.TEST.SCORE_THRESH", 0.2,
                                "MODEL.MF_DETR.TEST.NMS_THRESH", 0.6))
    assert (model.postprocess.topk, model.postprocess.score_thresh, model.postprocess.nms_thresh) == (7, 0.2, 0.6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_losses_for_every_variant(variant):
    cfg = toy_cfg("MODEL.MOBILEFORMER.VARIANT", variant, "MODEL.MF_DETR.DECODER.NUM_LAYERS", 2)
    model = build_model(cfg).train()
    batch = [image_input(0, 96, 128, instances=make_instances([[10, 10, 40, 50], [60, 20, 120, 90]], [0, 3], (96, 128))),
             image_input(1, 80, 100, instances=make_instances([], [], (80, 100)))]   # no objects
    losses = model(batch)
    # the recipe's distribution refinement: its anchors' set losses (_pre), FGL on every layer, DDF
    # from the last layer into the earlier one
    expected = ({f"loss_{k}{s}" for k in ("class", "bbox", "giou") for s in ("", "_0", "_enc", "_dn", "_dn_0", "_pre", "_pre_dn")}
                | {f"loss_fgl{s}" for s in ("", "_0", "_dn", "_dn_0")} | {"loss_ddf_0"})
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_eval_on_an_image_without_objects_returns_instances():
    model = build_model(toy_cfg("MODEL.MF_DETR.TEST.NMS_THRESH", 0.0)).eval()
    with torch.no_grad():
        (out,) = model([image_input(0, 64, 90, height=128, width=180)])
    inst = out["instances"]
    assert inst.image_size == (128, 180)
    assert len(inst) == 100 and set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
    assert (inst.pred_boxes.tensor[:, 2:] <= torch.tensor([180.0, 128.0])).all()


def test_global_tokens_change_detections_and_receive_gradients():
    torch.manual_seed(0)
    model = build_model(toy_cfg()).eval()
    inputs = [image_input(0, 96, 128)]
    with torch.no_grad():
        before = model(inputs)[0]["instances"]
        model.backbone.tokens.add_(torch.randn_like(model.backbone.tokens))
        after = model(inputs)[0]["instances"]
    assert not torch.allclose(before.scores, after.scores, atol=1e-4)

    model.train()
    batch = [image_input(0, 96, 128, instances=make_instances([[10, 10, 40, 50]], [1], (96, 128)))]
    sum(model(batch).values()).backward()
    assert model.backbone.tokens.grad.abs().sum() > 0
    assert model.token_proj[0].weight.grad.abs().sum() > 0
    assert model.transformer.decoder[0].token_attn.in_proj_weight.grad.abs().sum() > 0


def test_denoising_queries_are_hidden_from_object_queries_and_repair_their_boxes():
    from mobileformer_det.modeling.detr.denoising import build_denoising_queries

    torch.manual_seed(0)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    dn = build_denoising_queries(targets, 4, 6, 0.0, 0.4, num_queries=5, label_embed=torch.nn.Embedding(4, 8))
    assert dn["num_groups"] == 3 and dn["query"].shape == (2, 6, 8)
    assert dn["valid"].tolist() == [[True, True] * 3, [True, False] * 3]
    mask = dn["attn_mask"]                                             # [N, D+Q, D+Q], True = blocked
    assert mask.shape == (2, 11, 11)
    assert mask[:, 6:, :6].all() and not mask[:, 6:, 6:].any()        # object queries never see DN queries
    assert not mask[0, :2, :2].any() and mask[0, :2, 2:6].all()       # a group sees only itself
    assert mask[1, 0, 1] and mask[1, 2, 1] and not mask[1, 1, 1]       # a padding slot: seen by none but itself
    assert not mask.diagonal(dim1=1, dim2=2).any()                      # no query is blind
    assert [q.tolist() for q, _ in dn["indices"]] == [[0, 1, 2, 3, 4, 5], [0, 2, 4]]
    noisy, clean = dn["reference"][0, :2], targets[0]["boxes"]
    assert (noisy[:, :2] - clean[:, :2]).abs().max() <= 0.2 * 0.4 + 1e-6   # centre moved by at most 40% of half size
    assert not torch.allclose(noisy, clean)

    # Predictions that repair every denoising query: zero box losses, no class loss (padding slots ignored).
    criterion = SetCriterion(4, HungarianMatcher())
    logits = torch.full((2, 6 + 5, 4), -30.0)
    boxes = torch.rand(2, 6 + 5, 4) * 0.2 + 0.4
    for g in range(3):
        logits[0, 2 * g, 1] = logits[0, 2 * g + 1, 2] = logits[1, 2 * g, 0] = 30.0
        boxes[0, 2 * g: 2 * g + 2], boxes[1, 2 * g] = targets[0]["boxes"], targets[1]["boxes"][0]
        logits[1, 2 * g + 1, 3] = 30.0                                  # a padding slot: not scored
    losses = criterion([(logits, boxes)], targets, denoising=dn)
    assert losses["loss_bbox_dn"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou_dn"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["loss_class_dn"].item() < 1e-6


def test_padding_slots_of_denoising_do_not_change_real_queries():
    """An image with fewer boxes than another gets padding slots; no real query may depend on them."""
    from mobileformer_det.modeling.detr.denoising import build_denoising_queries

    torch.manual_seed(0)
    model = build_model(toy_cfg("MODEL.MF_DETR.DECODER.NUM_LAYERS", 2)).eval()
    targets = [{"labels": torch.tensor([1, 2, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4],
                                                                           [0.5, 0.5, 0.4, 0.4]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    with torch.no_grad():
        encoded = encode(model, [image_input(0, 64, 96), image_input(1, 64, 96)])
        dn = build_denoising_queries(targets, 4, 6, 0.0, 0.4, model.transformer.num_queries, model.transformer.label_embed)
        before, _, _ = model.transformer(**encoded, denoising=dn)
        padding = ~dn["valid"]
        dn["query"][padding] = torch.randn_like(dn["query"][padding]) * 10
        dn["reference"][padding] = torch.rand_like(dn["reference"][padding])
        after, _, _ = model.transformer(**encoded, denoising=dn)
    for (l1, b1), (l2, b2) in zip(before, after):
        real = torch.cat([dn["valid"], torch.ones(2, l1.shape[1] - dn["valid"].shape[1], dtype=torch.bool)], 1)
        torch.testing.assert_close(l1[real], l2[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b1[real], b2[real], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(l1[~real], l2[~real])              # the padding slots did change


def test_a_batch_without_boxes_logs_the_same_losses():
    """Every worker must report the same loss names, and every parameter must take part (DDP)."""
    torch.manual_seed(0)
    model = build_model(toy_cfg("MODEL.MF_DETR.DECODER.NUM_LAYERS", 2)).train()
    with_boxes = model([image_input(0, 64, 64, instances=make_instances([[5, 5, 30, 30]], [1], (64, 64)))])
    empty = model([image_input(1, 64, 64, instances=make_instances([], [], (64, 64)))])
    assert set(empty) == set(with_boxes)
    assert all(torch.isfinite(v) for v in empty.values())
    sum(empty.values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


def _padded_training_batch():
    return [image_input(0, 64, 96, instances=make_instances([[5, 5, 30, 30], [40, 10, 90, 60]], [1, 2], (64, 96))),
            image_input(1, 80, 72, instances=make_instances([[10, 20, 50, 70]], [3], (80, 72)))]


@pytest.mark.parametrize("refinement, aux_loss, aifi", [("distribution", True, 1), ("offset", True, 0), ("offset", False, 0)])
def test_every_parameter_gets_a_gradient(refinement, aux_loss, aifi):
    """DistributedDataParallel (built without find_unused_parameters) needs every parameter in the graph."""
    torch.manual_seed(0)
    model = build_model(toy_cfg("MODEL.MF_DETR.DECODER.BOX_REFINEMENT", refinement,
                                "MODEL.MF_DETR.DECODER.AUX_LOSS", aux_loss, "MODEL.MF_DETR.AIFI_LAYERS", aifi)).train()
    assert len(model.neck.aifi) == aifi
    losses = model(_padded_training_batch())
    assert ("loss_class_0" in losses) == aux_loss and "loss_class" in losses and "loss_class_enc" in losses
    assert len(model.transformer.class_heads) == (3 if aux_loss else 1)
    sum(losses.values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


class _HostSyncs(torch.overrides.TorchFunctionMode):
    """Records the calls of this package's code that copy device data to the host (each one waits
    for the device on a GPU)."""

    SYNCS = {torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.__bool__}  # numpy() needs cpu()

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and "mobileformer_det" in frame.f_code.co_filename:
                self.calls.append(f"{func.__name__} at {os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))


def test_a_training_step_copies_to_the_host_once():
    """The matcher's cost matrices, all layers and images together: nothing else waits for the device."""
    torch.manual_seed(0)
    model = build_model(toy_cfg()).train()
    batch = _padded_training_batch()
    with _HostSyncs() as syncs:
        losses = model(batch)
    sum(losses.values()).backward()
    assert len(syncs.calls) == 1 and syncs.calls[0].startswith("cpu at matcher.py"), syncs.calls


def test_two_stage_anchor_validity_is_exact_on_every_map_width():
    """A proposal anchor is valid when its centre lies in (0.01, 0.99) of the valid image. The
    centre (x + 0.5) / v of column x of v valid ones falls exactly on 0.01 or 0.99 when v is 50 x
    an odd number, where rounding (which differs between PyTorch, ONNX Runtime and OpenVINO) would
    decide: the rule resolves those ties (the first such column valid, the last invalid) and gives
    every other column its exact rational answer, padded or not, up to 2500-position maps."""
    from mobileformer_det.modeling.detr.query_selection import grid_anchors

    for padded in list(range(1, 400)) + [1000, 1500, 2500]:
        for v in sorted({padded, max(1, padded - 3), max(1, padded // 2), max(1, padded - 17)}):
            padding = torch.arange(padded)[None].repeat(2, 1).flatten()[None] >= v       # 2 rows of the map
            ratios = torch.tensor([[[v / padded, 1.0]]])
            _, valid = grid_anchors([(2, padded)], ratios, padding)
            x = torch.arange(padded)
            exact = ((2 * x + 1) * 100 >= 2 * v) & ((2 * x + 1) * 100 < 198 * v) & (x < v)
            assert valid[0, :padded].tolist() == exact.tolist(), (padded, v)
