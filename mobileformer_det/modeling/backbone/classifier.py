"""The ImageNet classifier of Mobile-Former, built from the same trunk as the detection backbone."""
import torch
import torch.nn.functional as F
from torch import nn

from .layers import channel_shuffle, conv_norm, init_reference_weights
from .mobile_former import VARIANTS, MobileFormer

__all__ = ["ClassifierHead", "MobileFormerClassifier", "mobile_former_classifier"]


class ClassifierHead(nn.Module):
    """1x1 conv to ``6 * C`` + BN + ReLU6, global average pool + h_swish, concatenated with token 0,
    FC + BN1d + h_swish, dropout, FC to the classes."""

    def __init__(self, in_channels, token_dim, hidden, num_classes, groups=1, expand=6, dropout=0.0):
        super().__init__()
        self.groups = groups
        self.conv = conv_norm(in_channels, in_channels * expand, 1, groups=groups)
        self.fc = nn.Linear(in_channels * expand + token_dim, hidden)
        self.fc_norm = nn.BatchNorm1d(hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x, tokens):
        """
        Args:
            x: ``[N, C, H, W]`` last feature map.
            tokens: ``[N, M, d]`` tokens after the final Mobile->Former.
        Returns:
            logits ``[N, num_classes]``.
        """
        if self.groups > 1:
            x = channel_shuffle(x, self.groups)
        x = F.hardswish(F.relu6(self.conv(x)).mean(dim=(2, 3)))
        x = torch.cat([x, tokens[:, 0].to(x.dtype)], dim=1)
        x = F.hardswish(self.fc_norm(self.fc(x)))
        return self.classifier(self.dropout(x))


class MobileFormerClassifier(nn.Module):
    """``backbone`` (a :class:`MobileFormer`) + ``head`` (a :class:`ClassifierHead`).

    ``forward(images [N, 3, H, W])`` returns logits ``[N, num_classes]``. The state_dict keys of
    ``backbone.*`` are the ones the detector's backbone has, so one converted checkpoint serves both.
    """

    def __init__(self, variant, num_classes=1000, dropout=0.0, drop_path=0.0):
        super().__init__()
        spec = VARIANTS[variant]
        self.variant = variant
        self.backbone = MobileFormer(spec, out_features=(), drop_path=drop_path)
        self.head = ClassifierHead(
            self.backbone.num_channels, spec.token_dim, spec.head_hidden, num_classes,
            groups=spec.groups, dropout=dropout,
        )
        init_reference_weights(self.head)

    def forward(self, images):
        _, x, tokens = self.backbone.forward_features(images)
        return self.head(x, tokens)


def mobile_former_classifier(variant, num_classes=1000, dropout=0.0, drop_path=0.0):
    """Build the ImageNet classifier of a variant (``mf26 mf52 mf96 mf151 mf214 mf294 mf508``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown Mobile-Former variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return MobileFormerClassifier(variant, num_classes, dropout, drop_path)
