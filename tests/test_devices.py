"""The equalities that must hold on every device (padding invariance, the prepared model, clipping
under a grad scaler, the stop on a non-finite loss), on the CPU and on CUDA, and what only a GPU
shows: float16 AMP training, torch.compile and ONNX Runtime's CUDA provider.

The CUDA cases are marked ``cuda`` and skipped without a CUDA device; ``pytest -m cuda`` runs them
(``tools/gpu_check.py`` does, on a GPU machine). The CPU cases run in every ``make test``.
"""
import copy

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import image_input, make_instances, toy_cfg

skip_without_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, skip_without_cuda])


def _batch(seed=0):
    inputs = []
    for i, (h, w) in enumerate(((128, 160), (96, 128))):
        boxes = [[10 + 7 * i, 12, 60 + 7 * i, 70], [70, 30, 120, 90]]
        inputs.append(image_input(seed + i, h, w, instances=make_instances(boxes, [1, 3], (h, w))))
    return inputs


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_padding_does_not_change_detections_on_the_device(device, monkeypatch):
    """The small image alone (no padding but its own) vs batched with a larger one (padded); TF32
    convolutions off (cuDNN picks other algorithms for the two sizes, which round apart)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = build_model(toy_cfg("MODEL.DEVICE", device)).eval()
    small, large = image_input(0, 96, 128), image_input(1, 160, 224)
    with torch.no_grad():
        alone = model([small])[0]["instances"]
        batched = model([small, large])[0]["instances"]
    torch.testing.assert_close(batched.scores, alone.scores, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(batched.pred_boxes.tensor, alone.pred_boxes.tensor, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_prepared_model_gives_the_plain_models_detections_on_the_device(device, monkeypatch):
    """Batch norm and neck folded, channels-last backbone (``MFDETR.deploy``) vs the model as trained,
    to float rounding (TF32 convolutions off: they round both models apart by more)."""

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = build_model(toy_cfg("MODEL.DEVICE", device, "MODEL.MF_DETR.TEST.NMS_THRESH", 0.0)).eval()
    with torch.no_grad():
        for p in model.parameters():      # away from the initial values, as a trained model's are
            p.add_(torch.randn_like(p) * 0.02)
    prepared = copy.deepcopy(model).deploy()
    inputs = [image_input(0, 96, 128), image_input(1, 128, 160)]
    with torch.no_grad():
        expected, got = model(inputs), prepared(inputs)
    for e, g in zip(expected, got):
        e, g = e["instances"], g["instances"]
        for i in range(10):  # each of the 10 best detections is among the prepared model's (order may swap on ties)
            same = ((g.scores - e.scores[i]).abs() < 1e-5) & (g.pred_classes == e.pred_classes[i]) & \
                   ((g.pred_boxes.tensor - e.pred_boxes.tensor[i]).abs().amax(1) < 2e-3)
            assert same.any(), (i, e[i], g[:12])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_fused_adamw_clips_unscaled_gradients_under_a_grad_scaler(device):
    """Full-model clipping with a GradScaler and a fused optimizer (which unscales inside its step
    unless told otherwise) gives the update of plain fp32 clipping."""
    from mobileformer_det.engine import ClippingAMPTrainer, ClippingTrainer

    torch.manual_seed(0)
    x, y = torch.randn(16, 8, device=device), torch.randn(16, 3, device=device)
    results = []
    for amp in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Linear(8, 3).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        if amp:
            scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12)
            trainer = ClippingAMPTrainer(model, [], optimizer, clip_norm=0.1, grad_scaler=scaler)
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        else:
            trainer = ClippingTrainer(model, [], optimizer, clip_norm=0.1)
            torch.nn.functional.mse_loss(model(x), y).backward()
        trainer.after_backward()
        norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        assert norm.item() == pytest.approx(0.1, rel=1e-4)
        (scaler.step(optimizer), scaler.update()) if amp else optimizer.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_non_finite_loss_stops_the_step_on_the_device(device):
    from mobileformer_det.engine import ClippingTrainer

    model = torch.nn.Linear(4, 1).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    batch = torch.full((2, 4), float("nan"), device=device)
    trainer = ClippingTrainer(lambda_loss(model), iter([batch]), torch.optim.AdamW(model.parameters(), lr=0.1),
                              clip_norm=0.1)
    with EventStorage(), pytest.raises(FloatingPointError, match="iteration 0: a non-finite loss.*total_loss nan"):
        trainer.iter = 0
        trainer.run_step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def lambda_loss(model):
    """A module whose forward returns the mean output of ``model`` as its one loss."""
    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return {"total_loss": self.model(batch).mean()}
    return Loss()


@pytest.mark.cuda
@skip_without_cuda
@pytest.mark.parametrize("variant", ["mf26", "mf508"])
def test_amp_training_step_on_cuda_is_close_to_float32(variant):
    """One step of the COCO recipe's model (FrozenBN, denoising) on the same batch: float16 autocast
    losses within a few percent of float32, all finite, the grad scaler active, and the step taken."""
    from mobileformer_det.engine import ClippingAMPTrainer, build_optimizer

    cfg = toy_cfg("MODEL.DEVICE", "cuda", "MODEL.MOBILEFORMER.VARIANT", variant, "MODEL.MOBILEFORMER.NORM", "FrozenBN",
                  "MODEL.MOBILEFORMER.OUT_FEATURES", ["res3", "res4", "res5"], "MODEL.MF_DETR.DENOISING.NUM_QUERIES", 20)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _batch()
    with torch.no_grad():
        torch.manual_seed(1)
        fp32 = {k: v.item() for k, v in model(batch).items()}
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.float16):
            fp16 = {k: v.float().item() for k, v in model(batch).items()}
    assert all(np.isfinite(v) for v in fp16.values())
    for k in fp32:
        assert fp16[k] == pytest.approx(fp32[k], rel=0.05, abs=0.02), k

    optimizer = build_optimizer(cfg, model)
    assert optimizer.defaults.get("fused")
    scaler = torch.amp.GradScaler("cuda")
    trainer = ClippingAMPTrainer(model, iter([batch]), optimizer, clip_norm=0.1, grad_scaler=scaler)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with EventStorage():
        trainer.iter = 0
        trainer.run_step()
    assert scaler.is_enabled() and scaler.get_scale() > 0
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(b, a) for b, a in zip(before, after))
    assert all(torch.isfinite(a).all() for a in after)


@pytest.mark.cuda
@skip_without_cuda
def test_compiled_tensor_detector_equals_eager_on_cuda():
    from mobileformer_det.deploy import TensorDetector

    torch.manual_seed(0)
    model = build_model(toy_cfg("MODEL.DEVICE", "cuda")).deploy()
    detector = TensorDetector(model)
    images = torch.randint(0, 256, (2, 3, 128, 160), device="cuda").float()
    with torch.no_grad():
        eager = detector(images)
        compiled = torch.compile(detector, dynamic=False)(images)
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-3, rtol=0)
    torch.testing.assert_close(compiled[0], eager[0], atol=0.05, rtol=0)


@pytest.mark.cuda
@skip_without_cuda
def test_onnxruntime_cuda_provider_equals_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no CUDA provider ({ort.get_available_providers()})")
    from mobileformer_det.deploy import TensorDetector, export_onnx

    torch.manual_seed(0)
    model = build_model(toy_cfg()).deploy(channels_last=False)
    path = export_onnx(model, str(tmp_path / "toy.onnx"), 128, 160)
    images = torch.randint(0, 256, (1, 3, 128, 160)).float()
    with torch.no_grad():
        expected = [t.numpy() for t in TensorDetector(model)(images)]
    session = ort.InferenceSession(path, providers=["CUDAExecutionProvider"])
    got = session.run(None, {"images": images.numpy(), "image_sizes": np.array([[128, 160]])})
    np.testing.assert_allclose(got[1], expected[1], atol=1e-3)
    np.testing.assert_allclose(got[0], expected[0], atol=0.5)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_loss_that_grows_finitely_stops_the_step_before_it_is_applied(device):
    """A loss 200x its median over the last 5 steps (factor 100) stops the step, finite as it is, and
    the message says what grew; the steps before it were applied, and none is judged before the
    window is full."""
    from mobileformer_det.engine import ClippingTrainer

    model = torch.nn.Linear(4, 1, bias=False).to(device)
    with torch.no_grad():
        model.weight.fill_(1.0)
    scales = [1.0, 2.0, 1.0, 1.5, 1.0, 0.5, 200.0]  # mean output 4 x scale
    batches = iter([torch.full((2, 4), s, device=device) for s in scales])
    trainer = ClippingTrainer(lambda_loss(model), batches, torch.optim.SGD(model.parameters(), lr=0.0),
                              clip_norm=None, divergence_factor=100.0, divergence_window=5)
    with EventStorage():
        for trainer.iter in range(6):
            trainer.run_step()
        trainer.iter = 6
        with pytest.raises(FloatingPointError, match=r"iteration 6: the loss 800 is 200x its median over the last 5 "
                                                     r"steps \(SOLVER.DIVERGENCE.FACTOR 100\)"):
            trainer.run_step()
    assert [round(loss) for loss, _ in trainer._history] == [8, 4, 6, 4, 2]

    # with a learning rate: the step that grew is not applied
    moving = ClippingTrainer(lambda_loss(model), iter([torch.full((2, 4), s, device=device) for s in scales]),
                             torch.optim.SGD(model.parameters(), lr=0.01), divergence_factor=100.0, divergence_window=5)
    with EventStorage():
        for moving.iter in range(6):
            moving.run_step()
        before = model.weight.detach().clone()
        moving.iter = 6
        with pytest.raises(FloatingPointError, match="iteration 6: the loss"):
            moving.run_step()
    assert torch.equal(before, model.weight) and not torch.equal(before, torch.ones_like(before))

    quiet = ClippingTrainer(lambda_loss(model), iter([torch.full((2, 4), s, device=device) for s in [1.0, 1e4]]),
                            torch.optim.SGD(model.parameters(), lr=0.0), divergence_factor=100.0, divergence_window=5)
    with EventStorage():
        for quiet.iter in range(2):  # fewer steps than the window: nothing to compare with yet
            quiet.run_step()
