"""Can the shipped tiny Stable Diffusion draw what it is asked for?

Generates ``--per-prompt`` images for every (object, background) prompt of the built-in world
through ``load_pipeline("tiny")``, trains a small judge CNN on real procedurally drawn
base-style images, and reports how often the judge reads back the prompted object and
background, plus the sampling throughput. Then the same for the engine's own prompt words,
every (class, attribute) pairing ("a photo of a waterbird on land"): how often the judge reads
back the prompted class and attribute. Prints a markdown table, then JSON as the last line.

    python benchmarks/research/tiny_model_quality.py [--per-prompt 20] [--guidance 6] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.models.loading import load_pipeline  # noqa: E402
from engine.stages.data.builtin import (  # noqa: E402
    ATTRIBUTE_NAMES,
    BACKGROUND_ATTRIBUTE,
    BACKGROUNDS,
    CLASS_NAMES,
    OBJECT_CLASS,
    OBJECTS,
    caption,
    render,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="tiny", help="the model to judge: 'tiny', a folder or a hub id")
    p.add_argument("--per-prompt", type=int, default=20)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--judge-images", type=int, default=3000)
    p.add_argument("--judge-steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def generate(pipe, prompts: list[str], seeds: list[int], batch: int, steps: int, guidance: float):
    images, seconds = [], 0.0
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        t = time.perf_counter()
        out = pipe(prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="np").images
        seconds += time.perf_counter() - t
        images.append(np.clip(np.round(out * 255), 0, 255).astype(np.uint8))
    return np.concatenate(images), seconds


class Judge(nn.Module):
    """A small CNN with an object head and a background head."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, width), block(width, 2 * width),
                                      block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.object_head = nn.Linear(2 * width, len(OBJECTS))
        self.background_head = nn.Linear(2 * width, len(BACKGROUNDS))

    def forward(self, x):
        h = self.features(x)
        return self.object_head(h), self.background_head(h)


def as_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def real_images(n: int, seed: int):
    rng = np.random.default_rng(seed)
    obj, bg = rng.integers(0, len(OBJECTS), n), rng.integers(0, len(BACKGROUNDS), n)
    seeds = rng.integers(0, 2**31 - 1, n)
    images = np.stack([render(OBJECTS[o], BACKGROUNDS[b], int(s), "base")
                       for o, b, s in zip(obj, bg, seeds, strict=True)])
    return images, torch.as_tensor(obj), torch.as_tensor(bg)


def train_judge(n: int, steps: int, seed: int) -> tuple[Judge, float, float]:
    torch.manual_seed(seed)
    images, obj, bg = real_images(n, seed)
    x = as_input(images)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        # Mild pixel noise: generated images are not pixel-perfect renders.
        xb = x[idx] + 0.05 * torch.randn(x[idx].shape, generator=gen)
        lo, lb = judge(xb)
        loss = F.cross_entropy(lo, obj[idx]) + F.cross_entropy(lb, bg[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    judge.eval()
    held_out, hobj, hbg = real_images(600, seed + 1)
    acc_o, acc_b = accuracy(judge, held_out, hobj, hbg)
    return judge, acc_o, acc_b


@torch.no_grad()
def accuracy(judge: Judge, images: np.ndarray, obj, bg) -> tuple[float, float]:
    lo, lb = judge(as_input(images))
    obj, bg = torch.as_tensor(obj), torch.as_tensor(bg)
    return (lo.argmax(1) == obj).float().mean().item(), (lb.argmax(1) == bg).float().mean().item()


@torch.no_grad()
def word_accuracy(judge: Judge, images: np.ndarray, labels, attributes) -> tuple[float, float]:
    """How often the judge's object is of the prompted class, and its background of the
    prompted attribute."""
    lo, lb = judge(as_input(images))
    object_class = torch.tensor([OBJECT_CLASS[o] for o in OBJECTS])
    background_attribute = torch.tensor([BACKGROUND_ATTRIBUTE[b] for b in BACKGROUNDS])
    read_class, read_attribute = object_class[lo.argmax(1)], background_attribute[lb.argmax(1)]
    return ((read_class == torch.as_tensor(labels)).float().mean().item(),
            (read_attribute == torch.as_tensor(attributes)).float().mean().item())


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe = load_pipeline(args.base, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pairs = [(o, b) for o in range(len(OBJECTS)) for b in range(len(BACKGROUNDS))]
    pairs = [p for p in pairs for _ in range(args.per_prompt)]
    prompts = [caption(OBJECTS[o], BACKGROUNDS[b]) for o, b in pairs]
    seeds = [args.seed * 1_000_003 + i for i in range(len(prompts))]
    pipe(prompts[:2], num_inference_steps=2, output_type="np")  # warm-up
    images, seconds = generate(pipe, prompts, seeds, args.batch, args.steps, args.guidance)
    # The engine's prompts: class and attribute words, every pairing, as many images in all.
    word_pairs = [(c, a) for c in range(len(CLASS_NAMES)) for a in range(len(ATTRIBUTE_NAMES))]
    word_pairs = [p for p in word_pairs for _ in range(len(pairs) // len(word_pairs))]
    word_images, _ = generate(pipe, [caption(CLASS_NAMES[c], ATTRIBUTE_NAMES[a]) for c, a in word_pairs],
                              [s + len(prompts) for s in seeds[: len(word_pairs)]], args.batch, args.steps,
                              args.guidance)
    judge, real_obj, real_bg = train_judge(args.judge_images, args.judge_steps, args.seed)
    obj_acc, bg_acc = accuracy(judge, images, [o for o, _ in pairs], [b for _, b in pairs])
    class_acc, attribute_acc = word_accuracy(judge, word_images, [c for c, _ in word_pairs],
                                             [a for _, a in word_pairs])
    result = {
        "benchmark": "tiny_model_quality",
        "base": args.base,
        "images": len(images),
        "steps": args.steps,
        "guidance": args.guidance,
        "batch": args.batch,
        "threads": args.threads,
        # Headline: the weakest reading; the shipped model should draw what both vocabularies ask.
        "metric": "min_object_background_class_attribute_accuracy",
        "value": round(min(obj_acc, bg_acc, class_acc, attribute_acc), 4),
        "target": 0.9,
        "device": f"cpu ({args.threads} threads)",
        "object_accuracy": round(obj_acc, 4),
        "background_accuracy": round(bg_acc, 4),
        "class_word_accuracy": round(class_acc, 4),
        "attribute_word_accuracy": round(attribute_acc, 4),
        "judge_real_object_accuracy": round(real_obj, 4),
        "judge_real_background_accuracy": round(real_bg, 4),
        "images_per_s": round(len(images) / seconds, 2),
        "seconds": round(time.time() - t0, 1),
    }
    print("| model | images | steps | guidance | object acc | background acc | class-word acc "
          "| attribute-word acc | images/s (batch, threads) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.base} | {len(images)} + {len(word_images)} | {args.steps} | {args.guidance} | "
          f"{obj_acc:.3f} | {bg_acc:.3f} | {class_acc:.3f} | {attribute_acc:.3f} | "
          f"{result['images_per_s']} ({args.batch}, {args.threads}) |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
