"""Fine-tune one generator per unit (LoRA, DreamBooth, clustered DreamBooth) as parallel Ray
Tune trials, and write RUN/finetune/<method>/manifest.json.

Re-running the same command resumes: finished units are kept, unfinished trials continue from
their last checkpoint.
"""

import _path  # noqa: F401

from engine.cli import config_from_args, job_parser, run_job
from engine.generation_methods import method_names


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--method", choices=method_names(), required=True)
    args = parser.parse_args()

    from engine.raylib import init_ray
    from engine.resources import check_cluster_supplies
    from engine.runlock import hold_until_exit
    from engine.runs import RunDir
    from engine.stages.finetune import run_finetune_stage

    cfg = config_from_args(args)
    run = RunDir(cfg.run_dir)
    hold_until_exit(cfg.run_dir, force=args.force)  # one job per run directory
    run.prepare(cfg, force=args.force)
    init_ray(cfg.ray)
    check_cluster_supplies(cfg)
    manifest = run_finetune_stage(cfg, run, args.method)
    print(f"{args.method}: {len(manifest['units'])} units -> {run / f'finetune/{args.method}/manifest.json'}")
    for unit in manifest["units"]:
        source = f"borrows {unit['borrowed_from']}" if unit["borrowed_from"] else (unit["artifact"] or "base model")
        loss = "-" if unit["final_loss"] is None else f"{unit['final_loss']:.4f}"
        print(f"  {unit['unit']:>8}  n_real={unit['n_real']:<5} steps={unit['steps']:<4} loss={loss:<7} {source}")


if __name__ == "__main__":
    run_job(main)
