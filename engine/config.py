"""The one typed config: every stage reads its section, every default lives here.

The defaults are the paper's where it states them (and Stable Diffusion's and DreamBooth's
where it follows them); sizes it does not publish are small enough to run anywhere. Presets in
``engine/configs/`` override them (a preset may ``extends:`` another and state only what
differs), and ``--set key.path=value`` overrides a preset. With no preset a job loads
``tiny``, the embedded default, which holds every choice made for the tiny model. A bad key
or value fails at load time with one line naming the key, the value and what is valid.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.errors import FairsynthError
from engine.generation_methods import is_generation_method, trains_models
from engine.generation_methods import method_names as generation_method_names
from engine.hashing import digest

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = Path(__file__).resolve().parent / "configs"  # package data: a wheel ships them
DEFAULT_PRESET = "tiny"  # what a job runs with no --config
DATASETS = ("builtin", "waterbirds", "celeba", "utkface", "manifest")
# Methods that read the real data alone; the oracle draws extra real images (built-in only).
# The generation methods are engine/generation_methods.py's registry.
REAL_DATA_METHODS = ("erm", "group_dro", "dfr")
BUILTIN_ONLY_METHODS = ("oracle",)


def known_methods() -> tuple[str, ...]:
    """Every method a config may name, in the results table's order."""
    return (*REAL_DATA_METHODS, *generation_method_names(), *BUILTIN_ONLY_METHODS)


METHODS = known_methods()  # the built-in ones: the default ``methods``
# The training keys a method may set for itself (train.method_overrides), as DomainBed scopes
# each hyperparameter to the algorithm it tunes.
METHOD_HPARAMS = ("learning_rate", "finetune_learning_rate", "weight_decay", "group_dro_eta", "group_dro_adjustment")


def output_of(*stages: str) -> dict:
    """A field's mark (``Field(json_schema_extra=output_of(...))``): the stages whose output
    it changes, which their cache keys then cover (engine/stages/__init__.py). ``RESOURCES``: none."""
    return {"stages": list(stages)}


RESOURCES = output_of()  # how a stage runs (actors, devices, retries), never what it writes


class Section(BaseModel):
    """A config section. ``stages`` names the stages its fields change the output of, unless a
    field carries its own mark; None: as the enclosing section (the root's fields are each marked)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    stages: ClassVar[tuple[str, ...] | None] = None


class SeededSection(Section):
    """A section whose randomness follows the run's one ``seed``: it reads ``seed`` but cannot
    set it, so a seed given once reaches every stage and the data alike."""

    _seed: int = PrivateAttr(0)

    @property
    def seed(self) -> int:
        return self._seed


def _check_severity(value: Any) -> Any:
    if value == "original":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be 'original' or a number p with 0.5 < p < 1")
    # No integer lies in (0.5, 1), and float() of a huge one would raise OverflowError.
    if isinstance(value, int) or not 0.5 < value < 1.0:
        raise ValueError("must be 'original' or a number p with 0.5 < p < 1")
    return float(value)


def _check_concurrency(value: Any) -> Any:
    if value == AUTO:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be a positive integer (a cap) or 'auto' (as many as the cluster can reach)")
    return value


Concurrency = int | Literal["auto"]
AUTO = "auto"


def _check_template(template: str, words: tuple[str, ...]) -> str:
    """A prompt template may name only ``words`` ({class_name}, ...): anything else would
    fail only when the stage that fills it runs, after hours of fine-tuning and generation."""
    valid = ", ".join("{" + w + "}" for w in words)
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        unknown = [name for name in names if name not in words]
        if not unknown:
            template.format(**{w: "x" for w in words})  # a bad format spec, such as {class_name:d}
    except (ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"cannot be filled ({exc}); valid placeholders: {valid} (write {{{{ and }}}} for braces)") from None
    if unknown:
        raise ValueError(f"has the unknown placeholder {{{unknown[0]}}}; valid placeholders: {valid}")
    return template


def _template_of(*words: str):
    """A field validator that checks a template's placeholders against ``words``."""
    return classmethod(lambda cls, v: _check_template(v, words))


