"""The generation methods, one class each, found by name in one registry.

A method owns everything that differs between methods:

- which units it has (:meth:`GenerationMethod.plan_units`: one per group, one per (group,
  cluster), or the base model's);
- what trains (:meth:`~GenerationMethod.make_trainable`; the loop is shared, ``trainer.py``);
- what a trained unit stores and how the sampler loads it, as one :class:`Artifact` pair;
- what the planner needs to cost it (units per group, LoRA or full weights, UNet calls per step).

The finetune stage, the sampler, the planner (``engine/planning/``) and the benchmarks ask this
registry and never check a method's name. A new method is a class here, decorated with
:func:`register` (an artifact kind of its own with :func:`register_artifact`).

- ``vanilla``: trains nothing; every unit draws with the base model.
- ``lora``: one LoRA per group on the UNet attention projections, saved in the diffusers
  LoRA format, so ``pipe.load_lora_weights(artifact)`` loads it.
- ``dreambooth``: one model per group with the identifier token in its captions and a
  prior-preservation loss on images the base model draws for the group's plain prompt. It
  trains the full UNet weights (and the text encoder's when asked) and stores, by
  ``finetune.dreambooth_store``: ``svd_delta`` (default) each layer's change from the base
  cut to rank ``finetune.delta_rank`` (``engine/stages/finetune/delta.py``; ~271 MB per SD 1.5 unit at rank
  128), ``unet`` the whole changed UNet in fp16 (1.7 GB per SD 1.5 unit); or, with
  ``lora_delta``, it trains LoRA adapters instead of the full weights and stores them in the
  diffusers LoRA format.
- ``clustered_dreambooth``: DreamBooth per (group, cluster) of the cluster stage.

This module imports no torch at load time: the config reads the method names from it.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from engine.errors import FairsynthError

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from engine.config import Config, FinetuneConfig
    from engine.stages.data.datasets import GroupedDataset
    from engine.stages.finetune.units import Unit
    from engine.stages.generate.sampler import PromptEncoder, UnitModels

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
BASE = "base"  # the artifact kind of a unit that draws with the base model
FP16, FP32 = 2, 4


# --- artifacts: what a trained unit stores, and how the sampler loads it ----------------------


class Artifact:
    """One kind of unit artifact: how training writes it and how the sampler loads it.

    An instance lives as long as one unit's training (it may keep what it needs between
    :meth:`before_training` and :meth:`save`); :meth:`activate` keeps its state on the
    sampler's :class:`~engine.stages.generate.sampler.UnitModels`.
    """

    kind: ClassVar[str] = ""
    card_tags: ClassVar[tuple[str, ...]] = ()

    def before_training(self, unet, text_encoder) -> None:
        """Called once the trainable weights are set, before a checkpoint is loaded."""

    def save(self, unet, text_encoder, folder: Path, ft: FinetuneConfig, with_text_encoder: bool) -> None:
        raise NotImplementedError

    def activate(self, models: UnitModels, artifact: str, strength: float) -> tuple[object, PromptEncoder]:
        """(UNet, prompt encoder) of ``artifact`` at ``strength`` of its fine-tuning."""
        raise NotImplementedError

    def how_to_load(self, base: str, prompt: str, settings: dict) -> str:
        """The model card's loading instructions."""
        return ""

    def unit_bytes(self, modules: list, trainable_params: int, ft: FinetuneConfig) -> int:
        """Bytes one unit keeps on disk, for the planner: ``modules`` are the trained models,
        ``trainable_params`` what the trainer updates."""
        return 0

    def describe(self, ft: FinetuneConfig) -> str:
        """What a unit stores, in a few words (the plan's notes)."""
        return "the base model"


class BaseModel(Artifact):
    """No file: the base UNet with every LoRA adapter disabled."""

    kind = BASE

    def save(self, unet, text_encoder, folder, ft, with_text_encoder):
        pass

    def activate(self, models, artifact, strength):
        models.disable_adapters()
        return models.base_unet, models.base_prompts


