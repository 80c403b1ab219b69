"""Today's DETRs beside MF-DETR (mobileformer_det.modeling.peers): built as their published
configurations and recipes build them, trained through PeerDETR with their authors' losses."""
import os
from types import SimpleNamespace

import pytest
import torch
from detectron2.modeling import build_model

from helpers import make_instances, toy_cfg

pytest.importorskip("transformers")
from transformers.loss.loss_d_fine import DFineLoss  # noqa: E402
from transformers.loss.loss_deimv2 import Deimv2Loss  # noqa: E402

from mobileformer_det.modeling.peers import PEERS, build_peer, recipe_overrides  # noqa: E402
from mobileformer_det.utils.flops import flop_count_analysis  # noqa: E402

TRAINABLE = [name for name, peer in PEERS.items() if peer.trainable]
# Parameters of the authors' own builds (their YAMLs with HGNetv2.pretrained False, 80 classes), counted
# there: Intellindust-AI-Lab/DEIMv2 at 0fff8d4, Peterande/D-FINE at 4a1f73a.
AUTHORS_COUNTS = {"DEIMv2-Atto": 508985, "DEIMv2-Femto": 983945, "DEIMv2-Pico": 1539539, "DEIMv2-N": 3600421,
                  "D-FINE-N": 3782693, "D-FINE-S": 9533909}
# Parameters the authors' code also keeps fixed: D-FINE's bin spacing and range (nn.Parameter(requires_grad=False)).
CONSTANTS = {"model.decoder.reg_scale", "model.decoder.up"}


def _peer(name, *opts):
    return build_model(toy_cfg("MODEL.META_ARCHITECTURE", "PeerDETR", "MODEL.PEER.NAME", name, *opts))


@pytest.mark.parametrize("name", ["DEIMv2-Atto", "DEIMv2-Femto", "DEIMv2-Pico", "DEIMv2-N", "D-FINE-N", "D-FINE-S",
                                  "RT-DETRv2-R18"])
def test_peers_are_the_published_models(name):
    """Parameters as published (to 10%: the papers round to 0.1 M below 2 M and to the million
    above), D-FINE's and DEIMv2's to the unit of their authors' code, and, for them, GFLOPs at their
    published input: the authors count a multiply-add as two flops, fvcore as one (to 15%: D-FINE-S
    counts 27.5 against 25)."""
    peer = PEERS[name]
    torch.manual_seed(0)
    module, exportable = build_peer(name)
    params = sum(p.numel() for p in module.parameters()) / 1e6
    assert abs(params - peer.params) <= 0.1 * peer.params, params
    if name in AUTHORS_COUNTS:
        assert sum(p.numel() for p in module.parameters()) == AUTHORS_COUNTS[name]
    assert exportable and module.network.config.num_labels == 80 and module.network.config.decoder_layers == 3
    images = torch.rand(1, 3, *peer.input_size) * 255
    with torch.no_grad():
        logits, boxes = module(images)
    # (D-FINE's refined boxes are not clamped to the image: their post-processing clips them)
    assert logits.shape[-1] == 80 and boxes.shape[-1] == 4 and torch.isfinite(boxes).all()
    if name.startswith(("DEIMv2", "D-FINE")):
        gflops = 2 * flop_count_analysis(module, (images,)).total() / 1e9
        assert abs(gflops - peer.gflops) <= 0.15 * peer.gflops, gflops


