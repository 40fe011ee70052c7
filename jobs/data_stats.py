"""Describe a dataset before spending GPU hours: groups, aligned attributes, counts per split,
and what is missing (a group with no images in a split, image files that do not exist).

    python jobs/data_stats.py --data.name manifest --data.root DIR     # your own folder + CSV
    python jobs/data_stats.py --config waterbirds_0999 [--json]
    python jobs/data_stats.py --dataset waterbirds --root DIR --severity 0.999

Any config key works as a flag (--data.root DIR is --set data.root=DIR). ``fairsynth stats``
is the same function (engine.commands.stats_command).
"""

import sys

import _path  # noqa: F401

from engine.cli import run_job
from engine.commands import stats_command

if __name__ == "__main__":
    run_job(lambda: stats_command(sys.argv[1:], prog="data_stats.py"))
