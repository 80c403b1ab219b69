"""The training step: Detectron2's ``SimpleTrainer`` / ``AMPTrainer`` with full-model gradient
clipping, stopping on divergence before the step is applied."""
import collections
import logging
import math
import statistics

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm

from .optimizer import clip_full_model

__all__ = ["ClippingTrainer", "ClippingAMPTrainer"]

logger = logging.getLogger("mobileformer_det.engine")


class _StopsOnDivergence:
    """Stops training with ``FloatingPointError`` before the optimizer applies a step whose loss (or,
    without AMP, whose gradients) is not finite, or whose loss or gradient norm is more than
    ``factor`` times its median over this process's last ``window`` steps (a divergence that stays
    finite for a while: weights growing towards 1e6 with a finite loss).

    The decision is the same on every process (one all-reduce of a flag per step), so that all of
    them stop at the same step instead of some waiting forever in the next collective. Under AMP,
    infinite gradients are the grad scaler's business (it skips the step and lowers its scale). The
    loss terms are read from the model's output by a forward hook.
    """

    def _watch_losses(self, factor=0.0, window=100):
        self._losses = {}
        self._factor = factor
        self._history = collections.deque(maxlen=max(1, window))  # (loss, gradient norm) of the steps applied
        self.model.register_forward_hook(lambda module, inputs, output: setattr(
            self, "_losses", output if isinstance(output, dict) else {"total_loss": output}))  # as run_step reads it

    def _check_step(self, grad_norm, amp):
        total = sum((v.detach().float().sum() for v in self._losses.values()), torch.zeros(()))
        norm = torch.full((), float("nan")) if grad_norm is None else grad_norm.detach().float()
        loss, norm = torch.stack([total, norm.to(total.device)]).tolist()  # one transfer to the host
        nonfinite = not math.isfinite(loss) or (not amp and grad_norm is not None and not math.isfinite(norm))
        grew = None if nonfinite else self._growth(loss, norm)
        flag = torch.tensor([2.0 if nonfinite else 1.0 if grew else 0.0], device=total.device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() == 0:
            self._history.append((loss, norm))
            return
        terms = sorted(self._losses.items(), key=lambda kv: bool(torch.isfinite(kv[1]).all()))
        shown = ", ".join(f"{k} {v.item():.4g}" for k, v in terms[:8]) + (" ..." if len(terms) > 8 else "")
        if flag.item() == 2:
            where = "a non-finite loss" if not math.isfinite(loss) else (
                "non-finite gradients" if nonfinite else "a non-finite loss on another process")
        else:
            where = grew or "a loss or gradient norm that grew on another process"
        measured = "not measured" if grad_norm is None else f"{norm:.4g}"
        raise FloatingPointError(
            f"training diverged at iteration {self.iter}: {where} (gradient norm {measured}; loss terms on "
            f"this process: {shown}). This step was not applied, and no checkpoint is written from it. Lower "
            f"SOLVER.BASE_LR, keep SOLVER.CLIP_GRADIENTS.ENABLED on{', turn SOLVER.AMP.ENABLED off' if amp else ''}, "
            f"and train again, or --resume from a checkpoint written before the losses grew (see metrics.json)")

    def _growth(self, loss, norm):
        """What grew beyond ``factor`` times its median over the full window, in words (None: nothing)."""
        if self._factor <= 0 or len(self._history) < self._history.maxlen:
            return None
        for name, value, past in (("the loss", loss, [h[0] for h in self._history]),
                                  ("the gradient norm", norm, [h[1] for h in self._history])):
            median = statistics.median(past)
            if math.isfinite(value) and median > 0 and value > self._factor * median:
                return (f"{name} {value:.4g} is {value / median:.0f}x its median over the last {len(past)} steps "
                        f"(SOLVER.DIVERGENCE.FACTOR {self._factor:g})")
        return None


def check_optimizer_state(optimizer, state_dict):
    """Raise ``ValueError`` naming the cause and the fix when a checkpoint's optimizer state does not
    fit ``optimizer`` (torch's own message names neither)."""
    saved = [len(g["params"]) for g in state_dict["param_groups"]]
    ours = [len(g["params"]) for g in optimizer.param_groups]
    if saved != ours:
        raise ValueError(
            f"the checkpoint's optimizer state holds parameter groups of {saved} parameters, this run's optimizer "
            f"{ours}. Parameters that share a learning rate and weight decay share a group: a SOLVER.BACKBONE_MULTIPLIER "
            f"or SOLVER.WEIGHT_DECAY that makes the backbone's rate equal to the rest's (or no longer equal), or "
            f"another MODEL.MOBILEFORMER.FREEZE_AT, changes the groups. Resume with the values the checkpoint was "
            f"written with (changes that keep the groups, e.g. 0.1 -> 0.2, apply on resume), or start a new "
            f"training from its weights (MODEL.WEIGHTS <checkpoint>, without --resume)")


class ClippingTrainer(_StopsOnDivergence, SimpleTrainer):
    """``SimpleTrainer`` that clips the norm of all gradients together to ``clip_norm`` after backward,
    and stops on a non-finite loss or gradient, or one that grew ``divergence_factor`` times its
    median over ``divergence_window`` steps (:class:`_StopsOnDivergence`; factor 0: off)."""

    def __init__(self, model, data_loader, optimizer, clip_norm=None, divergence_factor=0.0, divergence_window=100,
                 **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.clip_norm = clip_norm
        self._watch_losses(divergence_factor, divergence_window)

    def after_backward(self):
        grad_norm = clip_full_model(self.optimizer, float("inf") if self.clip_norm is None else self.clip_norm)
        self._check_step(grad_norm, amp=False)
        super().after_backward()

    def load_state_dict(self, state_dict):
        check_optimizer_state(self.optimizer, state_dict["optimizer"])
        super().load_state_dict(state_dict)


class ClippingAMPTrainer(_StopsOnDivergence, AMPTrainer):
    """``AMPTrainer`` that clips the *unscaled* gradients, stops on a non-finite loss, and resumes
    from a checkpoint written without AMP (a CPU run has no grad-scaler state: the scaler then
    starts afresh)."""

    def __init__(self, model, data_loader, optimizer, clip_norm=None, divergence_factor=0.0, divergence_window=100,
                 **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.clip_norm = clip_norm
        self._watch_losses(divergence_factor, divergence_window)

    def after_backward(self):
        grad_norm = None
        if self.clip_norm is not None:
            # GradScaler.step then knows the gradients are unscaled (fused optimizers included).
            self.grad_scaler.unscale_(self.optimizer)
            grad_norm = clip_full_model(self.optimizer, self.clip_norm)
        self._check_step(grad_norm, amp=True)
        super().after_backward()

    def load_state_dict(self, state_dict):
        check_optimizer_state(self.optimizer, state_dict["optimizer"])
        if "grad_scaler" in state_dict:
            return super().load_state_dict(state_dict)
        SimpleTrainer.load_state_dict(self, state_dict)
        logger.info("the checkpoint has no grad-scaler state (saved without AMP): the scaler starts afresh")
