"""MODEL_EMA: the moving average of the weights, evaluated, saved and loaded as the weights."""
import math
import os

import pytest
import torch
from torch import nn

from helpers import ROOT, toy_cfg
from mobileformer_det.checkpoint import MobileFormerCheckpointer
from mobileformer_det.ema import ModelEMA


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_average_against_a_hand_computation():
    model = _small_model()
    w0 = model[0].weight.detach().clone()
    ema = ModelEMA(model, decay=0.9, warmup_iters=2)
    steps = []
    for i in (1, 2):
        with torch.no_grad():
            model[0].weight.add_(float(i))
            model[1].running_mean.fill_(float(i))
        model[1].num_batches_tracked.fill_(10 * i)
        ema.update(model)
        steps.append(model[0].weight.detach().clone())
    d1, d2 = 0.9 * (1 - math.exp(-1 / 2)), 0.9 * (1 - math.exp(-2 / 2))
    expected = d2 * (d1 * w0 + (1 - d1) * steps[0]) + (1 - d2) * steps[1]
    torch.testing.assert_close(ema.state["0.weight"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ema.state["1.running_mean"], torch.full((2,), d2 * (1 - d1) * 1 + (1 - d2) * 2))
    assert ema.state["1.num_batches_tracked"].item() == 20  # integers are copied, not averaged

    own = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied(model):
        torch.testing.assert_close(model[0].weight, ema.state["0.weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k]), k

    restored = ModelEMA(_small_model(), 0.9, 2)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 2 and restored.restored and abs(restored.factor() - ema.factor()) < 1e-12
    with pytest.raises(ValueError, match="MODEL_EMA.DECAY"):
        ModelEMA(model, decay=1.0, warmup_iters=0)


def test_training_evaluates_saves_and_loads_the_average(tmp_path):
    """Three steps of the toy recipe with MODEL_EMA: the evaluation at the end sees the average and
    the model gets its own weights back; model_final.pth holds both; loading it as weights (eval,
    demo, export, fine-tuning) gives the average, resuming gives each its own."""
    from detectron2.modeling import build_model

    from mobileformer_det.data import register_datasets_from_config
    from mobileformer_det.engine import Trainer

    cfg = toy_cfg("DATASETS.TOY_ROOT", os.path.join(ROOT, "datasets", "toy_coco"), "OUTPUT_DIR", str(tmp_path),
                  "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 3, "TEST.EVAL_PERIOD", 0, "DATALOADER.NUM_WORKERS", 0,
                  "MODEL_EMA.ENABLED", True, "MODEL_EMA.DECAY", 0.5, "MODEL_EMA.WARMUP_ITERS", 0)
    register_datasets_from_config(cfg)
    evaluated = []

    class Recording(Trainer):
        @classmethod
        def test(cls, cfg, model, evaluators=None):
            evaluated.append({k: v.clone() for k, v in model.state_dict().items()})
            return {}

    trainer = Recording(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    average = trainer.model_ema.state
    assert trainer.model_ema.updates == 3 and len(evaluated) == 1
    for k, v in evaluated[0].items():
        assert torch.equal(v, average[k]), k
    differ = [k for k, v in trainer.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, average[k])]
    assert differ, "after 3 steps at decay 0.5 the average differs from the weights"

    saved = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert saved["ema"]["updates"] == 3
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(saved["model"][k], v), k  # the training weights, put back after evaluation

    as_weights = build_model(cfg)
    MobileFormerCheckpointer(as_weights, variant="mf52").load(str(tmp_path / "model_final.pth"))
    for k, v in as_weights.state_dict().items():
        assert torch.equal(v, average[k]), k

    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.model_ema.restored and resumed.model_ema.updates == 3
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, saved["model"][k]), k
        assert torch.equal(resumed.model_ema.state[k], average[k]), k

    tune = cfg.clone()
    tune.OUTPUT_DIR, tune.MODEL.WEIGHTS = str(tmp_path / "tune"), str(tmp_path / "model_final.pth")
    fine_tuned = Trainer(tune)
    fine_tuned.resume_or_load(resume=False)
    assert fine_tuned.model_ema.updates == 0
    for k, v in fine_tuned.model.state_dict().items():
        assert torch.equal(v, average[k]) and torch.equal(fine_tuned.model_ema.state[k], average[k]), k
