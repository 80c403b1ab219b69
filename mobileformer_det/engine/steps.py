"""The training step: Detectron2's ``SimpleTrainer`` / ``AMPTrainer`` with full-model gradient
clipping, stopping on divergence before the step is applied."""
import logging

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm

from .optimizer import clip_full_model

__all__ = ["ClippingTrainer", "ClippingAMPTrainer"]

logger = logging.getLogger("mobileformer_det.engine")


class _StopsOnNonFinite:
    """Stops training with ``FloatingPointError`` at the first step whose loss (or, without AMP,
    whose gradients) is not finite, before the optimizer applies it.

    The decision is the same on every process (one all-reduce of a flag per step), so that all of
    them stop at the same step instead of some waiting forever in the next collective. Under AMP,
    infinite gradients are the grad scaler's business (it skips the step and lowers its scale).
    The loss terms are read from the model's output by a forward hook.
    """

    def _watch_losses(self):
        self._losses = {}
        self.model.register_forward_hook(lambda module, inputs, output: setattr(
            self, "_losses", output if isinstance(output, dict) else {"total_loss": output}))  # as run_step reads it

    def _check_finite(self, grad_norm, amp):
        total = sum((v.detach().float().sum() for v in self._losses.values()), torch.zeros(()))
        bad = ~torch.isfinite(total)
        if not amp and grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm)
        flag = bad.float().reshape(1)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() == 0:
            return
        terms = sorted(self._losses.items(), key=lambda kv: bool(torch.isfinite(kv[1]).all()))
        shown = ", ".join(f"{k} {v.item():.4g}" for k, v in terms[:8]) + (" ..." if len(terms) > 8 else "")
        finite_grads = grad_norm is None or bool(torch.isfinite(grad_norm))
        where = "a non-finite loss" if not bool(torch.isfinite(total)) else (
            "non-finite gradients" if not finite_grads else "a non-finite loss on another process")
        norm = "not measured" if grad_norm is None else f"{float(grad_norm):.4g}"
        raise FloatingPointError(
            f"training diverged at iteration {self.iter}: {where} (gradient norm {norm}; loss terms on "
            f"this process: {shown}). This step was not applied, and no checkpoint is written from it. Lower "
            f"SOLVER.BASE_LR, keep SOLVER.CLIP_GRADIENTS.ENABLED on{', turn SOLVER.AMP.ENABLED off' if amp else ''}, "
            f"and train again, or --resume from a checkpoint written before the losses grew (see metrics.json)")


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


class ClippingTrainer(_StopsOnNonFinite, SimpleTrainer):
    """``SimpleTrainer`` that clips the norm of all gradients together to ``clip_norm`` after backward,
    and stops on a non-finite loss or gradient (:class:`_StopsOnNonFinite`)."""

    def __init__(self, model, data_loader, optimizer, clip_norm=None, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.clip_norm = clip_norm
        self._watch_losses()

    def after_backward(self):
        grad_norm = clip_full_model(self.optimizer, float("inf") if self.clip_norm is None else self.clip_norm)
        self._check_finite(grad_norm, amp=False)
        super().after_backward()

    def load_state_dict(self, state_dict):
        check_optimizer_state(self.optimizer, state_dict["optimizer"])
        super().load_state_dict(state_dict)


class ClippingAMPTrainer(_StopsOnNonFinite, AMPTrainer):
    """``AMPTrainer`` that clips the *unscaled* gradients, stops on a non-finite loss, and resumes
    from a checkpoint written without AMP (a CPU run has no grad-scaler state: the scaler then
    starts afresh)."""

    def __init__(self, model, data_loader, optimizer, clip_norm=None, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.clip_norm = clip_norm
        self._watch_losses()

    def after_backward(self):
        grad_norm = None
        if self.clip_norm is not None:
            # GradScaler.step then knows the gradients are unscaled (fused optimizers included).
            self.grad_scaler.unscale_(self.optimizer)
            grad_norm = clip_full_model(self.optimizer, self.clip_norm)
        self._check_finite(grad_norm, amp=True)
        super().after_backward()

    def load_state_dict(self, state_dict):
        check_optimizer_state(self.optimizer, state_dict["optimizer"])
        if "grad_scaler" in state_dict:
            return super().load_state_dict(state_dict)
        SimpleTrainer.load_state_dict(self, state_dict)
        logger.info("the checkpoint has no grad-scaler state (saved without AMP): the scaler starts afresh")
