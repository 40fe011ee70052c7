"""The whole job: data, cluster, finetune, generate, filter, train and report, for every
method and severity in the config. With no arguments: the embedded tiny default.

    python jobs/full.py [--config PRESET] [--set key=value ...] [--run-dir DIR] [--force] [--seeds 0,1,2]
    ray job submit --working-dir . -- python jobs/full.py --config waterbirds_0999

--seeds runs the whole job once per seed (RUN/seed_<s>/; the config key ``seeds``) and reports
mean ± std over them beside each seed's figures.
"""

import time

import _path  # noqa: F401

from engine.cli import config_from_args, job_parser, run_job


def main() -> None:
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=None, metavar="S,S,...",
                        help="comma-separated seeds, e.g. 0,1,2: one whole run per seed, results as mean ± std")
    args = parser.parse_args()
    if args.seeds is not None:
        args.overrides.append(f"seeds=[{args.seeds}]")
    cfg = config_from_args(args)

    from engine import console, storage
    from engine.pipeline import run_full
    from engine.raylib import init_ray
    from engine.report import console_summary
    from engine.resources import check_cluster_supplies
    from engine.runlock import hold_until_exit
    from engine.runs import read_json

    start = time.perf_counter()
    hold_until_exit(cfg.run_dir, force=args.force)  # one job per run directory
    dashboard = init_ray(cfg.ray)
    if dashboard:
        print(f"ray dashboard: {dashboard}", flush=True)
    check_cluster_supplies(cfg)  # before any stage runs: a GPU preset on a machine without one

    def announce(stage: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {stage}", flush=True)

    table = run_full(cfg, force=args.force, on_stage=announce)
    rows = read_json(storage.as_path(cfg.run_dir) / "results.json")
    print()
    print(console_summary(rows, table, cfg.run_dir))
    if console.log_path() is not None:
        print(f"log: {console.log_path()} (Ray's own output; --verbose shows it here)")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_job(main)