@pytest.mark.parametrize("name", TRAINABLE)
def test_peers_train_their_normalisation_as_their_recipes(name):
    """From random weights, as the authors' YAMLs train them (``freeze_norm: False``, nothing frozen):
    no frozen normalisation layer, every parameter but D-FINE's two constants trained, and the
    batch norms' statistics move in a training step. transformers' default
    (``freeze_backbone_batch_norms=True``) makes every backbone batch norm an identity."""
    model = _peer(name).train()
    frozen = sorted({type(m).__name__ for m in model.modules() if "Frozen" in type(m).__name__})
    assert not frozen, f"{name} has frozen normalisation layers: {frozen}"
    fixed = {n.removeprefix("detector.") for n, p in model.named_parameters() if not p.requires_grad}
    assert fixed == CONSTANTS, fixed - CONSTANTS
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) >= 20
    before = [m.running_mean.clone() for m in norms]
    images = [{"image": torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8),
               "instances": make_instances([[10, 10, 60, 50]], [1], (96, 128))} for _ in range(2)]
    sum(model(images).values()).backward()
    assert all(not torch.equal(b, m.running_mean) for b, m in zip(before, norms))
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_peer_recipes_are_their_yamls():
    """AdamW with the YAMLs' learning rates, the backbone's half of it, weight decay 1e-4, the norm
    of all gradients clipped to 0.1, the weight average on."""
    pairs = {name: dict(zip(*[iter(recipe_overrides(name))] * 2)) for name in TRAINABLE}
    assert {n: (p["SOLVER.BASE_LR"], p["SOLVER.BACKBONE_MULTIPLIER"]) for n, p in pairs.items()} == {
        "DEIMv2-Atto": (2e-3, 0.5), "DEIMv2-Femto": (1.6e-3, 0.5), "DEIMv2-Pico": (1.6e-3, 0.5),
        "DEIMv2-N": (8e-4, 0.5), "D-FINE-N": (8e-4, 0.5)}
    for p in pairs.values():
        assert (p["SOLVER.OPTIMIZER"], p["SOLVER.WEIGHT_DECAY"], p["SOLVER.CLIP_GRADIENTS.CLIP_VALUE"],
                p["MODEL_EMA.ENABLED"], p["MODEL.META_ARCHITECTURE"]) == ("ADAMW", 1e-4, 0.1, True, "PeerDETR")
    cfg = toy_cfg(*recipe_overrides("DEIMv2-Femto"))
    assert cfg.MODEL.PEER.NAME == "DEIMv2-Femto" and cfg.SOLVER.CLIP_GRADIENTS.ENABLED
    with pytest.raises(ValueError, match="no training recipe for 'DETR-R50'"):
        recipe_overrides("DETR-R50")
    with pytest.raises(ValueError, match="MODEL.PEER.NAME must be one of"):
        _peer("DEIMv2-Zepto")


def _captured_criterion_inputs(model, images):
    """Run a training forward and return the arguments the model handed its loss function."""
    seen = {}
    criterion = model.detector.loss_function

    def capture(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return criterion(*args, **kwargs)

    model.detector.loss_function = capture
    losses = model(images)
    model.detector.loss_function = criterion
    return losses, seen["args"], seen["kwargs"]


def _toy_images():
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, 128, 160), generator=g, dtype=torch.uint8),
             "instances": make_instances([[14, 10, 62, 60], [90, 70, 150, 120]], [2, 0], (128, 160))},
            {"image": torch.randint(0, 256, (3, 128, 160), generator=g, dtype=torch.uint8),
             "instances": make_instances([[30, 20, 100, 90]], [3], (128, 160))}]