class ActorStageConfig(SeededSection):
    """How a Ray Data actor stage (cluster, generate, filter) runs: the one resources model.

    ``num_actors`` caps the actor pool; 'auto' lets it grow to what the work can use and the
    cluster can reach (an autoscaling cluster adds nodes as the pool asks). Each actor asks
    Ray for ``actor_num_cpus`` CPUs and ``actor_num_gpus`` GPUs; ``model.device=cpu`` turns
    every GPU share off. engine/resources.py resolves these for the stage and the planner.
    """

    batch_size: int = Field(128, ge=1, description="rows per actor call", json_schema_extra=RESOURCES)
    num_actors: Concurrency = Field(1, description="actor pool cap, or 'auto'", json_schema_extra=RESOURCES)
    actor_num_cpus: float = Field(0.5, gt=0, json_schema_extra=RESOURCES)
    actor_num_gpus: float = Field(
        0.0, ge=0, description="GPU share per actor (0.25: four actors per GPU)", json_schema_extra=RESOURCES
    )

    _num_actors = field_validator("num_actors", mode="before")(
        classmethod(lambda cls, v: _check_concurrency(v))
    )


class BuiltinConfig(Section):
    """Sizes of the procedural benchmark (engine.stages.data.builtin)."""

    n_train: int = Field(2000, ge=8, description="original training images, before severity")
    n_val: int = Field(400, ge=4, description="group-balanced")
    n_test: int = Field(800, ge=4, description="group-balanced")
    original_alignment: float = Field(
        0.95, gt=0.5, lt=1.0, description="share of bias-aligned images per class in 'original'"
    )
    rendering: str = Field(
        "calibrated",
        description="how hard the object (the core feature) is to see beside the background: a name in "
        "engine.stages.data.builtin.RENDERINGS (benchmarks/research/benchmark_calibration.py measures each); 'calibrated' "
        "puts ERM and Group-DRO where they are on Waterbirds, 'classic' is the benchmark as first shipped",
    )

    @field_validator("rendering")
    @classmethod
    def _known_rendering(cls, v: str) -> str:
        from engine.stages.data.builtin import RENDERINGS

        if v not in RENDERINGS:
            raise ValueError(f"unknown rendering; valid: {', '.join(RENDERINGS)}")
        return v


class DataConfig(SeededSection):
    stages = ("data",)

    name: Literal["builtin", "waterbirds", "celeba", "utkface", "manifest"] = "builtin"
    root: str | None = Field(None, description="dataset folder; unused for builtin")
    severity: Literal["original"] | float = "original"
    target: str | None = Field(None, description="class attribute (CelebA default Blond_Hair)")
    attribute: str | None = Field(None, description="spurious attribute (CelebA default Male)")
    aligned: dict[int, int] | None = Field(
        None, description="class -> bias-aligned attribute; inferred from the training split when unset"
    )
    image_size: int = Field(32, ge=8, description="side real images are read at for clustering and filtering; fine-tuning and sampling use the generator's native side, training train.image_size")
    skip_bad_images: bool = Field(False, description="skip and count unreadable images instead of failing")
    age_bins: list[int] = Field(
        [0, 40, 200], description="UTKFace age bin edges; attribute = bin index"
    )
    class_names: list[str] | None = Field(None, description="words for classes in prompts")
    attribute_names: list[str] | None = Field(None, description="words for attributes in prompts")
    builtin: BuiltinConfig = BuiltinConfig()

    _severity = field_validator("severity", mode="before")(classmethod(lambda cls, v: _check_severity(v)))

    @field_validator("age_bins")
    @classmethod
    def _bins_increase(cls, v: list[int]) -> list[int]:
        if len(v) < 3 or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("must be at least 3 strictly increasing edges, e.g. [0, 40, 200]")
        return v


class ModelConfig(Section):
    stages = ()

    base: str = Field(
        "tiny",
        json_schema_extra=output_of("unit_training", "class_images", "generate"),
        description="'tiny' (shipped), a local diffusers folder, a hub id, or "
        "'random:sd15[:width=<w>][:size=<px>][:seed=<n>]': Stable Diffusion 1.5's shapes (engine/models/sd15) with "
        "seeded random weights, no download; width (default 1) scales every channel width and hidden size, "
        "keeping depths and heads; size (default 512) is the side it draws and fine-tunes at (engine/models/shapes.py)",
    )
    encoder: str = Field(
        "tiny",
        json_schema_extra=output_of("embeddings"),
        description="image/text encoder: 'tiny', a CLIP path / hub id, or 'random:clip-vit-l14[:width=<w>][:seed=<n>]' "
        "(CLIP ViT-L/14's shapes with seeded random weights, width as for base)",
    )
    attention: Literal["sdpa", "xformers"] = "sdpa"
    allow_pickle: bool = Field(False, description="allow non-safetensors weights (unsafe)")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("base", "encoder")
    @classmethod
    def _random_spec(cls, v: str, info) -> str:
        from engine.models.shapes import RANDOM_BASES, RANDOM_ENCODERS, is_random_spec, random_spec

        if is_random_spec(v):
            random_spec(v, RANDOM_BASES if info.field_name == "base" else RANDOM_ENCODERS)
        return v


