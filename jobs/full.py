"""The whole job: data, cluster, finetune, generate, filter, train and report, for every
method and severity in the config. With no arguments: the embedded tiny default.

    python jobs/full.py [--config PRESET] [--set key=value ...] [--run-dir DIR] [--force] [--seeds 0,1,2]
    ray job submit --working-dir . -- python jobs/full.py --config waterbirds_0999

--seeds runs the whole job once per seed (RUN/seed_<s>/; the config key ``seeds``) and reports
mean ± std over them beside each seed's figures. ``fairsynth run`` is the same function
(engine.commands.run_command).
"""

import sys

import _path  # noqa: F401

from engine.cli import run_job
from engine.commands import run_command

if __name__ == "__main__":
    run_job(lambda: run_command(sys.argv[1:], prog="full.py"))