class LoraFile(Artifact):
    """A diffusers LoRA file, loaded once as a named adapter on the base UNet (and text encoder
    when the file has weights for it), then swapped by name; the least recently used adapters
    are deleted past ``max_adapters``."""

    kind = "lora"
    card_tags = ("lora",)

    def save(self, unet, text_encoder, folder, ft, with_text_encoder):
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        def layers(module):
            import torch

            state = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
            return {k: v.to(torch.float32) for k, v in state.items()}

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

    def activate(self, models, artifact, strength):
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )
        from diffusers.utils import logging as diffusers_logging

        from engine.stages.generate.sampler import PromptEncoder

        pipe, adapters = models.pipe, models.adapters
        name = re.sub(r"[^0-9A-Za-z_]", "_", artifact)
        if name not in adapters:
            path = models.local_path(artifact)
            folder, weight_name = (path.parent, path.name) if path.is_file() else (path, None)
            # Quiet about what is expected here: a UNet-only file has no text-encoder keys, and
            # a second adapter on the same UNet is the point of keeping several.
            verbosity = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=name)
            finally:
                diffusers_logging.set_verbosity(verbosity)
            adapters[name] = {}
            while len(adapters) > models.max_adapters:
                old, _ = adapters.popitem(last=False)
                pipe.delete_adapters(old)
        adapters.move_to_end(name)
        # UNet and text encoder are switched separately: a UNet-only LoRA must leave the text
        # encoder as the base model has it, whatever adapter it held before.
        models.base_unet.enable_lora()
        models.base_unet.set_adapters([name], weights=[strength])
        if name not in models.text_adapters():
            if models.text_adapters():
                disable_lora_for_text_encoder(pipe.text_encoder)
            return models.base_unet, models.base_prompts
        enable_lora_for_text_encoder(pipe.text_encoder)
        set_adapters_for_text_encoder([name], pipe.text_encoder, text_encoder_weights=[strength])
        # A LoRA that also changed the text encoder gets its own prompt cache per strength.
        caches = adapters[name]
        if strength not in caches:
            caches[strength] = PromptEncoder(pipe.tokenizer, pipe.text_encoder, pipe.device)
        return models.base_unet, caches[strength]

    def how_to_load(self, base, prompt, settings):
        return (
            "```python\nfrom diffusers import StableDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_pretrained("{base}")\n'
            'pipe.load_lora_weights("path/to/this/folder")\n'
            f'image = pipe("{prompt}").images[0]\n```'
        )

    def unit_bytes(self, modules, trainable_params, ft):
        return trainable_params * FP32

    def describe(self, ft):
        return "LoRA"


class LoraDelta(LoraFile):
    """DreamBooth trained as LoRA adapters: the same file and loader as ``lora``."""

    kind = "lora_delta"


class SvdDelta(Artifact):
    """Each trained layer's change from the base at rank ``finetune.delta_rank``
    (engine/stages/finetune/delta.py), added to a copy of the base UNet (and text encoder, when it was
    trained) in the sampler's LRU cache of ``max_unets``."""

    kind = "svd_delta"

    def before_training(self, unet, text_encoder):
        from engine.stages.finetune import delta

        # The base the stored change is taken from: exact fp32 copies, on the CPU (a resumed
        # trial takes them before its checkpoint's weights are loaded).
        self.base_weights = {"unet": delta.snapshot(unet), "text_encoder": delta.snapshot(text_encoder)}

    def save(self, unet, text_encoder, folder, ft, with_text_encoder):
        from engine.stages.finetune import delta

        for part, module in (("unet", unet), ("text_encoder", text_encoder)):
            if self.base_weights[part]:
                delta.save(folder, part, delta.extract(module, self.base_weights[part], ft.delta_rank), ft.delta_rank)

    def activate(self, models, artifact, strength):
        models.disable_adapters()
        return models.cached_unet(artifact, strength, self._build)

    @staticmethod
    def _build(models: UnitModels, path: Path, strength: float):
        import copy

        from engine.stages.finetune import delta
        from engine.stages.generate.sampler import PromptEncoder

        where = f"fine-tuned model {path}"
        unet = delta.apply(copy.deepcopy(models.base_unet), delta.load(path, "unet"), where, strength).eval()
        prompts = models.base_prompts
        if delta.has_part(path, "text_encoder"):
            text_encoder = delta.apply(
                copy.deepcopy(models.pipe.text_encoder), delta.load(path, "text_encoder"), where, strength
            )
            prompts = PromptEncoder(models.pipe.tokenizer, text_encoder.eval(), models.pipe.device)
        return unet, prompts

    def how_to_load(self, base, prompt, settings):
        return (
            f"The folder holds each fine-tuned layer's change from the base model at rank "
            f"{settings['delta_rank']} (`*_delta.safetensors`, fairsynth's `engine/stages/finetune/delta.py`); "
            "fairsynth's sampler adds them to the base model's weights."
        )

    def unit_bytes(self, modules, trainable_params, ft):
        from engine.stages.finetune import delta

        return sum(delta.artifact_bytes(m, ft.delta_rank) for m in modules)

    def describe(self, ft):
        return f"svd_delta rank {ft.delta_rank}"