def test_deimv2_lite_criterion_supervises_each_layer_with_its_own_predictions():
    """DEIMv2-Atto's criterion against a hand assembly of its terms: the last layer is the main set;
    aux_0 and aux_1 the first two layers, aux_2 the first layer's pre-refinement boxes, aux_3 the
    proposals, each matched on its own; dn_0..dn_2 the denoising queries of each layer and dn_3
    their pre-refinement boxes; MAL, L1 and GIoU only, as its YAML's ``losses: ['mal', 'boxes']``."""
    torch.manual_seed(0)
    model = _peer("DEIMv2-Atto").train()
    losses, args, kwargs = _captured_criterion_inputs(model, _toy_images())
    logits, labels, _, boxes, config, classes, coords = args
    dn = kwargs["denoising_meta_values"]
    split = dn["dn_num_split"]
    assert classes.shape[1] == config.decoder_layers + 1 and split[1] == 30
    terms = Deimv2Loss(config)  # transformers' terms, matcher and denoising matches

    def expected(predicted_classes, predicted_boxes, indices=None, num_boxes=3):
        outputs = {"logits": predicted_classes, "pred_boxes": predicted_boxes.clamp(0, 1)}
        indices = indices if indices is not None else terms.matcher(outputs, labels)
        return {**terms.loss_labels_mal(outputs, labels, indices, num_boxes),
                **terms.loss_boxes(outputs, labels, indices, num_boxes)}

    normal = [p.split(split, 2)[1] for p in (classes, coords)]
    sets = {"": (normal[0][:, 3], normal[1][:, 3]), "_aux_0": (normal[0][:, 1], normal[1][:, 1]),
            "_aux_1": (normal[0][:, 2], normal[1][:, 2]), "_aux_2": (normal[0][:, 0], normal[1][:, 0]),
            "_aux_3": (kwargs["enc_topk_logits"], kwargs["enc_topk_bboxes"])}
    dn_indices = terms.get_cdn_matched_indices(dn, labels)
    denoising = [p.split(split, 2)[0] for p in (classes, coords)]
    for i, k in enumerate([1, 2, 3, 0]):
        sets[f"_dn_{i}"] = (denoising[0][:, k], denoising[1][:, k], dn_indices, 3 * dn["dn_num_group"])
    weights = {"loss_mal": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    want = {f"{term}{suffix}": weights[term] * value for suffix, s in sets.items() for term, value in expected(*s).items()}
    assert sorted(losses) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(losses[key], value, msg=key)
    assert torch.equal(logits.split(split, 1)[1], normal[0][:, -1]) and torch.equal(boxes.split(split, 1)[1], normal[1][:, -1])


@pytest.mark.parametrize("name, class_loss", [("D-FINE-N", "vfl"), ("DEIMv2-N", "mal")])
def test_fine_grained_losses_read_each_layers_own_distributions(name, class_loss):
    """D-FINE-N and DEIMv2-N (``losses: [..., 'local']``, the union of the matches): FGL on the
    last layer and every earlier one, each on its own corners against its own anchors, DDF of the
    earlier layers from the last; the pre-refinement boxes and the proposals have class and box
    terms only. Checked against the criterion's own FGL of each layer's predictions."""
    torch.manual_seed(0)
    model = _peer(name).train()
    losses, args, kwargs = _captured_criterion_inputs(model, _toy_images())
    classes, coords = args[5], args[6]
    split = kwargs["denoising_meta_values"]["dn_num_split"]
    corners, anchors = (kwargs[k].split(split, 2)[1] for k in ("predicted_corners", "initial_reference_points"))
    classes, coords = classes.split(split, 2)[1], coords.split(split, 2)[1]
    layers = corners.shape[1]
    assert {k for k in losses if "_dn" not in k} == {
        f"loss_{t}{s}" for t in (class_loss, "bbox", "giou") for s in ["", *(f"_aux_{i}" for i in range(layers + 1))]
    } | {f"loss_{t}{s}" for t in ("fgl", "ddf") for s in ["", *(f"_aux_{i}" for i in range(layers - 1))]}
    terms = DFineLoss(args[4])  # transformers' FGL and matcher (the same for both models)
    labels = args[1]
    sets = [{"logits": classes[:, i + 1], "pred_boxes": coords[:, i + 1].clamp(0, 1)} for i in range(layers)]
    sets += [{"logits": classes[:, 0], "pred_boxes": coords[:, 0].clamp(0, 1)},
             {"logits": kwargs["enc_topk_logits"], "pred_boxes": kwargs["enc_topk_bboxes"].clamp(0, 1)}]
    matches = [terms.matcher(s, labels) for s in sets]
    union = Deimv2Loss._get_dense_o2o_indices(None, matches[layers - 1], matches[:layers - 1] + matches[layers:])
    num_boxes = sum(len(x[0]) for x in union)
    for i, suffix in enumerate([*(f"_aux_{i}" for i in range(layers - 1)), ""]):
        own = dict(sets[i], pred_corners=corners[:, i], ref_points=anchors[:, i], teacher_corners=corners[:, -1],
                   teacher_logits=classes[:, -1])
        fgl = terms.loss_local(own, labels, union, num_boxes)["loss_fgl"]
        torch.testing.assert_close(losses[f"loss_fgl{suffix}"], 0.15 * fgl, msg=suffix)


def test_peer_detector_takes_boxes_relative_to_the_padded_batch():
    """The peers have no padding mask: targets are normalised by the padded tensor's size (160 x 128
    for images of 140 x 100 and 90 x 120), and their pixels are RGB / 255, zero-padded."""
    model = _peer("D-FINE-N").train()
    seen = {}

    def fake(pixel_values, labels=None):
        seen.update(pixel_values=pixel_values, labels=labels)
        return SimpleNamespace(loss_dict={"loss_vfl": pixel_values.sum() * 0})

    model.detector.forward = fake
    images = [torch.full((3, 100, 140), 255, dtype=torch.uint8), torch.full((3, 120, 90), 51, dtype=torch.uint8)]
    inputs = [{"image": images[0], "instances": make_instances([[14, 10, 42, 60]], [2], (100, 140))},
              {"image": images[1], "instances": make_instances([[0, 0, 80, 32], [40, 64, 90, 120]], [0, 3], (120, 90))}]
    losses = model(inputs)
    assert list(losses) == ["loss_vfl"]
    x = seen["pixel_values"]
    assert x.shape == (2, 3, 128, 160)
    assert torch.all(x[0, :, :100, :140] == 1.0) and torch.all(x[0, :, 100:] == 0) and torch.all(x[0, :, :, 140:] == 0)
    assert torch.allclose(x[1, :, :120, :90], torch.tensor(0.2))
    # cx, cy, w, h over (160, 128, 160, 128), by hand
    torch.testing.assert_close(seen["labels"][0]["boxes"], torch.tensor([[28 / 160, 35 / 128, 28 / 160, 50 / 128]]))
    torch.testing.assert_close(seen["labels"][1]["boxes"],
                               torch.tensor([[40 / 160, 16 / 128, 80 / 160, 32 / 128], [65 / 160, 92 / 128, 50 / 160, 56 / 128]]))
    assert seen["labels"][1]["class_labels"].tolist() == [0, 3]


def test_peer_detector_maps_detections_back_to_the_original_image():
    """Boxes relative to the padded batch, to pixels of the resized image, clipped to it, then scaled
    to the requested output size, with the sigmoid scores and classes of the top (query, class) pairs."""
    model = _peer("DEIMv2-Atto", "MODEL.MF_DETR.TEST.NMS_THRESH", 0.0).eval()
    logits = torch.full((1, 30, 4), -20.0)
    logits[0, 3, 1], logits[0, 7, 2] = 2.0, 0.0                 # scores 0.881 and 0.5
    boxes = torch.full((1, 30, 4), 0.5)
    boxes[0, 3] = torch.tensor([0.25, 0.25, 0.25, 0.25])        # 20..60 x 16..48 in the 160 x 128 batch
    boxes[0, 7] = torch.tensor([0.75, 0.5, 0.5, 0.5])           # 80..160 x 32..96: clipped at x = 140
    model.detector.forward = lambda pixel_values: SimpleNamespace(logits=logits, pred_boxes=boxes)
    out = model([{"image": torch.zeros(3, 100, 140, dtype=torch.uint8), "height": 200, "width": 280}])
    inst = out[0]["instances"]
    assert inst.image_size == (200, 280)
    torch.testing.assert_close(inst.scores[:2], torch.tensor([0.8808, 0.5]), atol=1e-4, rtol=0)
    assert inst.pred_classes[:2].tolist() == [1, 2]
    torch.testing.assert_close(inst.pred_boxes.tensor[:2], torch.tensor([[40.0, 32, 120, 96], [160, 64, 280, 192]]))


def test_importing_the_package_leaves_transformers_alone():
    """Registering PeerDETR imports neither transformers nor torchvision's detection models."""
    import subprocess
    import sys

    code = "import sys, mobileformer_det; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.parametrize("name", ["D-FINE-N", "DEIMv2-Atto"])
def test_the_recipes_backbone_rate_reaches_the_hgnetv2_only(name):
    """``SOLVER.BACKBONE_MULTIPLIER`` (0.5 in these recipes) on every HGNetV2 parameter and on
    nothing else (D-FINE's input projections are its encoder's); no weight decay on norms and biases."""
    from mobileformer_det.engine import build_optimizer

    cfg = toy_cfg(*recipe_overrides(name))
    model = build_model(cfg)
    hgnet = set(model.backbone.parameters())
    assert type(model.backbone).__name__ == "HGNetV2Backbone"
    rates = {p: (g["lr"], g["weight_decay"]) for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
    assert len(rates) == sum(p.requires_grad for p in model.parameters()) and len(hgnet) > 100
    assert {rates[p][0] for p in hgnet} == {cfg.SOLVER.BASE_LR * 0.5}
    assert {lr for p, (lr, _) in rates.items() if p not in hgnet} == {cfg.SOLVER.BASE_LR}
    norms = [m.weight for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm))]
    assert {rates[p][1] for p in norms} == {0.0} and 1e-4 in {wd for _, wd in rates.values()}


