"""The training options of the ablation (tokens off, contrastive denoising, look-forward-twice,
varifocal and matchability-aware losses, one-to-many matching, dense proposal assignment and proposal NMS)."""
import math

import pytest
import torch
from detectron2.modeling import build_model
from torchvision.ops import box_convert, box_iou

from helpers import encode, image_input, make_instances, toy_cfg
from mobileformer_det.modeling.detr import HungarianMatcher, SetCriterion
from mobileformer_det.modeling.detr.assigner import AnchorAssigner
from mobileformer_det.modeling.detr.query_selection import fast_nms_order
from mobileformer_det.modeling.detr.criterion import matchability_aware_loss, varifocal_loss
from mobileformer_det.modeling.detr.denoising import build_denoising_queries


def training_batch():
    return [image_input(0, 64, 96, instances=make_instances([[5, 5, 30, 30], [40, 10, 90, 60]], [1, 2], (64, 96))),
            image_input(1, 80, 72, instances=make_instances([[10, 20, 50, 70]], [3], (80, 72)))]


def unused_parameters(model):
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_without_tokens_the_token_sublayer_does_not_exist():
    """USE_TOKENS False is a clean ablation: no token attention, norm, projection or final
    Mobile->Former is built or run, and every remaining parameter still gets a gradient (DDP)."""
    torch.manual_seed(0)
    model = build_model(toy_cfg("MODEL.MF_DETR.USE_TOKENS", False)).train()
    names = [n for n, _ in model.named_parameters()]
    for part in ("token_attn", "token_norm", "token_proj", "token_pos", "final_mobile_to_former"):
        assert not any(part in n for n in names), part
    with_tokens = build_model(toy_cfg())
    assert sum(p.numel() for p in with_tokens.parameters()) > sum(p.numel() for p in model.parameters())

    calls = []
    for layer in model.transformer.decoder:
        layer.self_attn.register_forward_hook(lambda *a: calls.append("self"))
    sum(model(training_batch()).values()).backward()
    assert calls == ["self"] * len(model.transformer.decoder)   # the only softmax attention that runs
    assert not unused_parameters(model)
    model.eval()
    with torch.no_grad():
        assert len(model([image_input(2, 64, 96)])[0]["instances"]) > 0


def test_look_forward_twice_keeps_the_boxes_and_trains_the_previous_head_by_the_next_loss():
    torch.manual_seed(0)
    # look-forward-twice refines offsets (the toy recipe refines distributions, which refuses it)
    offsets = ("MODEL.MF_DETR.DENOISING.NUM_QUERIES", 0, "MODEL.MF_DETR.DECODER.BOX_REFINEMENT", "offset")
    plain = build_model(toy_cfg(*offsets)).train()
    lft = build_model(toy_cfg(*offsets, "MODEL.MF_DETR.DECODER.LOOK_FORWARD_TWICE", True)).train()
    lft.load_state_dict(plain.state_dict())
    gradients = []
    for model in (plain, lft):
        encoded = encode(model, training_batch())
        outputs, _, _ = model.transformer(**encoded)
        # the last layer's boxes only: does the gradient reach layer 0's box head?
        outputs[-1][1].sum().backward()
        gradients.append([head.layers[-1].weight.grad for head in model.transformer.box_heads])
        values = torch.stack([b for _, b in outputs])
        if model is plain:
            reference = values
    torch.testing.assert_close(values, reference)                    # same boxes, forward unchanged
    assert len(gradients[1]) == 3
    def reached(grad):
        return grad is not None and grad.abs().sum() > 0
    assert [reached(g) for g in gradients[0]] == [False, False, True]    # detached references
    assert [reached(g) for g in gradients[1]] == [False, True, True]     # one layer back, not two


