"""The cost planner: FLOPs, device-hours and wall time of every stage of a job on N devices
of a given kind, before any of it runs (``jobs/plan.py``).

- ``flops.py``: FLOPs of one sample through each model, counted on the meta device.
- ``counts.py``: images per group (read here, or documented split sizes), clusters, units.
- ``hardware.py``: peak FLOP/s per device kind and each stage's achieved fraction (MFU).
- ``stages.py``: one cost model per stage and the scheduler that turns work into time.
- ``plan.py``: the whole job's plan (``plan_job``), its tables, and ``compare_with_run``.
- ``measure.py``: measures each stage's MFU on the device it runs on.

Nothing is imported here, so that ``hardware`` stays cheap to import for argument checks.
"""
