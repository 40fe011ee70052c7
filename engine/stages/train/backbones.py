"""Classifier backbones, chosen by name: an encoder that maps images to features, plus a
linear head.

Every backbone takes float images in [0, 1] (NCHW) and normalises them itself, so the train
loop never needs to know which statistics a backbone expects. ``forward`` returns both the
logits and the encoder's features: the SupCon loss pulls features together, the head's
cross-entropy reads the logits, and last-layer fine-tuning freezes the encoder alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.errors import FairsynthError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Classifier(nn.Module):
    """encoder -> features -> head -> logits; input normalisation lives here too."""

    def __init__(self, encoder: nn.Module, feature_dim: int, n_classes: int, mean, std):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, n_classes)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder((images - self.mean) / self.std)
        return self.head(features), features


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """A three-stage ResNet for 32 px images (one basic block per stage, widths 16-32-64):
    about 0.08M parameters, a few minutes of training on two CPU cores. The stem halves the
    resolution first, as a ResNet's does; a full-resolution stem costs four times as much
    for little accuracy on 32 px images."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c_in = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(_BasicBlock(c_in, width, stride=1 if i == 0 else 2))
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def _load_state_dict(path: str) -> dict:
    file = Path(path)
    if not file.exists():
        raise FairsynthError(
            f"train.pretrained_weights {path} does not exist; point it at a local ImageNet weights file "
            "(.safetensors or .pth) or unset it to train from scratch"
        )
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            # weights_only: a pickled checkpoint must not be able to run code when loaded.
            state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FairsynthError(
            f"train.pretrained_weights {path} could not be read ({exc.__class__.__name__}); "
            "use a torchvision ResNet state dict saved as .safetensors or .pth"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _torchvision_resnet(name: str, n_classes: int, pretrained_weights: str | None) -> Classifier:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if pretrained_weights:
        state = {k: v for k, v in _load_state_dict(pretrained_weights).items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            shown = (missing or unexpected)[0]
            raise FairsynthError(
                f"train.pretrained_weights {pretrained_weights} does not fit torchvision {name} "
                f"(key {shown!r} is {'missing' if missing else 'unexpected'}); use weights for {name}"
            )
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if pretrained_weights else ((0.5,) * 3, (0.5,) * 3)
    return Classifier(net, feature_dim, n_classes, mean, std)


def tiny_resnet(n_classes: int, pretrained_weights: str | None = None) -> Classifier:
    if pretrained_weights:
        raise FairsynthError(
            "train.pretrained_weights is set but train.backbone is tiny_resnet, which has no "
            "pretrained weights; unset it or choose resnet18 / resnet50"
        )
    encoder = TinyResNet()
    return Classifier(encoder, encoder.out_dim, n_classes, (0.5,) * 3, (0.5,) * 3)


def resnet18(n_classes: int, pretrained_weights: str | None = None) -> Classifier:
    return _torchvision_resnet("resnet18", n_classes, pretrained_weights)


def resnet50(n_classes: int, pretrained_weights: str | None = None) -> Classifier:
    return _torchvision_resnet("resnet50", n_classes, pretrained_weights)


BACKBONES = {"tiny_resnet": tiny_resnet, "resnet18": resnet18, "resnet50": resnet50}


def build_classifier(name: str, n_classes: int, pretrained_weights: str | None = None) -> Classifier:
    if name not in BACKBONES:
        raise FairsynthError(f"unknown train.backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return BACKBONES[name](n_classes, pretrained_weights)
