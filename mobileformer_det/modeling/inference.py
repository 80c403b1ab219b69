"""Inference that computes the same function faster: batch norm folded into the convolutions, the
neck folded into the layers that read the memory, the backbone's maps in channels-last memory.
Training keeps the unfused modules."""
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .detr.factored_memory import MemoryLinear

__all__ = ["fold_neck", "fuse_conv_bn", "prepare_for_inference"]


def _folded(conv):
    norm = conv.norm
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
                                        norm.weight, norm.bias)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused.weight, fused.bias = nn.Parameter(weight.detach(), False), nn.Parameter(bias.detach(), False)
    return fused.to(conv.weight.device)


def fuse_conv_bn(module):
    """Replace every convolution followed by a batch norm (Detectron2's ``Conv2d`` with a ``.norm``
    of BatchNorm2d or FrozenBatchNorm2d, in eval mode) by one ``nn.Conv2d`` with the norm folded
    into its weights and bias. In place; returns ``module``."""
    for name, child in module.named_children():
        norm = getattr(child, "norm", None)
        if isinstance(child, nn.Conv2d) and isinstance(norm, (nn.BatchNorm2d, FrozenBatchNorm2d)) \
                and getattr(child, "activation", None) is None:
            if norm.training:
                raise ValueError("fuse_conv_bn needs the model in eval mode (batch norm on running statistics)")
            setattr(module, name, _folded(child))
        else:
            fuse_conv_bn(child)
    return module


def fold_neck(model):
    """Fold MF-DETR's neck (1x1 conv + LayerNorm per level, level embedding) into the linear layers
    that read the memory, the decoder's value projections and the two-stage proposal projection:
    they then read the backbone's maps directly (see ``detr/factored_memory.py``). Applies when
    there is no encoder (which would rewrite the memory); else leaves ``model`` as it is. Inference
    only: the folded model refuses to train. In place; returns ``model``."""
    transformer = model.transformer
    if len(transformer.encoder) or model.factored_memory:
        return model
    factors = model.neck.factorise(model.level_embed)
    for layer in transformer.decoder:
        layer.cross_attn.value_proj = MemoryLinear(layer.cross_attn.value_proj, factors)
    if transformer.two_stage:
        transformer.enc_output[0] = MemoryLinear(transformer.enc_output[0], factors)
    model.factored_memory = True
    return model


def prepare_for_inference(model, channels_last=True):
    """Eval mode, batch norm folded into the backbone's convolutions, the neck folded into the
    memory's readers (:func:`fold_neck`) and, with ``channels_last``, the backbone run in
    channels-last memory (faster convolutions on CPUs and GPUs; ONNX export does not want it).
    The outputs equal the plain model's to float rounding. In place; returns ``model``."""
    model.eval()
    fuse_conv_bn(model.backbone)
    fold_neck(model)
    if channels_last:
        model.backbone.to(memory_format=torch.channels_last)
        model.backbone.memory_format = torch.channels_last
    return model