@pytest.mark.slow
def test_train_net_trains_and_evaluates_a_peer_through_its_command_line(tmp_path):
    """``train_net.py`` with ``MODEL.META_ARCHITECTURE PeerDETR`` and a recipe's overrides trains
    (its weight average saved with the weights) and ``--eval-only`` evaluates the checkpoint to the
    figure training ended with."""
    import json
    import subprocess
    import sys

    from helpers import ROOT

    from mobileformer_det.data import ensure_toy_dataset

    root = ensure_toy_dataset(os.path.join(ROOT, "datasets", "toy_coco"))
    val = json.load(open(os.path.join(root, "val.json")))
    few = {im["id"] for im in val["images"][:6]}
    (tmp_path / "val6.json").write_text(json.dumps({
        "images": [im for im in val["images"] if im["id"] in few], "categories": val["categories"],
        "annotations": [a for a in val["annotations"] if a["image_id"] in few]}))
    out = tmp_path / "out"
    common = ["--config-file", os.path.join(ROOT, "configs", "mf_detr_toy.yaml"), *map(str, recipe_overrides("DEIMv2-Femto")),
              "DATASETS.COCO_FORMAT", f"[('toy_val6', '{tmp_path / 'val6.json'}', '{os.path.join(root, 'val')}')]",
              "DATASETS.TEST", "('toy_val6',)", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
              "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out)]
    train = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_net.py"), *common, "SOLVER.MAX_ITER", "6",
                            "SOLVER.IMS_PER_BATCH", "2", "TEST.EVAL_PERIOD", "0"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    final = torch.load(out / "model_final.pth", weights_only=False)
    assert final["ema"]["updates"] == 6 and any(k.startswith("detector.model.conv_encoder") for k in final["model"])
    evaluate = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--eval-only", *common,
                               "MODEL.WEIGHTS", str(out / "model_final.pth")],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    trained, again = (next(line for line in run.stdout.splitlines()[::-1] if "copypaste: " in line and "," in line
                           and "AP," not in line) for run in (train, evaluate))
    assert trained.split("copypaste: ")[1] == again.split("copypaste: ")[1]


