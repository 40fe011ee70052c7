"""Generate a method's group-balanced synthetic set with Ray Data sampler actors, then filter it
by CLIP score (keep the top share of each group), and write RUN/synthetic/<method>/*.parquet,
RUN/grids/<method>.png and RUN/filter/<method>/summary.json.

Needs the finetune stage's manifest for the method, and the cluster stage for filtering.
Re-running the same command resumes: shards already written are kept, only missing ones are drawn.
"""

import _path  # noqa: F401

from engine.cli import config_from_args, job_parser, run_job
from engine.generation_methods import method_names


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--method", choices=method_names(), required=True)
    parser.add_argument("--skip-filter", action="store_true", help="generate only; scores stay NaN")
    args = parser.parse_args()

    from engine.runlock import hold_until_exit
    from engine.runs import RunDir
    from engine.stages.filter import run_filter_stage
    from engine.stages.generate import run_generate_stage

    cfg = config_from_args(args)
    run = RunDir(cfg.run_dir)
    hold_until_exit(cfg.run_dir, force=args.force)  # one job per run directory
    run.prepare(cfg, force=args.force)
    # The stages start or join Ray (cfg.ray) only when they have work to do.
    generated = run_generate_stage(cfg, run, args.method)
    rate = generated.get("images_per_second_after_start")
    print(
        f"{args.method}: {generated['images']} images in {generated['shards']} shards "
        f"({generated['shards_written']} written now{f', {rate:.1f} images/s' if rate else ''}) "
        f"-> {run / 'synthetic' / args.method}"
    )
    print(f"grid: {run / 'grids' / f'{args.method}.png'}")
    if args.skip_filter:
        return
    filtered = run_filter_stage(cfg, run, args.method)
    print(
        f"filter (encoder {filtered['encoder']!r}, alpha {filtered['alpha']}, keep {filtered['keep_fraction']}): "
        f"kept {filtered['kept']} of {filtered['images']}"
    )
    print(f"{'group':<32} {'images':>6} {'kept':>5} {'score kept':>10} {'dropped':>8}")
    for group, g in filtered["per_group"].items():
        kept = "-" if g["mean_score_kept"] is None else f"{g['mean_score_kept']:.3f}"
        dropped = "-" if g["mean_score_dropped"] is None else f"{g['mean_score_dropped']:.3f}"
        print(f"{group:>2} {g['name']:<29} {g['images']:>6} {g['kept']:>5} {kept:>10} {dropped:>8}")


if __name__ == "__main__":
    run_job(main)
