"""The train stage: Ray Train DDP classifiers for ERM, Group-DRO and the synthetic
pretraining methods (engine.stages.train.stage owns the run-directory outputs)."""

from engine.stages.train.stage import run_train_stage, run_train_stages, train_complete

__all__ = ["run_train_stage", "run_train_stages", "train_complete"]
