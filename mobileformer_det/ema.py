"""An exponential moving average of the detector's weights (``MODEL_EMA``), as D-FINE, DEIM and
RT-DETR train with: evaluation and the saved checkpoints' inference weights are the average.

The decay ramps up as D-FINE's ``ModelEMA`` does, ``DECAY * (1 - exp(-updates / WARMUP_ITERS))``,
so that the first averages are not dominated by the random initial weights. Every floating-point
entry of the state dict is averaged (BatchNorm statistics included, as there); integer ones
(``num_batches_tracked``) are copied.
"""
import contextlib
import math

import torch
from detectron2.engine import hooks

__all__ = ["ModelEMA", "EMAHook"]


class ModelEMA:
    """The averaged state dict of a model, updated after each optimizer step.

    It is a checkpointable (``state_dict``/``load_state_dict``): the trainer's checkpoints hold it
    under ``"ema"``, so that ``--resume`` continues the average where it stopped.
    """

    def __init__(self, model, decay, warmup_iters):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MODEL_EMA.DECAY must be in [0, 1), got {decay}")
        self.decay, self.warmup_iters = decay, warmup_iters
        self.restored = False
        self.reset(model)

    def reset(self, model):
        """Start the average afresh from ``model``'s current weights."""
        self.updates = 0
        self._set_state({k: v.detach().clone() for k, v in model.state_dict().items()})

    def _set_state(self, state):
        self.state = state
        self._floats = [k for k, v in state.items() if v.is_floating_point()]
        self._others = [k for k, v in state.items() if not v.is_floating_point()]

    def factor(self):
        """The decay of the next update: ``DECAY`` ramped up over ``WARMUP_ITERS`` updates."""
        if self.warmup_iters <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-self.updates / self.warmup_iters))

    @torch.no_grad()
    def update(self, model):
        """``ema = d * ema + (1 - d) * weights`` with ``d = factor()`` after ``updates + 1`` steps."""
        self.updates += 1
        d = self.factor()
        current = model.state_dict()
        torch._foreach_lerp_([self.state[k] for k in self._floats], [current[k].detach() for k in self._floats], 1.0 - d)
        for k in self._others:
            self.state[k].copy_(current[k])

    @contextlib.contextmanager
    def applied(self, model):
        """Within the block, ``model`` holds the averaged weights; its own ones are put back after."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield model
        finally:
            model.load_state_dict(own)

    def state_dict(self):
        return {"model": self.state, "updates": self.updates}

    def load_state_dict(self, state):
        missing = set(self.state) - set(state["model"])
        if missing:
            raise ValueError(f"the checkpoint's EMA weights lack {len(missing)} of the model's entries "
                             f"({', '.join(sorted(missing)[:4])}): it was saved by another model")
        self._set_state({k: v.to(self.state[k].device) for k, v in state["model"].items() if k in self.state})
        self.updates = int(state["updates"])
        self.restored = True


class EMAHook(hooks.HookBase):
    """Updates a :class:`ModelEMA` after every training step.

    Register it before the evaluation hook: the evaluation of a step then sees that step's average.
    Every process updates its own copy from identical weights (DistributedDataParallel keeps them
    equal): no communication.
    """

    def __init__(self, ema, model):
        self.ema, self._model = ema, model

    def after_step(self):
        self.ema.update(self._model)