def test_varifocal_loss_against_a_hand_computation():
    logits = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    targets = torch.tensor([[0.8, 0.0], [0.0, 0.0]])
    alpha, gamma = 0.75, 2.0
    expected = torch.empty(2, 2)
    for i in range(2):
        for k in range(2):
            x, q = logits[i, k].item(), targets[i, k].item()
            p = 1 / (1 + math.exp(-x))
            weight = q if q > 0 else alpha * p ** gamma
            expected[i, k] = -weight * (q * math.log(p) + (1 - q) * math.log(1 - p))
    torch.testing.assert_close(varifocal_loss(logits, targets, alpha, gamma), expected)


def test_matchability_aware_loss_against_a_hand_computation():
    logits = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    targets = torch.tensor([[0.8, 0.0], [0.0, 0.3]])
    gamma = 1.5
    expected = torch.empty(2, 2)
    for i in range(2):
        for k in range(2):
            x, q = logits[i, k].item(), targets[i, k].item()
            p = 1 / (1 + math.exp(-x))
            t, weight = (q ** gamma, 1.0) if q > 0 else (0.0, p ** gamma)
            expected[i, k] = -weight * (t * math.log(p) + (1 - t) * math.log(1 - p))
    torch.testing.assert_close(matchability_aware_loss(logits, targets, gamma), expected)


def test_the_config_selects_the_class_loss():
    """LOSS.CLASS_TYPE and MAL_GAMMA reach the criterion; the loss of a training step changes with them
    and stays finite (every class loss runs on the decoder's, the denoising and the dense proposals' sets)."""
    losses = {}
    for opts in ([], ["MODEL.MF_DETR.LOSS.CLASS_TYPE", "mal", "MODEL.MF_DETR.LOSS.MAL_GAMMA", 2.0]):
        torch.manual_seed(0)
        model = build_model(toy_cfg(*opts)).train()
        losses[len(opts)] = model(training_batch())
    assert (model.criterion.class_loss, model.criterion.mal_gamma) == ("mal", 2.0)
    assert all(torch.isfinite(v) for v in losses[4].values())
    assert losses[0]["loss_class"] != losses[4]["loss_class"]
    torch.testing.assert_close(losses[0]["loss_bbox"], losses[4]["loss_bbox"])   # same weights, same matches


@pytest.mark.parametrize("class_loss, best", [("varifocal", 0.5), ("mal", 0.35)])
def test_iou_aware_class_target_of_a_matched_query(class_loss, best):
    """A query whose class score equals its box's IoU with the target (varifocal), or that IoU to
    the power 1.5 (MAL: 0.5 ** 1.5 = 0.354), has the lowest class loss."""
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.2]]])                   # IoU 0.5 with the target
    criterion = SetCriterion(3, HungarianMatcher(), class_loss=class_loss, mal_gamma=1.5)
    losses = {}
    for score in (0.2, 0.35, 0.5, 0.7, 0.99):
        logits = torch.full((1, 1, 3), -30.0)
        logits[0, 0, 1] = math.log(score / (1 - score))
        losses[score] = criterion.loss_set(logits, boxes, [target], [(torch.tensor([0]), torch.tensor([0]))], 1.0)["loss_class"].item()
    assert min(losses, key=losses.get) == best
    with pytest.raises(ValueError, match="LOSS.CLASS_TYPE"):
        SetCriterion(3, HungarianMatcher(), class_loss="softmax")


