"""The learned fidelity judge of the built-in benchmark: a small CNN that reads a 32 px
image's group (class and attribute), trained on group-balanced real renders of every
rendering and shipped in the package like the tiny models (``jobs/pretrain_tiny.py --phases
judge`` trains it; ``engine.stages.generate.fidelity.LearnedJudge`` reads with it).

A synthetic image it reads as its unit's group looks, to a model of the real images, like a
real image of that group: the judge knows the benchmark's images, not its drawing rules.
Its training renders are drawn from a seed stream of their own, and it is checked on
held-out renders of each rendering (``training.json``: at least 98% right on class and on
attribute). Blur and noise augmentations keep it reading smooth generated images the way it
reads noisy renders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import FairsynthError
from engine.stages.data import builtin

JUDGE_DIR = Path(__file__).resolve().parent / "tiny_judge"
WEIGHTS, CONFIG, REPORT = "model.safetensors", "config.json", "training.json"
N_CLASSES, N_ATTRIBUTES = len(builtin.CLASS_NAMES), len(builtin.ATTRIBUTE_NAMES)
IMAGE_SIZE = 32
WIDTHS = (32, 64, 128)
# The judge's seed streams, apart from every run's data (engine.stages.data.datasets draws from the run seed).
TRAIN_STREAM, HELDOUT_STREAM = 0x10D6E, 0x10D6F
# What a shipped judge must read right on held-out renders, on class and on attribute alike.
REQUIRED_ACCURACY = 0.98


def judge_path() -> Path:
    return JUDGE_DIR


def build_judge_model() -> torch.nn.Module:
    """TinyResNet with a group head (n_classes x n_attributes outputs)."""
    from engine.stages.train.backbones import Classifier, TinyResNet

    encoder = TinyResNet(WIDTHS)
    return Classifier(encoder, encoder.out_dim, N_CLASSES * N_ATTRIBUTES, (0.5,) * 3, (0.5,) * 3)


def balanced_renders(per_group: int, stream: int, renderings=tuple(builtin.RENDERINGS)) -> tuple[np.ndarray, np.ndarray]:
    """``per_group`` benchmark renders of every group, renderings and sub-types drawn at random:
    uint8 images [n, 32, 32, 3] and group ids."""
    rng = np.random.default_rng(stream)
    images, groups = [], []
    for group in range(N_CLASSES * N_ATTRIBUTES):
        label, attribute = divmod(group, N_ATTRIBUTES)
        objects, backgrounds = builtin.OBJECT_SUBTYPES[label], builtin.BACKGROUND_SUBTYPES[attribute]
        for _ in range(per_group):
            rendering = renderings[rng.integers(len(renderings))]
            obj, bg = objects[rng.integers(len(objects))], backgrounds[rng.integers(len(backgrounds))]
            images.append(builtin.render(obj, bg, int(rng.integers(0, 2**31 - 1)), "benchmark", IMAGE_SIZE, rendering))
            groups.append(group)
    return np.stack(images), np.array(groups, dtype=np.int64)


def _to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float().div(255.0)
    if x.shape[-1] != IMAGE_SIZE:
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur (a VAE's smoothness), noise, flips and small shifts."""
    n = len(x)
    sigma = torch.rand(n, generator=generator) * 1.2
    kernel = torch.arange(-2, 3, dtype=torch.float32)
    weights = torch.exp(-(kernel[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    weights = weights / weights.sum(1, keepdim=True)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    # Separable blur, per image: [n, 3, H, W+4] x [n, 5] along each axis.
    rows = sum(padded[..., :, i:i + x.shape[-1]] * weights[:, i, None, None, None] for i in range(5))
    x = sum(rows[..., i:i + x.shape[-2], :] * weights[:, i, None, None, None] for i in range(5))
    x = x + torch.randn(x.shape, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) * 0.06)
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    shift = [int(s) for s in torch.randint(-2, 3, (2,), generator=generator)]
    return torch.roll(x, shifts=shift, dims=(-2, -1)).clamp(0, 1)


def train_judge(out: Path, per_group: int = 4000, heldout_per_group: int = 500, steps: int = 3000,
                batch_size: int = 128, lr: float = 2e-3, seed: int = 0, progress=None) -> dict:
    """Train the judge, check it on held-out renders, and save it to ``out``; returns its report."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, groups = balanced_renders(per_group, TRAIN_STREAM)
    x_all, y_all = _to_input(images), torch.from_numpy(groups)
    model = build_judge_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    bar = progress(steps) if progress else range(steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(x_all), (batch_size,), generator=generator)
        logits, _ = model(_augment(x_all[index], generator))
        loss = F.cross_entropy(logits, y_all[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    report = {"steps": steps, "train_renders": int(len(images)), "final_loss": round(float(loss.detach()), 4),
              "heldout": heldout_accuracy(model, heldout_per_group)}
    save_judge(model, out, report)
    return report


@torch.no_grad()
def heldout_accuracy(model: torch.nn.Module, per_group: int) -> dict:
    """Class and attribute accuracy on fresh renders of each rendering."""
    out = {}
    for rendering in builtin.RENDERINGS:
        images, groups = balanced_renders(per_group, HELDOUT_STREAM, (rendering,))
        labels, attributes = read_groups(model, images)
        out[rendering] = {"class": float(np.mean(labels == groups // N_ATTRIBUTES)),
                          "attribute": float(np.mean(attributes == groups % N_ATTRIBUTES)),
                          "renders": int(len(images))}
    return out


@torch.no_grad()
def read_groups(model: torch.nn.Module, images, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(class, attribute) the judge reads in each image."""
    groups = []
    for start in range(0, len(images), batch_size):
        logits, _ = model(_to_input(np.stack([np.asarray(im) for im in images[start:start + batch_size]])))
        groups.append(logits.argmax(1).numpy())
    group = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    return group // N_ATTRIBUTES, group % N_ATTRIBUTES


def save_judge(model: torch.nn.Module, out: Path, report: dict) -> None:
    from safetensors.torch import save_file

    from engine.storage import atomic_local_directory

    with atomic_local_directory(Path(out)) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps({"widths": list(WIDTHS), "image_size": IMAGE_SIZE,
                                              "classes": list(builtin.CLASS_NAMES),
                                              "attributes": list(builtin.ATTRIBUTE_NAMES)}, indent=1))
        (tmp / REPORT).write_text(json.dumps(report, indent=1))
        for path in tmp.iterdir():
            path.chmod(0o644)


def load_judge(folder: Path | None = None) -> torch.nn.Module:
    from safetensors.torch import load_file

    folder = Path(folder or judge_path())
    if not (folder / WEIGHTS).is_file():
        raise FairsynthError(f"no learned judge in {folder}; train it with `python jobs/pretrain_tiny.py "
                             "--phases judge`, or set fidelity.judge=renderer")
    model = build_judge_model()
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.eval()
