"""Small building blocks shared by the Mobile-Former modules."""
import math

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d, get_norm
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


def conv_norm(in_channels, out_channels, kernel_size, stride=1, groups=1, norm="BN"):
    """A bias-free convolution followed by a normalisation layer (``.norm``), "same" padding."""
    return Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
        groups=groups, bias=False, norm=get_norm(norm, out_channels),
    )


def valid_mask(image_sizes, stride, height, width):
    """Which positions of a stride-``stride`` map of a padded batch lie inside each image.

    Args:
        image_sizes: ``[N, 2]`` int tensor, (h, w) of each image before padding.
        stride: the map's stride; a stride-s map of an h-pixel image has ceil(h / s) valid rows.
    Returns:
        ``[N, 1, height, width]`` bool, True inside the image.
    """
    # sizes are not negative, so truncation is the floor: exported as one Div, where "floor" adds
    # the sign corrections of a floor division of negative integers
    valid = torch.div(image_sizes + stride - 1, stride, rounding_mode="trunc")
    rows = torch.arange(height, device=image_sizes.device)[None, :] < valid[:, :1]
    cols = torch.arange(width, device=image_sizes.device)[None, :] < valid[:, 1:]
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def zero_padding(x, mask):
    """``x * mask`` (``mask`` ``[N, 1, H, W]``, 1 or True inside the image): padded positions set to 0,
    as a convolution's own zero padding would see them."""
    return x if mask is None else x * mask.to(x.dtype)


def channel_shuffle(x, groups):
    """ShuffleNet's channel shuffle: ``[N, g*k, H, W]`` viewed as ``[N, g, k, H, W]``, transposed to k-major."""
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last):  # keep the memory format
        nhwc = x.permute(0, 2, 3, 1).reshape(n, h, w, groups, c // groups).transpose(3, 4)
        return nhwc.reshape(n, h, w, c).permute(0, 3, 1, 2)
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or with ``p == 0``)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self):
        return f"p={self.p}"


class DynamicReLU(nn.Module):
    """Dynamic ReLU (k=2) whose per-channel slopes come from global token 0.

    ``y = max(a1 * x, a2 * x)`` with ``[a1, a2] = 2 * (h_sigmoid(MLP(token_0)) - 0.5) + [1, 0]``,
    so ``a1`` lies in [0, 2] and ``a2`` in [-1, 1]. With the reference initialisation (small
    weights, zero bias) the MLP outputs ~0, h_sigmoid gives 0.5, and the layer starts as a ReLU.

    Args:
        channels: C, the channels of the feature map it activates.
        token_dim: d, the width of the global tokens.
        reduction: the MLP is d -> d/reduction -> 2C.
    """

    def __init__(self, channels, token_dim, reduction=4):
        super().__init__()
        self.channels = channels
        self.fc1 = nn.Linear(token_dim, token_dim // reduction)
        self.fc2 = nn.Linear(token_dim // reduction, 2 * channels)

    def forward(self, x, tokens):
        """
        Args:
            x: ``[N, C, H, W]`` feature map.
            tokens: ``[N, M, d]`` global tokens; token 0 drives the coefficients.
        Returns:
            ``[N, C, H, W]``.
        """
        coeffs = F.hardsigmoid(self.fc2(F.relu(self.fc1(tokens[:, 0]))))
        coeffs = coeffs[:, :, None, None].to(x.dtype)
        a1 = (coeffs[:, : self.channels] - 0.5) * 2.0 + 1.0
        a2 = (coeffs[:, self.channels :] - 0.5) * 2.0
        return torch.maximum(x * a1, x * a2)


def init_reference_weights(module):
    """The reference implementation's initialisation, applied to every sub-module.

    Convolutions: N(0, sqrt(2 / (k*k*out_channels))), zero bias; BatchNorm2d: weight 1, bias 0;
    Linear: N(0, 0.01), zero bias. Tokens and LayerNorms keep their own initialisation.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


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