def test_contrastive_denoising_adds_negatives_with_no_object_targets():
    torch.manual_seed(0)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    dn = build_denoising_queries(targets, 4, 12, 0.0, 0.4, num_queries=5, label_embed=torch.nn.Embedding(4, 8),
                                 negatives=True)
    # groups of [2 positive | 2 negative] slots: 12 // (2 * 2) = 3 groups
    assert dn["num_groups"] == 3 and dn["query"].shape == (2, 12, 8)
    assert dn["valid"].tolist() == [[True, True] * 6, [True, False] * 6]
    assert [q.tolist() for q, _ in dn["indices"]] == [[0, 1, 4, 5, 8, 9], [0, 4, 8]]   # positives only
    mask = dn["attn_mask"]
    assert not mask[0, :4, :4].any() and mask[0, :4, 4:12].all()     # a group (with its negatives) sees itself
    assert mask[:, 12:, :12].all()

    # corners moved by < 0.4 half sizes for positives, between 0.4 and 0.8 for negatives
    xyxy = lambda b: box_convert(b, "cxcywh", "xyxy")  # noqa: E731
    half = targets[0]["boxes"][:, 2:].repeat(1, 2) / 2
    for g in range(3):
        pos = (xyxy(dn["reference"][0, 4 * g: 4 * g + 2]) - xyxy(targets[0]["boxes"])).abs() / half
        neg = (xyxy(dn["reference"][0, 4 * g + 2: 4 * g + 4]) - xyxy(targets[0]["boxes"])).abs() / half
        assert pos.max() <= 0.4 + 1e-4
        inside = xyxy(targets[0]["boxes"]).sub(neg * half).ge(0).all()  # no clamping at the image border
        assert not inside or neg.min() >= 0.4 - 1e-4

    criterion = SetCriterion(4, HungarianMatcher())
    logits = torch.full((2, 12 + 5, 4), -30.0)
    boxes = torch.rand(2, 12 + 5, 4) * 0.2 + 0.4
    for g in range(3):
        logits[0, 4 * g, 1] = logits[0, 4 * g + 1, 2] = logits[1, 4 * g, 0] = 30.0
        boxes[0, 4 * g: 4 * g + 2], boxes[1, 4 * g] = targets[0]["boxes"], targets[1]["boxes"][0]
    losses = criterion([(logits, boxes)], targets, denoising=dn)
    assert losses["loss_bbox_dn"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_class_dn"].item() < 1e-6                      # negatives scored "no object"
    logits[0, 2, 1] = 30.0                                             # a negative that claims the object
    assert criterion([(logits, boxes)], targets, denoising=dn)["loss_class_dn"].item() > 1.0


def test_one_to_many_queries_are_training_only_and_invisible_to_the_one_to_one_queries():
    torch.manual_seed(0)
    model = build_model(toy_cfg("MODEL.MF_DETR.ONE2MANY.NUM_QUERIES", 40, "MODEL.MF_DETR.ONE2MANY.REPEATS", 3)).train()
    transformer = model.transformer
    losses = model(training_batch())
    assert {"loss_class_o2m", "loss_bbox_o2m", "loss_giou_o2m", "loss_class_o2m_0"} <= set(losses)
    sum(losses.values()).backward()
    assert not unused_parameters(model)

    targets = model.prepare_targets([x["instances"] for x in training_batch()], [(64, 96), (80, 72)])
    with torch.no_grad():
        encoded = encode(model, training_batch())
        dn = build_denoising_queries(targets, 4, 30, 0.0, 0.4, 30 + 40, transformer.label_embed)
        outputs, _, _ = transformer(**encoded, denoising=dn)
        d = dn["query"].shape[1]
        assert outputs[-1][0].shape[1] == d + 30 + 40
        # the one-to-one queries' outputs do not depend on the one-to-many queries
        transformer.query_embed.weight[30:] += torch.randn(40, transformer.query_embed.weight.shape[1])
        changed, _, _ = transformer(**encoded, denoising=dn)
    for (l1, b1), (l2, b2) in zip(outputs, changed):
        torch.testing.assert_close(l1[:, : d + 30], l2[:, : d + 30], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b1[:, : d + 30], b2[:, : d + 30], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(l1[:, d + 30:], l2[:, d + 30:])

    model.eval()
    with torch.no_grad():
        encoded = encode(model, [image_input(2, 64, 96)])
        outputs, enc, _ = transformer(**encoded)
    assert outputs[-1][0].shape[1] == 30 and enc["pred_logits"].shape[1] == 30


def test_one_to_many_loss_matches_every_target_repeated():
    """Each of the repeated targets gets its own query: perfect copies give zero box loss."""
    criterion = SetCriterion(4, HungarianMatcher(), one2many_repeats=2)
    target = {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])}
    logits = torch.full((1, 3 + 5, 4), -30.0)
    boxes = torch.rand(1, 8, 4) * 0.1 + 0.4
    boxes[0, 0], boxes[0, 1] = target["boxes"]                          # one-to-one
    boxes[0, 3], boxes[0, 5], boxes[0, 4], boxes[0, 7] = target["boxes"][0], target["boxes"][0], target["boxes"][1], target["boxes"][1]
    losses = criterion([(logits, boxes)], [target], num_one2many=5)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_bbox_o2m"].item() == pytest.approx(0.0, abs=1e-6)
    boxes[0, 7] = boxes[0, 6]                                            # one copy left without its query
    assert criterion([(logits, boxes)], [target], num_one2many=5)["loss_bbox_o2m"].item() > 0


