"""Cluster each group's training images: embed them with the configured image encoder (Ray
Data actors), run FAISS k-means within each group, and write RUN/cluster/."""

import _path  # noqa: F401

from engine.cli import config_from_args, job_parser, run_job


def main() -> None:
    args = job_parser(__doc__).parse_args()
    cfg = config_from_args(args)

    from engine.runlock import hold_until_exit
    from engine.runs import RunDir, read_json
    from engine.stages.cluster.stage import run_cluster_stage

    run = RunDir(cfg.run_dir)
    hold_until_exit(cfg.run_dir, force=args.force)  # one job per run directory
    run.prepare(cfg, force=args.force)
    assignments = run_cluster_stage(cfg, run)
    summary = read_json(run / "cluster/summary.json")

    print(
        f"cluster: {len(assignments)} training images, encoder {summary['encoder']!r} (d={summary['dim']})"
    )
    print(f"{'group':<32} {'images':>6} {'k':>3}  {'sizes':<24} {'NMI':>5}  note")
    for g in summary["groups"]:
        nmi = "" if g["nmi"] is None else f"{g['nmi']:.3f}"
        sizes = ",".join(str(s) for s in g["cluster_sizes"])
        print(
            f"{g['group']:>2} {g['name']:<29} {g['n_images']:>6} {g['n_clusters']:>3}  "
            f"{sizes:<24} {nmi:>5}  {g['reason'] or ''}"
        )
    if summary["nmi_min"] is not None:
        print(
            f"NMI with sub-types over groups {summary['nmi_groups_counted']}: "
            f"min {summary['nmi_min']:.3f}, mean {summary['nmi_mean']:.3f}"
        )
    print(f"wrote {run / 'cluster'}")


if __name__ == "__main__":
    run_job(main)
