"""Fine-tuning Stable Diffusion per unit (a group, or a group's cluster) as parallel Ray Tune
trials: LoRA, DreamBooth and clustered DreamBooth, plus vanilla's untrained units."""

from engine.finetune.stage import load_manifest, run_finetune_stage
from engine.finetune.strategies import STRATEGIES, get_strategy

__all__ = ["STRATEGIES", "get_strategy", "load_manifest", "run_finetune_stage"]