class ClusterConfig(ActorStageConfig):
    stages = ("cluster",)

    k: int | Literal["auto"] = Field("auto", description="clusters per group, or 'auto' (silhouette)")
    k_max: int = Field(6, ge=1, description="largest k tried when k is 'auto'")
    min_cluster_size: int = Field(8, ge=1, description="smaller clusters merge into their nearest")
    min_silhouette: float = Field(
        0.1, ge=-1, le=1, description="k 'auto': a group whose best silhouette is lower stays one cluster"
    )
    spherical: bool = True
    niter: int = Field(30, ge=1)
    nredo: int = Field(3, ge=1)
    max_points_per_centroid: int = Field(
        1024, ge=8, description="k-means trains on a random sample of at most k x this many points, then "
        "assigns every point (a built-in group, under 1,000 points, is fitted whole)"
    )
    batch_size: int = Field(128, ge=1, description="images per embedding batch", json_schema_extra=RESOURCES)

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be a positive integer or 'auto'")
        return v


class FinetuneConfig(SeededSection):
    # How a unit trains; which units there are and their prompts are the unit plan's.
    stages = ("unit_training",)

    # 600, not 200: on the tuning seeds' validation split it raised worst-group accuracy of
    # LoRA, DreamBooth and clustered DreamBooth by 8.5 to 12 points (docs/decisions.md).
    steps: int = Field(600, ge=1)
    learning_rate: float = Field(3e-4, gt=0, description="full-weight DreamBooth (and LoRA when lora_learning_rate is unset)")
    # The paper's; the tiny preset sets its own, chosen on validation (docs/decisions.md).
    lora_learning_rate: float | None = Field(1e-4, gt=0, description="LoRA adapters (lora, dreambooth_store=lora_delta)")
    batch_size: int = Field(16, ge=1)
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float = Field(4.0, gt=0)
    identifier: str = Field(
        "sks", description="rare token that stands for the paper's [V]", json_schema_extra=output_of("unit_plan")
    )
    prior_preservation: bool = Field(True, description="DreamBooth's prior-preservation loss on class images")
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(
        32, ge=1, description="prior-preservation images per class prompt", json_schema_extra=output_of("class_images")
    )
    train_text_encoder: bool = False
    # svd_delta: full weights trained, stored as a rank-delta_rank SVD of each layer's change
    # (engine/stages/finetune/delta.py; ~271 MB per SD 1.5 unit at rank 128); unet: the whole UNet in
    # fp16 (1.7 GB); lora_delta: LoRA adapters trained instead of the full weights.
    dreambooth_store: Literal["svd_delta", "unet", "lora_delta"] = "svd_delta"
    delta_rank: int = Field(128, ge=1, description="rank per layer of dreambooth_store=svd_delta")
    min_real_images: int = Field(
        4, ge=1, description="below this a unit borrows its class's aligned model", json_schema_extra=output_of("unit_plan")
    )
    trial_resources: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0}, json_schema_extra=RESOURCES)
    max_concurrent_trials: Concurrency = Field(
        2, description="trials at once (a cap), or 'auto': Tune queues every trial and runs what the cluster can hold",
        json_schema_extra=RESOURCES,
    )
    checkpoint_every: int = Field(20, ge=1, json_schema_extra=RESOURCES)
    max_failures: int = Field(2, ge=0, json_schema_extra=RESOURCES)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "fp16", description="used on CUDA only", json_schema_extra=RESOURCES
    )
    gradient_checkpointing: bool = Field(False, json_schema_extra=RESOURCES)
    use_8bit_adam: bool = Field(
        True, description="when bitsandbytes is installed and on CUDA", json_schema_extra=RESOURCES
    )
    num_samples: int = Field(1, ge=1, description=">1 searches learning rate and steps with ASHA")
    search_lr_factor: float = Field(3.0, gt=1, description="the search draws learning rates in [lr / f, lr * f]")
    heldout_fraction: float = Field(0.2, gt=0, lt=1, description="share of a unit's images the search scores on")
    caption_dropout: float = Field(0.0, ge=0, lt=1, description="share of captions trained as the empty prompt")
    _max_concurrent = field_validator("max_concurrent_trials", mode="before")(
        classmethod(lambda cls, v: _check_concurrency(v))
    )
    # Test hook, kept out of the schema: every trial raises once at this step (tests/test_finetune.py).
    _inject_failure_at_step: int | None = PrivateAttr(None)


