"""Image/text encoders for clustering and CLIP-score filtering, behind one interface.

``load_encoder(spec)`` picks the implementation by name or path:

- ``"tiny"`` (or the shipped folder): :class:`TinyClipEncoder`, a small contrastive CNN/bag-of-
  words model trained by ``jobs/pretrain_tiny.py`` on the built-in base corpus; offline, CPU.
- anything else: :class:`ClipEncoder`, a transformers ``CLIPModel`` from a local folder or a
  hub id (safetensors only, fp16 on CUDA), or ``random:clip-vit-l14[:width=<w>]``: CLIP
  ViT-L/14's shapes with seeded random weights (``engine.models.shapes``).

Both return L2-normalised float32 numpy embeddings, so cosine similarity is a dot product.
This module also owns the tiny model's definition and training step, so that the job that
trains it and the encoder that loads it share one architecture.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import FairsynthError
from engine.models.tiny import tiny_clip_path
from engine.models.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE, build_clip_tokenizer

logger = logging.getLogger(__name__)

TINY_CLIP_CONFIG = "config.json"
TINY_CLIP_WEIGHTS = "model.safetensors"


@runtime_checkable
class ImageTextEncoder(Protocol):
    """Embeds images and texts into one space; rows are L2-normalised float32."""

    dim: int
    device: str

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [n, H, W, 3] -> float32 [n, dim]."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """n strings -> float32 [n, dim]."""
        ...


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise FairsynthError(
            f"encode_images got an array of shape {images.shape} and dtype {images.dtype}; "
            "expected uint8 [n, H, W, 3]"
        )
    return images


def _normalised(x: torch.Tensor) -> np.ndarray:
    return F.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- tiny model


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyClipModel(nn.Module):
    """A CNN image tower at 32 px and a bag-of-tokens text tower over the CLIP vocabulary."""

    def __init__(self, embed_dim: int = 64, width: int = 24, token_dim: int = 32,
                 image_size: int = 32, vocab_size: int = VOCAB_SIZE):
        super().__init__()
        self.config = dict(architecture="tiny_clip", embed_dim=embed_dim, width=width,
                           token_dim=token_dim, image_size=image_size, vocab_size=vocab_size,
                           context_length=MODEL_MAX_LENGTH)
        w = width
        self.image_tower = nn.Sequential(
            _conv(3, w),
            _conv(w, 2 * w, stride=2), _conv(2 * w, 2 * w),
            _conv(2 * w, 4 * w, stride=2), _conv(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, embed_dim),
        )
        self.token_embedding = nn.Embedding(vocab_size, token_dim)
        self.text_tower = nn.Sequential(
            nn.Linear(token_dim, 4 * token_dim), nn.GELU(), nn.Linear(4 * token_dim, embed_dim)
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """float [n, 3, H, W] in [-1, 1] -> unit vectors [n, embed_dim]."""
        return F.normalize(self.image_tower(pixels), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, content_mask: torch.Tensor) -> torch.Tensor:
        """Token ids [n, L] and a mask of the word tokens (no start/end/padding) -> unit vectors."""
        mask = content_mask.float().unsqueeze(-1)
        pooled = (self.token_embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(self.text_tower(pooled), dim=-1)


def pixels_from_uint8(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float [n, 3, size, size] in [-1, 1]."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.div(127.5).sub(1.0)


def tokenize_for_tiny_clip(tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(list(texts), padding="max_length", max_length=MODEL_MAX_LENGTH,
                      truncation=True, return_tensors="pt")
    ids = batch.input_ids
    content = batch.attention_mask.bool() & (ids != tokenizer.bos_token_id) & (ids != tokenizer.eos_token_id)
    return ids, content


class TinyClipEncoder:
    """The shipped tiny CLIP (``load_encoder("tiny")``)."""

    def __init__(self, folder: str | Path | None = None, device: str | None = None):
        from safetensors.torch import load_file

        folder = Path(folder) if folder is not None else tiny_clip_path()
        config_path, weights_path = folder / TINY_CLIP_CONFIG, folder / TINY_CLIP_WEIGHTS
        if not config_path.is_file() or not weights_path.is_file():
            raise FairsynthError(
                f"tiny CLIP folder {folder} lacks {TINY_CLIP_CONFIG} or {TINY_CLIP_WEIGHTS}; "
                "expected the output of `python jobs/pretrain_tiny.py --phases clip`"
            )
        config = json.loads(config_path.read_text())
        if config.get("architecture") != "tiny_clip":
            raise FairsynthError(
                f"{config_path} has architecture {config.get('architecture')!r}; expected 'tiny_clip'"
            )
        kwargs = {k: config[k] for k in ("embed_dim", "width", "token_dim", "image_size", "vocab_size")}
        self.model = TinyClipModel(**kwargs)
        state = load_file(weights_path)
        self.model.load_state_dict({k: v.float() for k, v in state.items()})
        self.device = device or "cpu"
        self.model.to(self.device).eval()
        self.dim = int(config["embed_dim"])
        self.image_size = int(config["image_size"])
        self.tokenizer = build_clip_tokenizer()

    @torch.inference_mode()
    def encode_images(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        images = _check_images(images)
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(images), batch_size):
            x = pixels_from_uint8(images[i : i + batch_size], self.image_size).to(self.device)
            out.append(_normalised(self.model.encode_image(x)))
        return np.concatenate(out)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise FairsynthError(f"encode_texts got a string {texts!r}; expected a list of strings")
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        ids, content = tokenize_for_tiny_clip(self.tokenizer, texts)
        return _normalised(self.model.encode_text(ids.to(self.device), content.to(self.device)))


def save_tiny_clip(model: TinyClipModel, folder: str | Path, extra: dict | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (the token table in fp16: it is most of
    the file, and fp16 is ample for it)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state["token_embedding.weight"] = state["token_embedding.weight"].half()
    save_file(state, folder / TINY_CLIP_WEIGHTS, metadata={"format": "pt"})
    (folder / TINY_CLIP_CONFIG).write_text(json.dumps({**model.config, **(extra or {})}, indent=1))
    return folder


# --------------------------------------------------------------------------- tiny training


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Photometric and geometric noise on uint8-range float images [n, 3, H, W].

    Stands in for what the benchmark style adds to the flat base style: per-image colour shifts,
    shading, texture-like ripples, pixel noise, and objects without the dark outline.
    """
    n, _, h, w = x.shape
    r = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    # Erase the dark outline on half the images: outline pixels take their brightest neighbour.
    outline = (x == 15).all(dim=1, keepdim=True) & (r(n, 1, 1, 1) < 0.5)
    filled = F.max_pool2d(x.masked_fill(outline, 0.0), 3, stride=1, padding=1)
    x = torch.where(outline, filled, x)
    # Shift by up to 3 pixels.
    pad = 3
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = (torch.randint(0, 2 * pad + 1, (n,), generator=gen) for _ in range(2))
    x = torch.stack([xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    yy = torch.linspace(-1, 1, h).view(1, 1, h, 1)
    xx = torch.linspace(-1, 1, w).view(1, 1, 1, w)
    # Brightness, contrast, a vertical shading gradient.
    x = x * (0.8 + 0.4 * r(n, 1, 1, 1)) * (1.0 + 0.3 * (r(n, 1, 1, 1) - 0.5) * yy)
    # Per-channel colour shift.
    x = x + 50.0 * (r(n, 3, 1, 1) - 0.5)
    # Ripples at random frequency and orientation on half the images.
    freq = 2 * math.pi * (1.0 + 5.0 * r(n, 1, 1, 1))
    theta = math.pi * r(n, 1, 1, 1)
    phase = 2 * math.pi * r(n, 1, 1, 1)
    ripple = torch.sin(freq * (torch.cos(theta) * xx + torch.sin(theta) * yy) + phase)
    x = x + (r(n, 1, 1, 1) < 0.5) * 30.0 * r(n, 1, 1, 1) * ripple
    # Gaussian pixel noise with a random strength.
    x = x + 14.0 * r(n, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    return x.clamp(0.0, 255.0)


def _caption_vocabulary():
    """Every training text, with which (object, background) pairs it describes."""
    from engine.stages.data.builtin import (
        ATTRIBUTE_NAMES,
        BACKGROUND_ATTRIBUTE,
        BACKGROUNDS,
        CLASS_NAMES,
        OBJECT_CLASS,
        OBJECTS,
    )

    objects = [(name, lambda o, name=name: o == name) for name in OBJECTS]
    objects += [(name, lambda o, c=c: OBJECT_CLASS[o] == c) for c, name in enumerate(CLASS_NAMES)]
    backgrounds = [(name, lambda b, name=name: b == name) for name in BACKGROUNDS]
    backgrounds += [(name, lambda b, a=a: BACKGROUND_ATTRIBUTE[b] == a)
                    for a, name in enumerate(ATTRIBUTE_NAMES)]
    backgrounds += [(None, lambda b: True)]
    texts, matches = [], []
    for oname, ofit in objects:
        for bname, bfit in backgrounds:
            texts.append(f"a photo of a {oname}" + (f" on {bname}" if bname else ""))
            matches.append([[ofit(o) and bfit(b) for b in BACKGROUNDS] for o in OBJECTS])
    # Texts without a precise background are drawn more often: the object must dominate the
    # embedding, since clustering looks for object sub-types within a background family.
    weights = [(0.7 if oname in OBJECTS else 0.3) * (0.3 if bname in BACKGROUNDS else
               0.2 if bname else 0.5) for oname, _ in objects for bname, _ in backgrounds]
    return texts, torch.tensor(matches), torch.tensor(weights)


def _supcon(emb: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss: pull together images with the same label."""
    logits = emb @ emb.T / temperature
    eye = torch.eye(len(emb), dtype=torch.bool)
    logits = logits.masked_fill(eye, -1e9)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = logits.log_softmax(1)
    per_anchor = -(log_prob * positive).sum(1) / positive.sum(1).clamp(min=1)
    return per_anchor[positive.any(1)].mean()


def train_tiny_clip(corpus, out: str | Path, steps: int = 1500, batch_size: int = 96,
                    lr: float = 2e-3, seed: int = 0, supcon_weight: float = 0.5,
                    progress: Callable[[int], object] | None = None,
                    max_minutes: float | None = None) -> dict:
    """Train a :class:`TinyClipModel` on a captioned base corpus and save it to ``out``.

    Contrastive with several positives: every text that truly describes an image (its object
    or class word, with its background, background family or none) counts as a match; plus a
    supervised contrastive term between images of the same object sub-type, so that images
    cluster by sub-type whatever their background and rendering noise.
    """
    import time

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    texts, matches, text_weights = _caption_vocabulary()
    ids, content = tokenize_for_tiny_clip(tokenizer, texts)
    images = torch.from_numpy(corpus.images).permute(0, 3, 1, 2).float()
    obj = torch.as_tensor(corpus.object_index)
    bg = torch.as_tensor(corpus.background_index)
    model = TinyClipModel()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    bar = progress(steps) if progress is not None else range(steps)
    start, done, loss = time.monotonic(), 0, torch.tensor(float("nan"))
    for step in bar:
        frac = step / steps
        if max_minutes is not None:
            frac = max(frac, (time.monotonic() - start) / (60.0 * max_minutes))
        if frac >= 1.0:
            break
        warm = min(1.0, (step + 1) / 100)
        for g in opt.param_groups:
            g["lr"] = lr * warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = _augment(images[idx], gen).div(127.5).sub(1.0)
        t = torch.multinomial(text_weights * matches[:, obj[idx], bg[idx]].T.float(), 1,
                              generator=gen).squeeze(1)
        img = model.encode_image(x)
        txt = model.encode_text(ids[t], content[t])
        logits = model.logit_scale.exp().clamp(max=100.0) * img @ txt.T
        target = matches[t][:, obj[idx], bg[idx]].T.float()  # [image, text]
        loss_i = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        loss_t = -(target / target.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
        loss = 0.5 * (loss_i + loss_t) + supcon_weight * _supcon(img, obj[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if hasattr(bar, "set_postfix") and step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if hasattr(bar, "close"):
        bar.close()
    model.eval()
    stats = {"steps": done, "batch_size": batch_size, "final_loss": round(float(loss.item()), 4),
             "seed": seed, "corpus_size": len(images)}
    save_tiny_clip(model, out, extra={"training": stats})
    return stats


def subtype_nmi(encoder: ImageTextEncoder, per_pair: int = 40, seed: int = 12345,
                style: str = "benchmark") -> dict:
    """How well k-means on the encoder's image embeddings recovers object sub-types.

    For each (class, background family) group of built-in images, k-means with k = number of
    sub-types; returns the NMI against the true sub-type per group, their mean and minimum.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    from engine.stages.data.builtin import BACKGROUND_SUBTYPES, OBJECT_SUBTYPES, render

    per_group = {}
    rng = np.random.default_rng(seed)
    for c, objects in OBJECT_SUBTYPES.items():
        for a, backgrounds in BACKGROUND_SUBTYPES.items():
            images, labels = [], []
            for k, o in enumerate(objects):
                for b in backgrounds:
                    for s in rng.integers(0, 2**31 - 1, per_pair):
                        images.append(render(o, b, int(s), style))
                        labels.append(k)
            emb = encoder.encode_images(np.stack(images))
            pred = KMeans(len(objects), n_init=10, random_state=seed).fit_predict(emb)
            per_group[f"{c}-{a}"] = float(normalized_mutual_info_score(labels, pred))
    values = list(per_group.values())
    return {"per_group": per_group, "mean": float(np.mean(values)), "min": float(np.min(values))}


# --------------------------------------------------------------------------- real CLIP


class ClipEncoder:
    """A transformers ``CLIPModel`` and its ``CLIPProcessor``, from a local folder or a hub id,
    or with seeded random weights (``random:clip-vit-l14[:width=<w>]``)."""

    def __init__(self, spec: str, device: str | None = None, dtype: torch.dtype | None = None):
        self.device = device or default_device()
        self.dtype = dtype or (torch.float16 if self.device.startswith("cuda") else torch.float32)
        self.model, self.processor = self._load(spec)
        self.model.to(self.device, self.dtype).eval()
        self.dim = int(self.model.config.projection_dim)

    def _load(self, spec: str):
        """(CLIPModel, CLIPProcessor) of ``spec``: a random one (``engine.models.shapes``), or
        from a local folder or a hub id."""
        from transformers import CLIPModel, CLIPProcessor

        from engine.models.loading import resolve_pretrained
        from engine.models.shapes import is_random_spec, random_clip

        if is_random_spec(spec):
            return random_clip(spec)
        source, local_only = resolve_pretrained(spec, what="CLIP model")
        try:
            model = CLIPModel.from_pretrained(
                source, dtype=self.dtype, use_safetensors=True, local_files_only=local_only,
                trust_remote_code=False,
            )
            processor = CLIPProcessor.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FairsynthError(
                f"cannot load CLIP model {spec!r}: {first}; expected a transformers CLIPModel "
                "folder or hub id with safetensors weights and a CLIPProcessor"
            ) from exc
        return model, processor

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected feature.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.inference_mode()
    def encode_images(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        images = _check_images(images)
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(images), batch_size):
            pixels = self.processor(images=list(images[i : i + batch_size]), return_tensors="pt")
            pixels = pixels["pixel_values"].to(self.device, self.dtype)
            out.append(_normalised(self._features(self.model.get_image_features(pixel_values=pixels))))
        return np.concatenate(out)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        if isinstance(texts, str):
            raise FairsynthError(f"encode_texts got a string {texts!r}; expected a list of strings")
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(texts), batch_size):
            batch = self.processor(text=list(texts[i : i + batch_size]), padding=True,
                                   truncation=True, return_tensors="pt").to(self.device)
            feats = self.model.get_text_features(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"])
            out.append(_normalised(self._features(feats)))
        return np.concatenate(out)


ENCODERS: dict[str, Callable[..., ImageTextEncoder]] = {"tiny": TinyClipEncoder}


def load_encoder(spec: str, device: str | None = None) -> ImageTextEncoder:
    """``"tiny"`` or a tiny-CLIP folder -> :class:`TinyClipEncoder`; a CLIP folder, hub id or
    ``random:clip-vit-l14[:width=<w>]`` -> :class:`ClipEncoder`."""
    if not isinstance(spec, str) or not spec.strip():
        raise FairsynthError(
            f"encoder spec {spec!r} is empty; expected 'tiny', a CLIP folder or a hub id"
        )
    if spec in ENCODERS:
        return ENCODERS[spec](device=device)
    path = Path(spec).expanduser()
    if (path / TINY_CLIP_CONFIG).is_file() and (path / TINY_CLIP_WEIGHTS).is_file():
        try:
            arch = json.loads((path / TINY_CLIP_CONFIG).read_text()).get("architecture")
        except (OSError, ValueError):
            arch = None
        if arch == "tiny_clip":
            return TinyClipEncoder(path, device=device)
    return ClipEncoder(spec, device=device)
