"""The generate and filter stages: group-balanced synthetic images from fine-tuned Stable Diffusion.

``run_generate_stage(cfg, run, method)`` plans a group-balanced set from the method's finetune
manifest and streams it through Ray Data sampler actors into ``RUN/synthetic/<method>/*.parquet``;
``run_filter_stage(cfg, run, method)`` scores each image against its class prompt and its
group's real-image centroid and marks the top share per group ``kept``. ``read_synthetic`` reads
a method's rows back for the train stage.
"""

from engine.generate.filtering import run_filter_stage
from engine.generate.plan import GroupBalancedPlan
from engine.generate.shards import SYNTHETIC_SCHEMA, read_synthetic
from engine.generate.stage import run_generate_stage

__all__ = [
    "GroupBalancedPlan",
    "SYNTHETIC_SCHEMA",
    "read_synthetic",
    "run_filter_stage",
    "run_generate_stage",
]