def test_anchor_assigner_against_a_hand_computation():
    anchors = torch.tensor([[
        [0.25, 0.25, 0.2, 0.2],   # target 0 itself: IoU 1, positive
        [0.27, 0.25, 0.2, 0.2],   # IoU 0.036 / 0.044 = 0.82 with target 0: positive
        [0.30, 0.25, 0.2, 0.2],   # IoU 0.03 / 0.05 = 0.6: ignored
        [0.75, 0.75, 0.1, 0.1],   # IoU 0.01 / 0.09 = 0.11 with target 1, its best: positive anyway
        [0.50, 0.92, 0.1, 0.1],   # overlaps nothing: negative
        [0.25, 0.25, 0.2, 0.2],   # target 0 itself, but not a valid position: never counted
    ]])
    valid = torch.tensor([[True] * 5 + [False]])
    target = {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.7, 0.7, 0.3, 0.3]])}
    [(positions, gt, counted)] = AnchorAssigner()(anchors, valid, [target])
    assert sorted(zip(positions.tolist(), gt.tolist())) == [(0, 0), (1, 0), (3, 1)]
    assert counted.tolist() == [True, True, False, True, True, False]
    # at most one positive per target: the best one; the other is neither positive nor negative
    [(positions, gt, counted)] = AnchorAssigner(max_per_target=1)(anchors, valid, [target])
    assert sorted(zip(positions.tolist(), gt.tolist())) == [(0, 0), (3, 1)]
    assert counted.tolist() == [True, False, False, True, True, False]
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    [(positions, gt, counted)] = AnchorAssigner()(anchors, valid, [empty])
    assert len(positions) == len(gt) == 0 and counted.tolist() == valid[0].tolist()


def test_dense_proposal_loss_against_a_hand_computation():
    criterion = SetCriterion(2, HungarianMatcher(), weight_class=2.0, weight_bbox=5.0, weight_giou=2.0)
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0], [-3.0, 1.0]]])              # 3 positions, 2 classes
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    boxes = torch.zeros(1, 3, 4)
    boxes[0, 1] = torch.tensor([0.5, 0.6, 0.2, 0.2])                             # half of it off the target
    losses = criterion.loss_set(logits, boxes, [target], [(torch.tensor([1]), torch.tensor([0]))], 2.0,
                                query_mask=torch.tensor([[True, True, False]]))

    def focal(x, y, alpha=0.25, gamma=2.0):
        p = 1 / (1 + math.exp(-x))
        pt = p if y else 1 - p
        return -(alpha if y else 1 - alpha) * (1 - pt) ** gamma * math.log(pt)
    # position 0: both classes negative; position 1: class 1 positive; position 2 not counted
    expected = focal(0.5, 0) + focal(-1.0, 0) + focal(2.0, 0) + focal(0.0, 1)
    assert losses["loss_class"].item() == pytest.approx(2.0 * expected / 2.0, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5.0 * 0.1 / 2.0, rel=1e-5)
    # IoU = 0.02 / 0.06 = 1/3, the enclosing box is the union: GIoU loss 2/3
    assert losses["loss_giou"].item() == pytest.approx(2.0 * (2 / 3) / 2.0, rel=1e-5)


