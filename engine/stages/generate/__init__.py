"""The generate stage: group-balanced synthetic images from fine-tuned Stable Diffusion.

``run_generate_stage(cfg, run, method)`` plans a group-balanced set from the method's finetune
manifest and streams it through Ray Data sampler actors into ``RUN/synthetic/<method>/*.parquet``
(the filter stage, engine.stages.filter, then marks the rows it keeps). ``read_synthetic`` reads
a method's rows back for the train stage.
"""

from engine.stages.generate.plan import GroupBalancedPlan
from engine.stages.generate.shards import SYNTHETIC_SCHEMA, read_synthetic
from engine.stages.generate.stage import run_generate_stage

__all__ = [
    "GroupBalancedPlan",
    "SYNTHETIC_SCHEMA",
    "read_synthetic",
    "run_generate_stage",
]
