"""The fine-tuning methods, one small class each, found by name: what a method trains, how
its units caption their images, and what it stores for the generate stage.

- ``vanilla``: trains nothing; every unit draws with the base model.
- ``lora``: one LoRA per group on the UNet attention projections, saved in the diffusers
  LoRA format, so ``pipe.load_lora_weights(artifact)`` loads it.
- ``dreambooth``: one model per group with the identifier token in its captions and a
  prior-preservation loss on images the base model draws for the group's plain prompt. It
  trains the full UNet weights (and the text encoder's when asked) and stores, by
  ``finetune.dreambooth_store``: ``svd_delta`` (default) each layer's change from the base
  cut to rank ``finetune.delta_rank`` (``delta.py``; ~271 MB per SD 1.5 unit at rank 128),
  ``unet`` the whole changed UNet in fp16 (1.7 GB per SD 1.5 unit); or, with
  ``lora_delta``, it trains LoRA adapters instead of the full weights and stores them in the
  diffusers LoRA format.
- ``clustered_dreambooth``: DreamBooth per (group, cluster) of the cluster stage.

A strategy sees the models only through :meth:`prepare` (what becomes trainable),
:meth:`trainable_state` / :meth:`load_trainable_state` (checkpoints) and
:meth:`save_artifact` (the unit's output); the training loop is shared (``trainer.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from engine.config import FinetuneConfig
from engine.errors import FairsynthError

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class FinetuneStrategy:
    """A method that needs no training (the base for every other)."""

    name: ClassVar[str] = ""
    trains: ClassVar[bool] = True
    uses_identifier: ClassVar[bool] = False
    per_cluster: ClassVar[bool] = False

    def uses_prior(self, ft: FinetuneConfig) -> bool:
        return False

    def trains_text_encoder(self, ft: FinetuneConfig) -> bool:
        return False

    def artifact_kind(self, ft: FinetuneConfig) -> str:
        return "lora"

    def trains_lora(self, ft: FinetuneConfig) -> bool:
        return True

    def learning_rate_field(self, ft: FinetuneConfig) -> str:
        """The finetune key that sets this method's learning rate: LoRA adapters learn at
        ``lora_learning_rate`` (when set), full weights at ``learning_rate``."""
        if self.trains_lora(ft) and ft.lora_learning_rate is not None:
            return "lora_learning_rate"
        return "learning_rate"

    def learning_rate(self, ft: FinetuneConfig) -> float:
        return getattr(ft, self.learning_rate_field(ft))

    def prepare(self, unet, text_encoder, ft: FinetuneConfig) -> list[torch.nn.Parameter]:
        """Freeze what stays, make trainable what learns; returns the trainable parameters."""
        raise NotImplementedError

    def trainable_state(self, unet, text_encoder) -> dict[str, torch.Tensor]:
        """Every trainable tensor, by a name :meth:`load_trainable_state` understands."""
        state = {}
        for prefix, module in (("unet.", unet), ("text_encoder.", text_encoder)):
            for name, param in module.named_parameters():
                if param.requires_grad:
                    state[prefix + name] = param.detach().to("cpu", copy=True)
        return state

    def load_trainable_state(self, unet, text_encoder, state: dict[str, torch.Tensor]) -> None:
        for prefix, module in (("unet.", unet), ("text_encoder.", text_encoder)):
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not own:
                continue
            result = module.load_state_dict(own, strict=False)
            if result.unexpected_keys:
                raise FairsynthError(
                    f"checkpoint holds {len(result.unexpected_keys)} tensors the {self.name} model lacks "
                    f"(first: {result.unexpected_keys[0]}); delete the finetune tune folder and re-run"
                )

    def save_artifact(self, unet, text_encoder, folder: Path, ft: FinetuneConfig) -> None:
        raise NotImplementedError


def _add_lora(unet, text_encoder, ft: FinetuneConfig, with_text_encoder: bool) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    # Gaussian A and zero B: the adapted model starts exactly at the base model.
    unet.add_adapter(
        LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, init_lora_weights="gaussian",
                   target_modules=UNET_LORA_TARGETS)
    )
    if with_text_encoder:
        text_encoder.add_adapter(
            LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, init_lora_weights="gaussian",
                       target_modules=TEXT_ENCODER_LORA_TARGETS)
        )
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()  # trainable weights stay fp32 under autocast
    return params


def _save_lora(unet, text_encoder, folder: Path, with_text_encoder: bool) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(module):
        return {k: v.to(torch.float32) for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(module)).items()}

    extra = {}
    if with_text_encoder:
        extra = {
            "text_encoder_lora_layers": layers(text_encoder),
            "text_encoder_lora_adapter_metadata": text_encoder.peft_config["default"].to_dict(),
        }
    # The adapter metadata carries lora_alpha, so a loader scales the update as it was trained.
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers(unet), weight_name=LORA_WEIGHT_NAME,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(), **extra,
    )


class Vanilla(FinetuneStrategy):
    name = "vanilla"
    trains = False

    def artifact_kind(self, ft: FinetuneConfig) -> str:
        return "base"


class Lora(FinetuneStrategy):
    name = "lora"

    def prepare(self, unet, text_encoder, ft):
        return _add_lora(unet, text_encoder, ft, with_text_encoder=False)

    def save_artifact(self, unet, text_encoder, folder, ft):
        _save_lora(unet, text_encoder, folder, with_text_encoder=False)


class DreamBooth(FinetuneStrategy):
    name = "dreambooth"
    uses_identifier = True

    def uses_prior(self, ft):
        return ft.prior_preservation and ft.prior_loss_weight > 0

    def trains_text_encoder(self, ft):
        return ft.train_text_encoder

    def artifact_kind(self, ft):
        return ft.dreambooth_store

    def trains_lora(self, ft):
        return ft.dreambooth_store == "lora_delta"

    def prepare(self, unet, text_encoder, ft):
        if self.trains_lora(ft):
            return _add_lora(unet, text_encoder, ft, with_text_encoder=ft.train_text_encoder)
        unet.requires_grad_(True)
        text_encoder.requires_grad_(ft.train_text_encoder)
        params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
        for param in params:
            param.data = param.data.float()
        if ft.dreambooth_store == "svd_delta":
            from engine.finetune import delta

            # The base the stored change is taken from: exact fp32 copies, on the CPU (a resumed
            # trial takes them before its checkpoint's weights are loaded).
            self.base_weights = {"unet": delta.snapshot(unet), "text_encoder": delta.snapshot(text_encoder)}
        return params

    def save_artifact(self, unet, text_encoder, folder, ft):
        if ft.dreambooth_store == "lora_delta":
            _save_lora(unet, text_encoder, folder, with_text_encoder=ft.train_text_encoder)
            return
        if ft.dreambooth_store == "svd_delta":
            from engine.finetune import delta

            for part, module in (("unet", unet), ("text_encoder", text_encoder)):
                if self.base_weights[part]:
                    delta.save(folder, part, delta.extract(module, self.base_weights[part], ft.delta_rank),
                               ft.delta_rank)
            return
        from safetensors.torch import save_file

        # Only what changed: the UNet (and the text encoder when trained), fp16 on disk; the
        # generate stage takes everything else from the base model.
        (folder / "unet").mkdir(parents=True, exist_ok=True)
        unet.save_config(folder / "unet")
        save_file(_half(unet.state_dict()), folder / "unet" / "diffusion_pytorch_model.safetensors")
        if ft.train_text_encoder:
            (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
            text_encoder.config.to_json_file(folder / "text_encoder" / "config.json")
            save_file(_half(text_encoder.state_dict()), folder / "text_encoder" / "model.safetensors",
                      metadata={"format": "pt"})


class ClusteredDreamBooth(DreamBooth):
    name = "clustered_dreambooth"
    per_cluster = True


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous().cpu() for k, v in state.items()}


STRATEGIES: dict[str, type[FinetuneStrategy]] = {
    cls.name: cls for cls in (Vanilla, Lora, DreamBooth, ClusteredDreamBooth)
}


def get_strategy(method: str) -> FinetuneStrategy:
    try:
        return STRATEGIES[method]()
    except KeyError:
        raise FairsynthError(
            f"unknown fine-tuning method {method!r}; valid: {', '.join(STRATEGIES)}"
        ) from None