def test_fast_nms_keeps_a_subset_of_nms_without_overlaps():
    from torchvision.ops import nms

    boxes = torch.tensor([[[0.30, 0.30, 0.2, 0.2], [0.31, 0.30, 0.2, 0.2], [0.70, 0.70, 0.2, 0.2]]])
    keys = fast_nms_order(boxes, torch.tensor([[3.0, 2.0, 1.0]]), 0.7)
    assert keys.argsort(descending=True).tolist() == [[0, 2, 1]]                   # the duplicate goes last
    torch.manual_seed(0)
    for _ in range(5):
        boxes = torch.cat([torch.rand(1, 60, 2) * 0.6 + 0.2, torch.rand(1, 60, 2) * 0.3 + 0.05], -1)
        scores = torch.randn(1, 60).sort(descending=True)[0]
        kept = (fast_nms_order(boxes, scores, 0.5) > -1e3)[0].nonzero().squeeze(1)
        xyxy = box_convert(boxes[0], "cxcywh", "xyxy")
        # a suppressed box overlaps a higher one (kept or not): a subset of what NMS keeps
        assert set(kept.tolist()) <= set(nms(xyxy, scores[0], 0.5).tolist())
        iou = box_iou(xyxy[kept], xyxy[kept])
        assert (iou - torch.eye(len(kept))).max() <= 0.5


def test_dense_assignment_and_proposal_nms_train_and_choose_apart():
    """Every parameter gets a gradient (DDP), an image without boxes trains, and the chosen proposals
    overlap by at most the threshold while enough candidates survive."""
    torch.manual_seed(0)
    opts = ["MODEL.MF_DETR.PROPOSALS.ASSIGN", "anchor_iou", "MODEL.MF_DETR.PROPOSALS.NMS_THRESH", 0.3]
    model = build_model(toy_cfg(*opts)).train()
    losses = model(training_batch())
    assert {"loss_class_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)
    sum(losses.values()).backward()
    assert not unused_parameters(model)
    batch = training_batch()
    batch[1]["instances"] = make_instances([], [], (80, 72))
    assert all(torch.isfinite(v) for v in model(batch).values())

    model.eval()
    chosen = []
    model.transformer.register_forward_hook(lambda m, i, out: chosen.append(out[1]["pred_boxes"]))
    with torch.no_grad():
        model([image_input(2, 128, 160)])
    xyxy = box_convert(chosen[0][0], "cxcywh", "xyxy")
    iou = torch.triu(box_iou(xyxy, xyxy), diagonal=1)
    assert iou.max() <= 0.3
    with pytest.raises(ValueError, match="PROPOSALS.ASSIGN"):
        build_model(toy_cfg("MODEL.MF_DETR.PROPOSALS.ASSIGN", "atss"))
    with pytest.raises(ValueError, match="TWO_STAGE"):
        build_model(toy_cfg("MODEL.MF_DETR.PROPOSALS.ASSIGN", "anchor_iou", "MODEL.MF_DETR.PROPOSALS.TWO_STAGE", False))


def test_aifi_encodes_the_coarsest_level_only():
    """AIFI_LAYERS 1 adds one self-attention layer over the last backbone map's positions (res5):
    with the same weights everywhere else, the memory of the finer levels is unchanged and every
    position of res5's is rewritten. A negative count is refused."""
    torch.manual_seed(0)
    plain = build_model(toy_cfg()).eval()
    aifi = build_model(toy_cfg("MODEL.MF_DETR.AIFI_LAYERS", 1)).eval()
    missing, unexpected = aifi.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("neck.aifi.0.") for k in missing), missing
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected, got = plain.encode(x), aifi.encode(x)
    h, w = got["spatial_shapes"][-1]
    assert got["spatial_shapes"] == expected["spatial_shapes"] and (h, w) == (3, 4)
    assert torch.equal(got["memory"][:, :-h * w], expected["memory"][:, :-h * w])
    assert (got["memory"][:, -h * w:] - expected["memory"][:, -h * w:]).abs().amax(-1).min() > 1e-2
    with pytest.raises(ValueError, match="AIFI_LAYERS must be >= 0"):
        build_model(toy_cfg("MODEL.MF_DETR.AIFI_LAYERS", -1))
