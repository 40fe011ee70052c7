"""The filter stage: score each synthetic image against its class prompt and its group's
real-image centroid, and mark the top share per group ``kept`` (engine.stages.filter.stage)."""

from engine.stages.filter.stage import run_filter_stage

__all__ = ["run_filter_stage"]