class GenerateConfig(ActorStageConfig):
    stages = ("generate",)

    images_per_group: int | Literal["fill"] = Field(
        96, description="or 'fill' up to the largest real group", json_schema_extra=output_of("generate", "oracle")
    )
    # The sampler settings; the base model draws prior-preservation images with them too.
    steps: int = Field(20, ge=1, json_schema_extra=output_of("generate", "class_images"))
    # Stable Diffusion's usual 7.5 (FFR's; the paper publishes none); the tiny preset sets 12.
    guidance_scale: float = Field(7.5, ge=0, json_schema_extra=output_of("generate", "class_images"))
    scheduler: Literal["dpm_solver_multistep", "ddim", "euler", "pndm"] = Field(
        "dpm_solver_multistep", json_schema_extra=output_of("generate", "class_images")
    )
    batch_size: int = Field(16, ge=1, description="images per UNet batch", json_schema_extra=RESOURCES)
    actor_num_cpus: float = Field(1.0, gt=0, json_schema_extra=RESOURCES)
    # The prompts are the unit plan's (the finetune manifest holds them, and the plan reads them there).
    prompt_template: str = Field(
        "a photo of a {class_name} on {attribute_name}", json_schema_extra=output_of("unit_plan")
    )
    # DreamBooth's order, the identifier before the class word; the tiny preset puts it last.
    identifier_template: str = Field(
        "a photo of a {identifier} {class_name} on {attribute_name}", json_schema_extra=output_of("unit_plan")
    )
    negative_prompt_template: str = Field(
        "{source_attribute_name}", description="a borrowed minority unit's negative prompt (the paper's)",
        json_schema_extra=output_of("unit_plan"),
    )
    # None, as in the paper; the tiny preset names the groups a unit must not show
    # (docs/decisions.md, "Generation settings"). Names that contain each other's words
    # (CelebA's "non-blond" and "blond") make a poor negative: write one by hand there.
    own_negative_prompt_template: str = Field(
        "",
        description="negative prompt of a unit drawing with its own fine-tuned model, e.g. "
        "'{other_class_names} {other_attribute_names}' (comma-separated lists); '' for none",
        json_schema_extra=output_of("unit_plan"),
    )
    # The paper's 1 (the lender as trained); the tiny preset sets 0.5 (docs/decisions.md).
    # Units drawing with their own model always take all of their fine-tuning.
    borrowed_strength: float = Field(
        1.0, ge=0, le=1,
        description="share of its lender's fine-tuning a borrowed minority unit draws with: 1 the lender, 0 the base",
    )
    rows_per_shard: int = Field(64, ge=1, json_schema_extra=output_of("generate", "oracle"))
    unet_cache_size: int = Field(
        2, ge=1, description="DreamBooth UNets a sampler keeps loaded", json_schema_extra=RESOURCES
    )

    _prompts = field_validator("prompt_template")(_template_of("class_name", "attribute_name"))
    _identifier = field_validator("identifier_template")(_template_of("class_name", "attribute_name", "identifier"))
    _negative = field_validator("negative_prompt_template")(_template_of("source_attribute_name"))
    _own_negative = field_validator("own_negative_prompt_template")(_template_of(
        "other_class_names", "other_attribute_names", "class_name", "attribute_name"))

    @field_validator("images_per_group")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be a positive integer or 'fill'")
        return v


class FilterConfig(ActorStageConfig):
    stages = ("filter",)

    alpha: float = Field(0.5, ge=0, le=1, description="weight of the class-prompt similarity")
    keep_fraction: float = Field(
        0.75, gt=0, le=1, description="top share kept per group", json_schema_extra=output_of("filter", "oracle")
    )
    class_prompt_template: str = Field(
        "a photo of a {class_name}",
        description="the text each image is scored against; naming {attribute_name} too scores it against its group",
    )
    batch_size: int = Field(128, ge=1, description="images per encoder batch", json_schema_extra=RESOURCES)

    _prompt = field_validator("class_prompt_template")(_template_of("class_name", "attribute_name"))


