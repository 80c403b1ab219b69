"""The optimizer and the gradient clipping of the training step."""
import torch
from detectron2.layers.batch_norm import LayerNorm as ChannelsFirstLayerNorm
from detectron2.solver.build import reduce_param_groups
from torch import nn

__all__ = ["build_optimizer", "clip_norm_from_config", "clip_full_model"]


# Detectron2's channels-first LayerNorm (the neck's) is not an nn.LayerNorm.
_NO_DECAY_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, ChannelsFirstLayerNorm, nn.Embedding)
_NO_DECAY_NAMES = ("bias", "in_proj_bias", "tokens", "level_embed")


def build_optimizer(cfg, model):
    """AdamW (or SGD) with ``SOLVER.BACKBONE_MULTIPLIER`` on the parameters of ``model.backbone``
    (Detectron2's meta architectures' attribute; a peer's property) and no weight decay on norms,
    biases, embeddings, global tokens and level embeddings.

    Parameters are grouped by (lr, weight decay) (Detectron2's ``reduce_param_groups``): a handful
    of groups, so that PyTorch's multi-tensor (foreach) or fused implementation does one pass per
    group instead of one per parameter. Gradient clipping is the step trainer's (see
    :class:`ClippingTrainer`), so that under AMP it sees unscaled gradients.
    """
    params, seen = [], set()
    backbone = set(model.backbone.parameters()) if isinstance(getattr(model, "backbone", None), nn.Module) else set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            lr = cfg.SOLVER.BASE_LR
            if param in backbone:
                lr *= cfg.SOLVER.BACKBONE_MULTIPLIER
            no_decay = isinstance(module, _NO_DECAY_MODULES) or name in _NO_DECAY_NAMES
            params.append({"params": [param], "lr": lr, "weight_decay": 0.0 if no_decay else cfg.SOLVER.WEIGHT_DECAY})
    groups = reduce_param_groups(params)

    # fused: one kernel for all parameters (CUDA; the CPU too since PyTorch 2.4); else foreach.
    device = next(model.parameters()).device.type
    fused = {"fused": True} if device == "cuda" or (device == "cpu" and _cpu_fused_adamw()) else {"foreach": True}
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        return torch.optim.AdamW(groups, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS), **fused)
    if name == "SGD":
        return torch.optim.SGD(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, **fused)
    raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")


def _cpu_fused_adamw():
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
        return True
    except (RuntimeError, ValueError):
        return False


def clip_norm_from_config(cfg):
    """The full-model gradient-norm limit, or None when clipping is off."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return None
    if clip.CLIP_TYPE != "full_model":
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be 'full_model' (the norm of all gradients "
                         f"together, as DETR clips), got {clip.CLIP_TYPE!r}")
    return clip.CLIP_VALUE


def clip_full_model(optimizer, max_norm):
    """Clip the norm of all the optimizer's gradients together to ``max_norm`` (``inf``: measure
    only). Returns their norm before clipping (a 0-dim tensor)."""
    return torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)
