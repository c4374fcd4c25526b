"""EfficientNet pose networks, built exactly as the TUS-REC baseline builds them.

The baseline (``utils/network.py: build_model``) takes torchvision's EfficientNet, replaces the stem
convolution by one with ``in_frames`` input channels (same out channels, kernel, stride and padding;
``bias=model.features[0][0].bias``, which is None, i.e. no bias) and the last linear layer by one
with ``pred_dim`` outputs. Building it the same way keeps the parameter names and shapes identical,
so the baseline's released weights load here with ``strict=True``.
"""

from __future__ import annotations

import torch

from models.registry import register_model


def _adapt_efficientnet(model: torch.nn.Module, in_frames: int, pred_dim: int) -> torch.nn.Module:
    stem = model.features[0][0]
    model.features[0][0] = torch.nn.Conv2d(
        in_channels=in_frames,
        out_channels=stem.out_channels,
        kernel_size=stem.kernel_size,
        stride=stem.stride,
        padding=stem.padding,
        bias=False,  # the baseline passes stem.bias, which is None: no bias
    )
    model.classifier[1] = torch.nn.Linear(in_features=model.classifier[1].in_features, out_features=pred_dim)
    return model


@register_model("efficientnet_b0")
def efficientnet_b0(in_frames: int, pred_dim: int) -> torch.nn.Module:
    """EfficientNet-B0: [B, in_frames, H, W] frames in [0, 1] -> [B, pred_dim]."""
    from torchvision.models import efficientnet_b0 as tv_efficientnet_b0  # lazy: keeps `import models` cheap

    return _adapt_efficientnet(tv_efficientnet_b0(weights=None), in_frames, pred_dim)


@register_model("efficientnet_b1")
def efficientnet_b1(in_frames: int, pred_dim: int) -> torch.nn.Module:
    """EfficientNet-B1, the TUS-REC baseline network: [B, in_frames, H, W] in [0, 1] -> [B, pred_dim]."""
    from torchvision.models import efficientnet_b1 as tv_efficientnet_b1

    return _adapt_efficientnet(tv_efficientnet_b1(weights=None), in_frames, pred_dim)
