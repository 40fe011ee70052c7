"""Fine-tuning Stable Diffusion per unit (a group, or a group's cluster) as parallel Ray Tune
trials, for every generation method in ``engine.generation_methods``."""

from engine.stages.finetune.stage import load_manifest, run_finetune_stage

__all__ = ["load_manifest", "run_finetune_stage"]
