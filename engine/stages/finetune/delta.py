"""Fully fine-tuned weights stored compactly: each trained layer's difference from the base
model, cut to its top singular directions (a truncated SVD per layer).

A DreamBooth unit of Stable Diffusion 1.5 changes all 860M UNet weights. Stored whole it is
1.7 GB in fp16 (3.4 GB in fp32), and a run trains tens of units. The change itself is close
to low rank, so per weight matrix ``W`` (a convolution as ``out x in*k*k``) the artifact keeps
``up @ down ~= W - W_base`` with ``up = U_r sqrt(S_r)`` and ``down = sqrt(S_r) V_r^T`` from the
best rank-``r`` approximation (Eckart-Young), ``r = finetune.delta_rank``, in fp16 (the
square-root split keeps both factors in fp16's normal range). A layer whose factors would not
be smaller than the matrix, and every vector (biases, norms), is kept whole, as an fp32
difference. Unchanged tensors are left out. Loading adds the differences to the base
model's weights in fp32, then casts to the model's dtype.

SD 1.5 at rank 128: about 271 MB per unit (``artifact_bytes`` counts it from the shapes;
``benchmarks/unit_artifact_size.py`` measures a saved one).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.errors import FairsynthError

FORMAT = "fairsynth-svd-delta-1"
DELTA_FILES = {"unet": "unet_delta.safetensors", "text_encoder": "text_encoder_delta.safetensors"}
UP, DOWN = ".up", ".down"
# fp16 factors, fp32 whole differences; the safetensors header costs about this per tensor.
FACTOR_BYTES, WHOLE_BYTES, HEADER_BYTES_PER_TENSOR = 2, 4, 96


def factor_rank(shape: tuple[int, ...], rank: int) -> int | None:
    """The rank a ``shape`` weight is stored at, or None when it is stored whole."""
    if len(shape) < 2:
        return None
    rows, cols = shape[0], math.prod(shape[1:])
    r = min(rank, rows, cols)
    # Factors in fp16 against the whole difference in fp32.
    return r if r * (rows + cols) * FACTOR_BYTES < rows * cols * WHOLE_BYTES else None


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of ``module``'s trainable weights: the base the difference is taken from."""
    return {
        name: param.detach().to("cpu", torch.float32, copy=True)
        for name, param in module.named_parameters() if param.requires_grad
    }


@torch.no_grad()
def extract(module: torch.nn.Module, base: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The stored form of ``module``'s change from ``base`` (see the module docstring)."""
    out = {}
    for name, param in module.named_parameters():
        if name not in base:
            continue
        delta = param.detach().float() - base[name].to(param.device)
        if not bool(delta.any()):
            continue
        r = factor_rank(tuple(delta.shape), rank)
        if r is None:
            out[name] = delta.cpu().contiguous()
            continue
        # SVD on the training device (seconds on a GPU for all of SD 1.5), in fp32.
        u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
        root = s[:r].sqrt()
        out[name + UP] = (u[:, :r] * root).to(torch.float16).cpu().contiguous()
        out[name + DOWN] = (root[:, None] * vh[:r]).to(torch.float16).cpu().contiguous()
    return out


def save(folder: Path, part: str, tensors: dict[str, torch.Tensor], rank: int) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / DELTA_FILES[part]
    save_file(tensors, path, metadata={"format": FORMAT, "rank": str(rank)})
    return path


def has_part(folder: Path, part: str) -> bool:
    return (Path(folder) / DELTA_FILES[part]).is_file()


def load(folder: Path, part: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    path = Path(folder) / DELTA_FILES[part]
    if not path.is_file():
        raise FairsynthError(f"missing {path}: the unit's weight differences; re-run the finetune stage")
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise FairsynthError(f"{path} is not a {FORMAT} file; delete the unit's folder and re-run the finetune stage")
        return {k: f.get_tensor(k) for k in f.keys()}


@torch.no_grad()
def apply(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str = "",
          scale: float = 1.0) -> torch.nn.Module:
    """Add the stored differences, times ``scale``, to ``module``'s weights in place (in fp32,
    cast back to each weight's dtype); returns ``module``."""
    params = dict(module.named_parameters())
    names = {k[: -len(UP)] if k.endswith(UP) else k[: -len(DOWN)] if k.endswith(DOWN) else k for k in tensors}
    for name in sorted(names):
        param = params.get(name)
        if param is None:
            raise FairsynthError(
                f"{where or 'weight differences'}: {name!r} is not a weight of the base model "
                "(trained on another base?); re-run the finetune stage"
            )
        if name in tensors:
            delta = tensors[name].float()
        else:
            delta = (tensors[name + UP].float() @ tensors[name + DOWN].float())
        if delta.numel() != param.numel():
            raise FairsynthError(
                f"{where or 'weight differences'}: {name!r} has {delta.numel()} values but the base model's has "
                f"{param.numel()} (trained on another base?); re-run the finetune stage"
            )
        delta = delta.reshape(param.shape).to(param.device)
        param.data = (param.data.float() + scale * delta).to(param.dtype)
    return module


def artifact_bytes(module: torch.nn.Module, rank: int) -> int:
    """Bytes a unit's differences of every weight of ``module`` take on disk (a model on the
    meta device will do: only shapes are read)."""
    total = 0
    for _, param in module.named_parameters():
        shape = tuple(param.shape)
        r = factor_rank(shape, rank)
        if r is None:
            total += param.numel() * WHOLE_BYTES + HEADER_BYTES_PER_TENSOR
        else:
            total += r * (shape[0] + math.prod(shape[1:])) * FACTOR_BYTES + 2 * HEADER_BYTES_PER_TENSOR
    return total
