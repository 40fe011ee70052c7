"""Training methods, chosen by name: each is a short list of phases the loop runs in order.

A phase says which data it reads (the real training split, or the method's kept synthetic
images), for how many epochs, at which learning rate, which parameters train, and which
loss: the per-sample loss and the batch aggregate (mean or Group-DRO). The loop runs
phases; it never asks which method it is running.

- ``erm``: cross-entropy on the real (biased) training set.
- ``group_dro``: Group-DRO on the real training set, optionally with group-balanced sampling.
- ``dfr``: Deep Feature Reweighting (Kirichenko et al. 2022), the real-data control for the
  generative methods' stage 2: ERM on the real set, then the last layer retrained on it
  group-balanced, with the generative methods' stage-2 settings.
- ``oracle`` (built-in benchmark only): a generative method's two stages, with its synthetic
  set replaced by as many fresh real renders per group (engine.stages.generate.oracle): the ceiling.
- ``vanilla``, ``lora``, ``dreambooth``, ``clustered_dreambooth``: stage 1 pretrains on that
  generator's kept synthetic images with beta * CE + (1 - beta) * SupCon; stage 2 fine-tunes
  on real data in the mode ``train.stage2`` names:
  ``last_layer`` (the paper: encoder frozen, cross-entropy, at ``finetune_learning_rate``),
  ``full`` (FFR's: every layer, beta * CE + (1 - beta) * SupCon, at ``learning_rate``), or
  ``group_dro`` (every layer, Group-DRO over cross-entropy, at ``learning_rate``), or
  ``none`` (no stage 2: the classifier trained on synthetic images alone, an ablation).
  Every stage-2 mode reads the real set group-balanced (``train.group_balanced_sampling``).

Why stage 2 resamples the real set group-balanced: at severity 0.999 a class's minority
group holds one or two of its ~1,000 real images, so an unweighted stage 2 is a fit to the
majority groups; it re-learns the shortcut on top of whatever the synthetic pretraining
taught the encoder, and worst-group accuracy then depends on which batch, early or late in
an epoch, happened to hold the one minority image. The paper fine-tunes the last layer "on
the real (biased) data" and does not say how it samples; we give stage 2 the same
group-balanced sampling the Group-DRO baseline gets (as DFR retrains a last layer on
group-balanced data), so the comparison is fair. ``benchmarks/research/ablation.py`` measures the
unbalanced stage 2 as a variant.

Why ``last_layer`` drops SupCon: the paper uses beta * CE + (1 - beta) * SupCon in both
stages, but its stage 2 freezes the encoder, and SupCon acts only on the encoder's features.
With the encoder frozen that term is a constant: its gradient is zero and it trains nothing.
So the contrastive term does its work where the encoder moves (stage 1, and stage 2 ``full``),
and ``last_layer`` trains, and logs, the cross-entropy alone. Under Adam, which is invariant
to a constant scale of the loss, the head's updates are those of beta * CE (up to weight
decay's relative weight), so this is the paper's stage 2 computed without the dead term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from engine.config import TrainConfig, known_methods
from engine.errors import FairsynthError
from engine.generation_methods import is_generation_method
from engine.stages.train.losses import CrossEntropy, CrossEntropySupCon, GroupDROLoss, MeanLoss

REAL, SYNTHETIC = "train", "synthetic"

Dataset = Literal["train", "synthetic"]  # REAL or SYNTHETIC: the Ray Data dataset the phase iterates
Trainable = Literal["all", "head"]  # "head": encoder frozen, BatchNorm statistics too
SampleLoss = Literal["ce", "ce_supcon"]  # SupCon only where the encoder trains
Aggregate = Literal["mean", "group_dro"]


@dataclass(frozen=True, kw_only=True)
class Phase:
    """One stretch of training. Fields are keyword-only and the closed sets are checked when
    a phase is built, so a misplaced or misspelt value fails at once, not mid-run."""

    name: str
    dataset: Dataset
    epochs: int
    learning_rate: float
    trainable: Trainable
    sample_loss: SampleLoss
    aggregate: Aggregate = "mean"
    balanced: bool = False  # group-balanced sampling of the phase's dataset

    @property
    def view(self) -> str:
        """The name of the Ray Data view the phase iterates: its dataset, sampled as it asks
        (a method may read the real set both as it is and group-balanced)."""
        return f"{self.dataset}_balanced" if self.balanced else self.dataset

    def __post_init__(self) -> None:
        for field, kind in (("dataset", Dataset), ("trainable", Trainable), ("sample_loss", SampleLoss),
                            ("aggregate", Aggregate)):
            valid = get_args(kind)
            if getattr(self, field) not in valid:
                raise ValueError(f"phase {self.name!r}: {field}={getattr(self, field)!r}; valid: {', '.join(valid)}")
        if self.sample_loss == "ce_supcon" and self.trainable == "head":
            raise ValueError(f"phase {self.name!r}: SupCon on a frozen encoder trains nothing; use 'ce'")

    def build_sample_loss(self, cfg: TrainConfig):
        if self.sample_loss == "ce":
            return CrossEntropy()
        return CrossEntropySupCon(cfg.loss_beta, cfg.supcon_temperature)

    def objective(self, cfg: TrainConfig) -> str:
        """The loss this phase trains, as the logs and metrics.json name it."""
        loss = self.build_sample_loss(cfg).describe()
        return f"Group-DRO over {loss}" if self.aggregate == "group_dro" else loss

    def build_aggregate(self, cfg: TrainConfig, n_groups: int, train_group_counts):
        if self.aggregate == "group_dro":
            return GroupDROLoss(n_groups, train_group_counts, cfg.group_dro_eta, cfg.group_dro_adjustment)
        return MeanLoss()


class Method:
    name = ""
    uses_synthetic = False
    synthetic_stage = ""  # the stage whose marker names the synthetic set it reads

    def phases(self, cfg: TrainConfig) -> list[Phase]:
        raise NotImplementedError


class ERM(Method):
    name = "erm"

    def phases(self, cfg: TrainConfig) -> list[Phase]:
        return [
            Phase(name="train", dataset=REAL, epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                  trainable="all", sample_loss="ce")
        ]


class GroupDRO(Method):
    name = "group_dro"

    def phases(self, cfg: TrainConfig) -> list[Phase]:
        return [
            Phase(name="train", dataset=REAL, epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                  trainable="all", sample_loss="ce", aggregate="group_dro", balanced=cfg.group_balanced_sampling)
        ]


class DFR(Method):
    """ERM, then the last layer retrained group-balanced: the generative methods' stage 2 on
    an encoder that learnt from the real set alone."""

    name = "dfr"

    def phases(self, cfg: TrainConfig) -> list[Phase]:
        erm = Phase(name="train", dataset=REAL, epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                    trainable="all", sample_loss="ce")
        last_layer = Phase(name="finetune", dataset=REAL, epochs=cfg.epochs, learning_rate=cfg.finetune_learning_rate,
                           trainable="head", sample_loss="ce", balanced=True)
        return [erm, last_layer]


class SyntheticPretraining(Method):
    """Pretrain on one generator's synthetic images, then fine-tune on the real ones."""

    uses_synthetic = True

    def __init__(self, generator: str, synthetic_stage: str | None = None):
        self.name = generator
        self.synthetic_stage = synthetic_stage or f"filter/{generator}"

    def phases(self, cfg: TrainConfig) -> list[Phase]:
        phases = []
        if cfg.pretrain_epochs > 0:
            # The synthetic set is group-balanced by construction: no resampling needed.
            phases.append(Phase(name="pretrain", dataset=SYNTHETIC, epochs=cfg.pretrain_epochs,
                                learning_rate=cfg.learning_rate, trainable="all", sample_loss="ce_supcon"))
        # Every stage-2 mode reads the real set group-balanced (module docstring).
        finetune = {"name": "finetune", "dataset": REAL, "epochs": cfg.epochs, "balanced": cfg.group_balanced_sampling}
        if cfg.stage2 == "none":
            return phases
        if cfg.stage2 == "last_layer":
            # The encoder is frozen: SupCon on its features has no gradient (module docstring).
            stage2 = Phase(**finetune, learning_rate=cfg.finetune_learning_rate, trainable="head", sample_loss="ce")
        elif cfg.stage2 == "full":
            stage2 = Phase(**finetune, learning_rate=cfg.learning_rate, trainable="all", sample_loss="ce_supcon")
        else:
            stage2 = Phase(**finetune, learning_rate=cfg.learning_rate, trainable="all", sample_loss="ce",
                           aggregate="group_dro")
        return [*phases, stage2]


METHODS: dict[str, Method] = {
    "erm": ERM(),
    "group_dro": GroupDRO(),
    "dfr": DFR(),
    # The oracle's "synthetic" set is real renders (engine.stages.generate.oracle).
    "oracle": SyntheticPretraining("oracle", synthetic_stage="oracle"),
}


def get_method(name: str) -> Method:
    """The training method of ``name``; every generation method pretrains on its synthetic set."""
    if is_generation_method(name):
        return SyntheticPretraining(name)
    if name not in METHODS:
        raise FairsynthError(f"unknown train method {name!r}; valid: {', '.join(known_methods())}")
    return METHODS[name]