class UnetFolder(Artifact):
    """A whole fine-tuned UNet (plus its text encoder, when trained) in diffusers format, fp16,
    blended with the base in the sampler's LRU cache of ``max_unets``."""

    kind = "unet"

    def save(self, unet, text_encoder, folder, ft, with_text_encoder):
        from safetensors.torch import save_file

        # Only what changed: the UNet (and the text encoder when trained), fp16 on disk; the
        # generate stage takes everything else from the base model.
        (folder / "unet").mkdir(parents=True, exist_ok=True)
        unet.save_config(folder / "unet")
        save_file(_half(unet.state_dict()), folder / "unet" / "diffusion_pytorch_model.safetensors")
        if with_text_encoder:
            (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
            text_encoder.config.to_json_file(folder / "text_encoder" / "config.json")
            save_file(_half(text_encoder.state_dict()), folder / "text_encoder" / "model.safetensors",
                      metadata={"format": "pt"})

    def activate(self, models, artifact, strength):
        models.disable_adapters()  # a whole UNet of its own
        return models.cached_unet(artifact, strength, self._build)

    @staticmethod
    def _build(models: UnitModels, path: Path, strength: float):
        import torch
        from diffusers import UNet2DConditionModel

        from engine.stages.generate.sampler import PromptEncoder

        base_unet = models.base_unet
        folder = path / "unet" if (path / "unet").is_dir() else path
        dtype, device = base_unet.dtype, base_unet.device
        # A blend is taken in fp32 and cast once (fp16 weights would round the difference
        # twice), on the CPU, so the device never holds an fp32 copy the planner did not count.
        load_dtype, load_device = (dtype, device) if strength == 1.0 else (torch.float32, "cpu")
        safetensors = True if not models.allow_pickle else None
        unet = UNet2DConditionModel.from_pretrained(folder, dtype=load_dtype, use_safetensors=safetensors)
        unet = _blend_with_base(unet.to(load_device), base_unet, strength, path).to(device).eval()
        if models.attention == "xformers":
            unet.enable_xformers_memory_efficient_attention()
        prompts = models.base_prompts
        if (path / "text_encoder").is_dir():
            from transformers import CLIPTextModel

            text_encoder = CLIPTextModel.from_pretrained(
                path / "text_encoder", dtype=load_dtype, use_safetensors=safetensors
            ).to(load_device)
            text_encoder = _blend_with_base(text_encoder, models.pipe.text_encoder, strength, path).to(device).eval()
            prompts = PromptEncoder(models.pipe.tokenizer, text_encoder, device)
        return unet, prompts

    def how_to_load(self, base, prompt, settings):
        return (
            "The folder holds the fine-tuned UNet (and text encoder when trained) in fp16; the rest "
            "is the base model's.\n\n```python\nfrom diffusers import StableDiffusionPipeline, "
            "UNet2DConditionModel\n\n"
            'unet = UNet2DConditionModel.from_pretrained("path/to/this/folder", subfolder="unet")\n'
            f'pipe = StableDiffusionPipeline.from_pretrained("{base}", unet=unet)\n```'
        )

    def unit_bytes(self, modules, trainable_params, ft):
        return sum(sum(p.numel() for p in m.parameters()) for m in modules) * FP16

    def describe(self, ft):
        return "whole UNet, fp16"


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch

    return {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous().cpu() for k, v in state.items()}


def _blend_with_base(model, base, strength: float, where: Path):
    """``model`` with its weights at base + strength * (model - base), in the base's dtype."""
    if strength == 1.0:
        return model
    import torch

    base_params = dict(base.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            start = base_params.get(name)
            if start is None or start.shape != param.shape:
                raise FairsynthError(
                    f"fine-tuned model {where}: {name!r} does not match the base model's weights "
                    "(trained on another base?); re-run the finetune stage"
                )
            start = start.data.to(param.device, torch.float32)
            param.data = start + strength * (param.data.float() - start)
    return model.to(next(base.parameters()).dtype)


ARTIFACTS: dict[str, type[Artifact]] = {}


def register_artifact(cls: type[Artifact]) -> type[Artifact]:
    ARTIFACTS[cls.kind] = cls
    return cls


for _artifact in (BaseModel, LoraFile, LoraDelta, SvdDelta, UnetFolder):
    register_artifact(_artifact)


def get_artifact(kind: str) -> Artifact:
    try:
        return ARTIFACTS[kind]()
    except KeyError:
        raise FairsynthError(f"unknown artifact kind {kind!r}; valid: {', '.join(ARTIFACTS)}") from None


# --- methods ----------------------------------------------------------------------------------


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


class GenerationMethod:
    """A method that trains LoRA adapters on one unit per group (the base of every other)."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # its row in the results table
    trains: ClassVar[bool] = True
    uses_identifier: ClassVar[bool] = False
    per_cluster: ClassVar[bool] = False  # units per (group, cluster): needs the cluster stage
    card_tags: ClassVar[tuple[str, ...]] = ()
    # Methods of one family train with the same step; the planner measures it once per family.
    cost_family: ClassVar[str] = ""

    # --- what trains ---------------------------------------------------------------------------

    def uses_prior(self, ft: FinetuneConfig) -> bool:
        """Whether a step adds the prior-preservation term (a second UNet call)."""
        return False

    def trains_text_encoder(self, ft: FinetuneConfig) -> bool:
        return False

    def trains_lora(self, ft: FinetuneConfig) -> bool:
        return True

    def unet_calls_per_step(self, ft: FinetuneConfig) -> int:
        return 2 if self.uses_prior(ft) else 1

    def learning_rate_field(self, ft: FinetuneConfig) -> str:
        """The finetune key that sets this method's learning rate: LoRA adapters learn at
        ``lora_learning_rate`` (when set), full weights at ``learning_rate``."""
        if self.trains_lora(ft) and ft.lora_learning_rate is not None:
            return "lora_learning_rate"
        return "learning_rate"

    def learning_rate(self, ft: FinetuneConfig) -> float:
        return getattr(ft, self.learning_rate_field(ft))

    def make_trainable(self, unet, text_encoder, ft: FinetuneConfig) -> list[torch.nn.Parameter]:
        """Freeze what stays, make trainable what learns; returns the trainable parameters."""
        raise NotImplementedError

    def prepare(self, unet, text_encoder, ft: FinetuneConfig) -> list[torch.nn.Parameter]:
        """:meth:`make_trainable`, then let the artifact see the weights it starts from."""
        params = self.make_trainable(unet, text_encoder, ft)
        self.artifact(ft).before_training(unet, text_encoder)
        return params

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

    # --- what it stores ------------------------------------------------------------------------

    def artifact_kind(self, ft: FinetuneConfig) -> str:
        return LoraFile.kind

    def artifact(self, ft: FinetuneConfig) -> Artifact:
        """This method's artifact; one instance per method object, so the state it keeps from
        :meth:`prepare` is there at :meth:`save_artifact`."""
        kind = self.artifact_kind(ft)
        artifacts = self.__dict__.setdefault("_artifacts", {})
        if kind not in artifacts:
            artifacts[kind] = get_artifact(kind)
        return artifacts[kind]

    def save_artifact(self, unet, text_encoder, folder: Path, ft: FinetuneConfig) -> None:
        self.artifact(ft).save(unet, text_encoder, folder, ft, self.trains_text_encoder(ft))

    # --- units ---------------------------------------------------------------------------------

    def plan_units(self, cfg: Config, dataset: GroupedDataset, assignments: pd.DataFrame | None = None) -> list[Unit]:
        """Every unit, trained ones first in group order, borrowing ones after them;
        ``assignments`` (the cluster stage's) when :attr:`per_cluster`."""
        from engine.stages.finetune.units import cluster_map, plan_trained_units

        cluster_of = cluster_map(dataset, assignments) if self.per_cluster else None
        return plan_trained_units(cfg, dataset, self.uses_identifier, cluster_of)

    def planned_unit_images(self, train_counts: list[int], clusters: list[int], groups: list[int]) -> list[float]:
        """Real training images of each trained unit the planner expects, from the trained
        ``groups``' image counts and their cluster counts."""
        if self.per_cluster:
            return [train_counts[g] / clusters[g] for g in groups for _ in range(clusters[g])]
        return [train_counts[g] for g in groups]


GENERATION_METHODS: dict[str, type[GenerationMethod]] = {}


def register(cls: type[GenerationMethod]) -> type[GenerationMethod]:
    """Add a method to the registry (a class decorator)."""
    GENERATION_METHODS[cls.name] = cls
    return cls


@register
class Vanilla(GenerationMethod):
    name = "vanilla"
    title = "Vanilla SD"
    trains = False

    def artifact_kind(self, ft):
        return BaseModel.kind

    def plan_units(self, cfg, dataset, assignments=None):
        from engine.stages.finetune.units import plan_base_units

        return plan_base_units(cfg, dataset)

    def planned_unit_images(self, train_counts, clusters, groups):
        return []


@register
class Lora(GenerationMethod):
    name = "lora"
    title = "LoRA"
    cost_family = "lora"

    def make_trainable(self, unet, text_encoder, ft):
        return _add_lora(unet, text_encoder, ft, with_text_encoder=False)


@register
class DreamBooth(GenerationMethod):
    name = "dreambooth"
    title = "DreamBooth"
    uses_identifier = True
    card_tags = ("dreambooth",)
    cost_family = "dreambooth"

    def uses_prior(self, ft):
        return ft.prior_preservation and ft.prior_loss_weight > 0

    def trains_text_encoder(self, ft):
        return ft.train_text_encoder

    def artifact_kind(self, ft):
        return ft.dreambooth_store

    def trains_lora(self, ft):
        return ft.dreambooth_store == LoraDelta.kind

    def make_trainable(self, unet, text_encoder, ft):
        if self.trains_lora(ft):
            return _add_lora(unet, text_encoder, ft, with_text_encoder=ft.train_text_encoder)
        unet.requires_grad_(True)
        text_encoder.requires_grad_(ft.train_text_encoder)
        params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
        for param in params:
            param.data = param.data.float()
        return params


@register
class ClusteredDreamBooth(DreamBooth):
    name = "clustered_dreambooth"
    title = "Clustered DreamBooth"
    per_cluster = True


def get_method(name: str) -> GenerationMethod:
    try:
        return GENERATION_METHODS[name]()
    except KeyError:
        raise FairsynthError(
            f"unknown generation method {name!r}; valid: {', '.join(GENERATION_METHODS)}"
        ) from None


def method_names() -> tuple[str, ...]:
    """Every generation method, in the registry's (the results table's) order."""
    return tuple(GENERATION_METHODS)


def is_generation_method(name: str) -> bool:
    return name in GENERATION_METHODS


def trains_models(names) -> bool:
    """Whether any of ``names`` is a generation method that fine-tunes."""
    return any(GENERATION_METHODS[m].trains for m in names if m in GENERATION_METHODS)