@pytest.mark.parametrize("name", ["D-FINE-N", "DEIMv2-Atto"])
def test_peers_start_from_their_authors_initialisation(name):
    """As the authors' code initialises them from scratch (transformers draws every convolution and
    linear layer from N(0, 0.01) and sets the class prior to 1 / (classes + 1), meant to be
    overwritten by a checkpoint): PyTorch's default draws (std 1 / sqrt(3 fan_in)) in the backbone,
    encoder and heads, class biases for a prior of 0.01, the box heads' last layers at zero, and
    every decoder layer starting as a copy of the first."""
    torch.manual_seed(0)
    model = _peer(name).detector
    convs = [m for m in model.model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight[0].numel() >= 64]
    ratios = [float(m.weight.detach().std()) * (3 * m.weight[0].numel()) ** 0.5 for m in convs]
    assert len(convs) > 20 and 0.85 < sum(ratios) / len(ratios) < 1.15, ratios
    prior = -torch.log(torch.tensor(0.99 / 0.01))
    decoder = model.model.decoder
    for head in [model.model.enc_score_head, *decoder.class_embed]:
        torch.testing.assert_close(head.bias, prior.expand_as(head.bias))
    for head in [model.model.enc_bbox_head, decoder.pre_bbox_head, *decoder.bbox_embed]:
        assert not head.layers[-1].weight.any() and not head.layers[-1].bias.any()
    first = decoder.layers[0].state_dict()
    assert all(torch.equal(first[k], v) for layer in decoder.layers[1:] for k, v in layer.state_dict().items())
