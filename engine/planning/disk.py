"""Bytes on disk: what each stage leaves in the run directory, and what its running tasks
hold besides while they run (fine-tuning checkpoints in flight).

Counted from the configured models' shapes (built on the meta device, as for FLOPs) and the
formats the stages write:

- a LoRA unit: its adapter matrices in fp32 (``engine/generation_methods.py``);
- a DreamBooth unit: with ``dreambooth_store: svd_delta`` each layer's change at rank
  ``delta_rank`` (``engine/stages/finetune/delta.py``), with ``unet`` the whole UNet in fp16; the
  text encoder the same way when it is trained;
- a trial's resumable checkpoint: its trainable weights in fp32 plus AdamW's two moments
  (fp32, or 8-bit with bitsandbytes on a GPU); while it reports one, a trial holds three
  copies for a moment (the folder it writes, the copy Tune persists, and the previous
  checkpoint until Tune deletes it: ``CheckpointConfig(num_to_keep=1)``);
- prior-preservation images: uint8 arrays at the model's native side;
- synthetic images: PNG, estimated at :data:`PNG_BYTES_PER_PIXEL` (photographs at 512 px
  compress to roughly half their raw bytes; the noise that random weights draw does not
  compress, about 3 bytes a pixel).
"""

from __future__ import annotations

from functools import cache

from engine.config import FinetuneConfig
from engine.generation_methods import TEXT_ENCODER_LORA_TARGETS, UNET_LORA_TARGETS, get_method
from engine.planning.flops import DiffusionShapes, build_text_encoder, build_unet

PNG_BYTES_PER_PIXEL = 1.5
CHECKPOINT_COPIES = 3
FP32, FP16 = 4, 2


@cache
def _unet(config: str):
    return build_unet(config)


@cache
def _text_encoder(config: str):
    return build_text_encoder(config)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _lora_params(module, targets: list[str], rank: int) -> int:
    """Parameters of rank-``rank`` adapters on the linear layers named by ``targets``."""
    import torch

    total = 0
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (layer.in_features + layer.out_features)
    return total


def trains_lora(method: str, ft: FinetuneConfig) -> bool:
    return get_method(method).trains_lora(ft)


def trains_text_encoder(method: str, ft: FinetuneConfig) -> bool:
    return get_method(method).trains_text_encoder(ft)


def trainable_params(shapes: DiffusionShapes, ft: FinetuneConfig, method: str) -> int:
    unet, text = _unet(shapes.unet), _text_encoder(shapes.text_encoder)
    with_text = trains_text_encoder(method, ft)
    if trains_lora(method, ft):
        return _lora_params(unet, UNET_LORA_TARGETS, ft.lora_rank) + (
            _lora_params(text, TEXT_ENCODER_LORA_TARGETS, ft.lora_rank) if with_text else 0)
    return _params(unet) + (_params(text) if with_text else 0)


def unit_artifact_bytes(shapes: DiffusionShapes, ft: FinetuneConfig, method: str) -> int:
    """Bytes one trained unit of ``method`` keeps in ``RUN/finetune/<method>/units/``."""
    modules = [_unet(shapes.unet)] + ([_text_encoder(shapes.text_encoder)] if trains_text_encoder(method, ft) else [])
    return get_method(method).artifact(ft).unit_bytes(modules, trainable_params(shapes, ft, method), ft)


def checkpoint_bytes(shapes: DiffusionShapes, ft: FinetuneConfig, method: str, on_gpu: bool) -> int:
    """One resumable checkpoint of a trial: fp32 trainable weights and AdamW's moments."""
    moments = FP16 if (on_gpu and ft.use_8bit_adam) else 2 * FP32
    return trainable_params(shapes, ft, method) * (FP32 + moments)


def class_image_bytes(side: int, count: int) -> int:
    return count * side * side * 3


def png_bytes(side: int) -> float:
    return side * side * PNG_BYTES_PER_PIXEL
