"""Pretrain the embedded tiny models on the built-in base corpus and ship them in the package
(engine/models/pretrain.py has the phases: vae, unet, clip). A re-run after a crash skips the
phases whose results are in --work-dir.

    python jobs/pretrain_tiny.py                                  # everything, ~1 h on 2 cores
    python jobs/pretrain_tiny.py --phases clip                    # only the tiny CLIP
    python jobs/pretrain_tiny.py --phases vae,unet --init-from engine/models/tiny_sd  # continue
    python jobs/pretrain_tiny.py --smoke --out-sd /tmp/sd --out-clip /tmp/clip
"""

import argparse
import json
import time
from dataclasses import MISSING, fields

import _path  # noqa: F401

from engine.cli import run_job


def parse_settings(argv=None):
    """(PretrainSettings, torch threads) from the command line: one option per setting, its
    default the library's."""
    from engine.models.pretrain import PretrainSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for setting in fields(PretrainSettings):
        default = setting.default_factory() if setting.default is MISSING else setting.default
        option = "--" + setting.name.replace("_", "-")
        doc = f"{setting.metadata.get('help', '')} (default: %(default)s)".lstrip()
        if setting.name == "phases":
            parser.add_argument(option, default=",".join(default), help=f"comma-separated, {doc}")
        else:
            kind = setting.metadata.get("type") or (float if default is None else type(default))
            parser.add_argument(option, type=kind, default=default, help=doc)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--smoke", action="store_true", help="a few steps of every phase on a tiny corpus")
    values = vars(parser.parse_args(argv))
    threads, smoke = values.pop("threads"), values.pop("smoke")
    values["phases"] = tuple(p.strip() for p in values["phases"].split(",") if p.strip())
    settings = PretrainSettings(**values)
    return (settings.smoke() if smoke else settings), threads


def main() -> None:
    import torch

    from engine.models.pretrain import run_pretraining

    settings, threads = parse_settings()
    torch.set_num_threads(threads)
    started = time.time()
    for phase, stats in run_pretraining(settings).items():
        print(f"{phase}: {json.dumps(stats)}", flush=True)
    print(f"done in {time.time() - started:.0f} s (tiny SD: {settings.out_sd}, tiny CLIP: {settings.out_clip}, "
          f"judge: {settings.out_judge})")


if __name__ == "__main__":
    run_job(main)
