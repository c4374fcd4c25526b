"""ResNet pose networks: torchvision's ResNet with ``in_frames`` input channels and ``pred_dim`` outputs.

Adapted the way the baseline adapts its other torchvision backbones: the first convolution is
replaced by one with ``in_frames`` input channels (same out channels, kernel, stride, padding, no
bias) and ``fc`` by a linear layer with ``pred_dim`` outputs.
"""

from __future__ import annotations

import torch

from models.registry import register_model


@register_model("resnet18")
def resnet18(in_frames: int, pred_dim: int) -> torch.nn.Module:
    """ResNet-18: [B, in_frames, H, W] frames in [0, 1] -> [B, pred_dim]."""
    from torchvision.models import resnet18 as tv_resnet18  # lazy: keeps `import models` cheap

    model = tv_resnet18(weights=None)
    conv1 = model.conv1
    model.conv1 = torch.nn.Conv2d(
        in_channels=in_frames,
        out_channels=conv1.out_channels,
        kernel_size=conv1.kernel_size,
        stride=conv1.stride,
        padding=conv1.padding,
        bias=False,
    )
    model.fc = torch.nn.Linear(in_features=model.fc.in_features, out_features=pred_dim)
    return model