class FidelityConfig(Section):
    """Synthetic group fidelity (engine.stages.generate.fidelity): how often a judge reads a unit's
    generated images as the unit's group, before and after filtering."""

    stages = ("fidelity",)

    judge: Literal["auto", "learned", "renderer", "clip"] = Field(
        "auto", description="'learned' (a CNN trained on real built-in renders), 'renderer' (the built-in benchmark's "
        "drawing rules), 'clip' (zero-shot model.encoder), or 'auto': learned on builtin, clip elsewhere"
    )
    class_prompt_template: str = Field("a photo of a {class_name}", description="clip judge: one prompt per class")
    attribute_prompt_template: str = Field(
        "a photo of a {attribute_name}", description="clip judge: one prompt per attribute"
    )

    _class_prompt = field_validator("class_prompt_template")(_template_of("class_name"))
    _attribute_prompt = field_validator("attribute_prompt_template")(_template_of("attribute_name"))


class TrainConfig(SeededSection):
    stages = ("train",)

    backbone: Literal["tiny_resnet", "resnet18", "resnet50"] = "tiny_resnet"
    pretrained_weights: str | None = Field(None, description="local ImageNet weights file for torchvision backbones")
    image_size: int = Field(32, ge=8, description="side of the images the classifier trains and is evaluated on")
    # 20, not 6: on the tuning seeds' validation split it lifted the oracle from 80 to 98 and
    # the generative methods' mean worst-group accuracy by 3 points (docs/decisions.md).
    pretrain_epochs: int = Field(20, ge=0, description="stage 1, on synthetic images")
    epochs: int = Field(8, ge=1, description="real-data training (stage 2 for generative methods)")
    batch_size: int = Field(64, ge=2)
    learning_rate: float = Field(2e-3, gt=0)
    finetune_learning_rate: float = Field(1e-2, gt=0, description="stage 2 learning rate")
    weight_decay: float = Field(1e-4, ge=0)
    stage2: Literal["last_layer", "full", "group_dro", "none"] = Field(
        "last_layer", description="generative methods' real-data stage; 'none': synthetic images only (an ablation)"
    )
    loss_beta: float = Field(0.5, ge=0, le=1, description="beta * CE + (1 - beta) * SupCon")
    supcon_temperature: float = Field(0.1, gt=0)
    group_dro_eta: float = Field(0.01, gt=0)
    group_dro_adjustment: float = Field(0.0, ge=0, description="C in C / sqrt(n_g)")
    group_balanced_sampling: bool = Field(
        True, description="resample the real training set group-balanced for Group-DRO and every generative "
        "method's stage 2 (ERM always reads it as it is)"
    )
    augment: bool = True
    num_workers: Concurrency = Field(
        2, description="DDP workers, or 'auto': one per GPU the cluster can reach (use_gpu) or per free CPU share"
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, json_schema_extra=RESOURCES)
    max_failures: int = Field(1, ge=0, json_schema_extra=RESOURCES)
    cache_decoded: bool = Field(True, description="decode images once into the object store instead of every epoch")
    shuffle_buffer_rows: int = Field(2048, ge=1, description="rows each worker's shuffle buffer mixes")
    _num_workers = field_validator("num_workers", mode="before")(
        classmethod(lambda cls, v: _check_concurrency(v))
    )
    # None by default; the tiny preset holds the baselines' values that
    # benchmarks/research/baseline_search.py chose on the tuning seeds' validation split (docs/decisions.md).
    method_overrides: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="per-method values of " + ", ".join(METHOD_HPARAMS) + " over the keys above (each "
        "method's chosen on validation by benchmarks/research/baseline_search.py), e.g. {erm: {learning_rate: 0.004}}; "
        "--set replaces the whole block",
        # Not a key of its own: a method's train key hashes the section as for_method gives it.
        json_schema_extra=RESOURCES,
    )
    # Test hook, kept out of the schema: one worker process dies once after this epoch
    # (tests/test_train.py).
    _inject_failure_at_epoch: int | None = PrivateAttr(None)
    deterministic: bool = Field(
        True, description="deterministic torch kernels (cuDNN included), so a seed repeats its metrics"
    )

    @field_validator("method_overrides")
    @classmethod
    def _known_overrides(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for method, values in v.items():
            if method not in known_methods():
                raise ValueError(f"unknown method {method!r}; valid: {', '.join(known_methods())}")
            for key, value in values.items():
                if key not in METHOD_HPARAMS:
                    raise ValueError(f"{method}.{key} cannot be set per method; valid: {', '.join(METHOD_HPARAMS)}")
                if not value >= 0 or (key != "group_dro_adjustment" and key != "weight_decay" and value == 0):
                    raise ValueError(f"{method}.{key} = {value!r} must be a positive number")
        return v

    def for_method(self, method: str) -> TrainConfig:
        """This section as ``method`` trains with: its ``method_overrides`` over the shared keys."""
        return self.model_copy(update=self.method_overrides.get(method, {}))

    @model_validator(mode="after")
    def _some_training_left(self) -> TrainConfig:
        if self.stage2 == "none" and self.pretrain_epochs == 0:
            raise ValueError("stage2 = 'none' with pretrain_epochs = 0 trains nothing; set pretrain_epochs >= 1")
        return self


class GpuStageMfu(Section):
    """Achieved fraction of a GPU's peak FLOP/s per stage (the planner's MFU).

    Measured by `jobs/plan.py --measure --config waterbirds` on one H100 SXM (peak 989
    TFLOP/s): the paper presets' models with random weights at the presets' batch sizes, each
    run as its stage runs it; the planner's FLOP counts divided by the time taken."""

    cluster: float = Field(0.345, gt=0, le=1, description="CLIP ViT-L/14 image tower, fp16, batch 256: 2,100 images/s")
    # SD 1.5 UNet at batch 4 on 224 px images (28x28 latents), fp16 autocast, fp32 trainable
    # weights, gradient checkpointing, torch AdamW: 0.33 s per LoRA step, 0.44 s per DreamBooth
    # step (two UNet calls with the prior term). Latents this small leave the GPU waiting on
    # kernel launches, hence the low fraction.
    finetune: float = Field(0.0075, gt=0, le=1, description="SD 1.5 UNet fine-tuning steps")
    generate: float = Field(
        0.257, gt=0, le=1,
        description="SD 1.5, 25 DPM-Solver steps with guidance + VAE decode, batch 32, 512 px, fp16: 5.95 images/s",
    )
    filter: float = Field(0.344, gt=0, le=1, description="the cluster stage's encoder and batch size")
    train: float = Field(
        0.017, gt=0, le=1,
        description="ResNet-50, 224 px, 16 images per worker (128 over 8), bf16 autocast, Adam: 700 images/s",
    )


class CpuStageMfu(Section):
    """Achieved fraction of one CPU core's fp32 matmul peak per stage (a CPU task runs one
    PyTorch thread per whole CPU it asks Ray for, so a CPU plan schedules on cores).

    Measured by `jobs/plan.py --measure` (the tiny default, one thread) on a 2-core AMD EPYC
    development machine (about 95 GFLOP/s per core): the median of four runs while other jobs
    shared the cores, each within about 40% of it. `jobs/plan.py --measure --save` records
    the machine you plan for."""

    cluster: float = Field(0.25, gt=0, le=1, description="tiny CLIP image tower, batch 128: about 0.2 s")
    finetune: float = Field(
        0.12, gt=0, le=1, description="tiny UNet steps at batch 16, 8x8 latents: LoRA 0.16 s, DreamBooth (two calls) 0.38 s"
    )
    generate: float = Field(
        0.18, gt=0, le=1, description="tiny sampler, batch 16, 20 steps with guidance + VAE decode: 8 images/s"
    )
    filter: float = Field(0.25, gt=0, le=1, description="as cluster: the same encoder and batch size")
    train: float = Field(0.14, gt=0, le=1, description="tiny ResNet at 32 px, 32 images per worker, Adam: 700 images/s")


class PlanConfig(Section):
    """The cost planner (jobs/plan.py). A result in plan.results_dir measured on the planned
    kind of device replaces a stage's default here."""

    stages = ()

    gpu_mfu: GpuStageMfu = GpuStageMfu()
    cpu_mfu: CpuStageMfu = CpuStageMfu()
    results_dir: str = Field("benchmarks/results", description="benchmark JSON results (relative to the repo)")


class RayConfig(Section):
    stages = ()

    address: str | None = Field(None, description="None starts a local Ray; 'auto' joins a cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray")
    storage_path: str | None = Field(None, description="shared storage for Tune/Train (s3://... on clusters)")
    dashboard: bool = Field(
        True, description="local Ray only: serve the dashboard on a free port of 127.0.0.1, logged at start (Ray Train's clean-up monitor reads its state API)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="Ray's own logs in workers; the job's progress lines are printed regardless"
    )


class Config(Section):
    run_dir: str = Field("runs/default", json_schema_extra=RESOURCES)
    # Marked for no stage itself: every stage that reads a seeded section hashes it (engine/stages/__init__.py).
    seed: int = Field(
        0, ge=0, description="the run's one seed: the data (the built-in world, splits and severity subsampling) "
        "and every stage's random choices follow it", json_schema_extra=RESOURCES,
    )
    # Each seed and severity is a run tree of its own, with seed and data.severity set.
    seeds: list[int] | None = Field(
        None,
        description="run the whole job once per seed, in RUN/seed_<s>/, each with `seed` set to s; "
        "results show mean ± std", json_schema_extra=RESOURCES,
    )
    methods: list[str] = Field(
        default_factory=lambda: list(METHODS),
        description="methods to run; unset: every method the dataset allows (the oracle needs the built-in benchmark)",
        json_schema_extra=RESOURCES,
    )
    severities: list[Literal["original"] | float] = Field(
        default_factory=lambda: [0.999], json_schema_extra=RESOURCES
    )
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    cluster: ClusterConfig = ClusterConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    generate: GenerateConfig = GenerateConfig()
    filter: FilterConfig = FilterConfig()
    fidelity: FidelityConfig = FidelityConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    plan: PlanConfig = PlanConfig()
    tracking: Literal["none", "mlflow"] = Field(
        "none",
        json_schema_extra=RESOURCES,
        description="also log the finished run to an experiment tracker: 'mlflow' logs the config, every "
        "result and the report to MLFLOW_TRACKING_URI (experiment MLFLOW_EXPERIMENT_NAME, default 'fairsynth')",
    )

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in known_methods()]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; valid: {', '.join(known_methods())}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_methods_fit_the_data(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "methods" not in raw:
            data = raw.get("data")
            name = data.get("name", "builtin") if isinstance(data, dict) else "builtin"
            raw = {**raw, "methods": [m for m in METHODS if name == "builtin" or m not in BUILTIN_ONLY_METHODS]}
        return raw

    @model_validator(mode="after")
    def _builtin_only_methods(self) -> Config:
        if self.data.name != "builtin":
            for method in self.methods:
                if method in BUILTIN_ONLY_METHODS:
                    raise ValueError(f"methods: {method!r} needs data.name=builtin (it draws real images with the "
                                     "built-in renderer); remove it from methods")
        return self

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("must be a non-empty list of distinct seeds >= 0, e.g. [0, 1, 2]")
        return v

    @field_validator("severities", mode="before")
    @classmethod
    def _check_severities(cls, v: Any) -> Any:
        return [_check_severity(s) for s in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _root_for_real_data(self) -> Config:
        if self.data.name != "builtin" and not self.data.root:
            raise ValueError(f"data.root is required for data.name={self.data.name!r}")
        return self

    @model_validator(mode="after")
    def _gpu_share_for_cuda(self) -> Config:
        # A stage that runs a model with no GPU share gets a worker that sees no GPU, and
        # model.device=cuda would fail there, mid-run; say so before anything starts.
        if self.model.device == "cuda":
            for key, share in self.gpu_shares().items():
                if share <= 0:
                    raise ValueError(
                        f"{key} = 0 but model.device = 'cuda': give the stage a GPU share "
                        f"(e.g. --set {key}={'true' if key == 'train.use_gpu' else 0.25}) or set model.device=auto"
                    )
        return self

    @model_validator(mode="after")
    def _one_seed_everywhere(self) -> Config:
        for name in seeded_sections(type(self)):
            getattr(self, name)._seed = self.seed
        return self

    def gpu_shares(self) -> dict[str, float]:
        """The GPU share each stage this config runs asks Ray for (train: 1 per worker), before
        ``model.device=cpu`` turns them off (engine/resources.py)."""
        shares: dict[str, float] = {}
        if any(is_generation_method(m) for m in self.methods):
            shares["cluster.actor_num_gpus"] = self.cluster.actor_num_gpus
            if trains_models(self.methods):
                gpu = {k.upper(): v for k, v in self.finetune.trial_resources.items()}.get("GPU", 0.0)
                shares["finetune.trial_resources.GPU"] = float(gpu)
            shares["generate.actor_num_gpus"] = self.generate.actor_num_gpus
            shares["filter.actor_num_gpus"] = self.filter.actor_num_gpus
        shares["train.use_gpu"] = 1.0 if self.train.use_gpu else 0.0
        return shares

    def slice_hash(self, *sections: str) -> str:
        """Hash of the named sections (dotted paths allowed): what a stage's output depends on."""
        tree = self.model_dump(mode="json")
        for name in seeded_sections(type(self)):  # a section's output depends on the seed it reads
            tree[name]["seed"] = self.seed
        return digest({s: _dig(tree, s) for s in sorted(sections)})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def seeded_sections(model: type[BaseModel] = Config) -> tuple[str, ...]:
    """The sections of ``model`` whose randomness the run's ``seed`` sets (SeededSection)."""
    return tuple(
        name for name, field in model.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, SeededSection)
    )


SEEDED_SECTIONS = seeded_sections()


def _dig(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _fields_of(model: type[BaseModel], path: list[str]) -> list[str]:
    """Valid keys at a dotted path of the config, for error messages."""
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _format_error(err: ValidationError, raw: dict) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"] if not str(p).startswith(("literal[", "function-"))]
    key = ".".join(loc)
    # A key typed with a line break (or a dict key read from YAML) must not split the line.
    key = repr(key)[1:-1]
    msg = first["msg"].removeprefix("Value error, ")
    if not key:  # a check across sections names its keys itself
        return f"config error: {msg}"
    if first["type"] == "extra_forbidden":
        valid = _fields_of(Config, loc[:-1])
        return f"config error: unknown key '{key}'; valid keys here: {', '.join(valid)}"
    value = first.get("input")
    return f"config error: {key} = {value!r}: {msg}"


def resolve_preset(preset: str | Path | None) -> Path | None:
    """A preset is a YAML path, or a name in engine/configs/ (with or without .yaml)."""
    if preset is None:
        return None
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    named = PRESET_DIR / f"{Path(preset).stem}.yaml"
    if named.exists():
        return named
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise FairsynthError(
        f"config error: preset {str(preset)!r} not found (no such file, and not one of: {', '.join(known)})"
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise FairsynthError(f"config error: --set {text!r} must look like key.path=value")
    key, _, raw = text.partition("=")
    path = key.strip().split(".")
    if not all(path):
        raise FairsynthError(f"config error: --set {text!r}: the key path {key.strip()!r} has an empty part; "
                             "write key.path=value, e.g. train.epochs=4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except Exception:  # YAML's constructors also raise ValueError (2001-02-30, !!int x) and others
        value = raw  # what does not parse as YAML is the text typed
    return path, value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _read_preset(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise FairsynthError(f"config error: {path}{where} is not valid YAML; fix its syntax") from None
    except UnicodeDecodeError:
        raise FairsynthError(f"config error: {path} is not UTF-8 text; save it as UTF-8") from None
    except Exception as exc:  # YAML's constructors also raise ValueError (2001-02-30, !!int x) and others
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise FairsynthError(f"config error: {path} holds a value YAML cannot read ({reason}); quote it or fix it") from None
    if not isinstance(raw, dict):
        raise FairsynthError(f"config error: {path} must hold a mapping of config keys")
    return raw


def merge_trees(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``: mappings merge key by key, anything else (a list, a value,
    null) replaces what the base had."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def preset_tree(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A preset's keys over those of the preset its ``extends`` key names (a name in
    engine/configs/), recursively, so a variant states only what it changes."""
    chain = (*_chain, path.resolve())
    if path.resolve() in _chain:
        names = " -> ".join(p.stem for p in chain)
        raise FairsynthError(f"config error: presets extend each other in a cycle ({names}); remove one extends")
    raw = _read_preset(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = PRESET_DIR / f"{parent}.yaml"
    if not isinstance(parent, str) or not base.exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise FairsynthError(
            f"config error: {path} extends {parent!r}, which is not a preset in engine/configs/ (known: {', '.join(known)})"
        )
    return merge_trees(preset_tree(base, chain), raw)


def load_config(preset: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the config from defaults, a preset (and the presets it extends; none given: the
    embedded default, ``tiny``) and ``key.path=value`` overrides."""
    raw = preset_tree(resolve_preset(DEFAULT_PRESET if preset is None else preset))
    for text in overrides:
        key, value = parse_override(text)
        _set_path(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise FairsynthError(_format_error(err, raw)) from None
