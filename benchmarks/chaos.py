"""Chaos: the tiny job with every method survives node deaths, driver kills and a stop inside
every stage, and ends equal to a run nothing disturbed.

The setup is a spot cluster in miniature: a ``ray.cluster_utils.Cluster`` with a 0-CPU head
and three worker nodes, ``run_dir`` on a local S3 server (moto's, which speaks the real
protocol), and ``jobs/full.py`` submitted as a driver that joins the cluster
(``ray.address``). Four runs of one small config, each in its own folder of the bucket:

1. **reference**: nothing disturbed. Its stage lines give each stage's duration.
2. **SIGTERM** and 3. **SIGKILL**: the driver is stopped once inside each stage (data,
   cluster, each method's fine-tuning, generation and filtering, train), at a random point of
   the stage's reference duration, and the same command is submitted again each time.
4. **chaos**: a loop removes a random worker node every ``--kill-every`` seconds and adds a
   fresh one, through every stage, and the driver is SIGKILLed ``--driver-kills`` times at
   random points and submitted again each time.

Each disturbed run must end equal to the reference (``engine.rundiff.differences``: shard
names and bytes, filter decisions, fine-tuned tensors, metrics apart from clocks) and undamaged
(``engine.rundiff.damage``: nothing half-written, nothing counted twice). Prints, per stage,
the faults it survived and the wall time the disturbed runs spent in it beyond the reference;
then a markdown row and, as the last line, one JSON object. Goal: at least 20 node kills and 2
driver kills in the chaos run, nothing lost.

The disturbed runs set ``finetune.max_failures`` and ``train.max_failures`` high, as a spot
cluster would: a trial or worker group whose node dies restarts from its last checkpoint.
Those fields set resources only, so every cache key stays the reference's. Node kills come
about 20 s apart by default: on 2 shared cores a fresh node and a restarted Train worker group
take 30 to 60 s to start, and kills 8 s apart kept the train stage from ever starting its
workers.

    python benchmarks/chaos.py                       # every method
    python benchmarks/chaos.py --methods erm,lora    # the slow test's config (tests/test_chaos.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the local S3 server the tests use
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

BUCKET = "fairsynth-chaos"
DONE = re.compile(r"done in \d+ s$")  # the job's last line (engine.commands)
# The tiny job at the storage tests' sizes: every stage, each a few seconds to a minute on 2 cores.
SMALL_JOB = [
    "ray.dashboard=false", "severities=[0.95]",
    "data.builtin.n_train=400", "data.builtin.n_val=40", "data.builtin.n_test=40",
    "finetune.steps=12", "finetune.checkpoint_every=4", "finetune.num_class_images=4",
    "generate.images_per_group=12", "generate.steps=4", "generate.rows_per_shard=4", "generate.batch_size=4",
    "train.epochs=1", "train.pretrain_epochs=1", "train.num_workers=1",
]
SPOT = ["finetune.max_failures=30", "train.max_failures=30"]  # resources only: no cache key moves
STAGE_LINE = re.compile(r"^\[\s*([\d.]+)s\] (.+)$")
TARGET_NODE_KILLS, TARGET_DRIVER_KILLS = 20, 2
ATTEMPT_LIMIT_S = 3600.0
RUNNING: set[subprocess.Popen] = set()  # drivers to stop if the benchmark itself is stopped


@dataclass
class Attempt:
    """One submission of the driver: the stages it announced (seconds since its start, name)."""

    stages: list[tuple[float, str]] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    code: int | None = None
    output: list[str] = field(default_factory=list)

    def last_line(self) -> str:
        return self.output[-1].strip() if self.output else ""

    def finished(self) -> bool:
        """Exit 0, or the job's closing ``done in ...`` line printed before a stop landed in
        its teardown (the work is all written by then; the next submission ends at once)."""
        return self.code == 0 or any(DONE.match(line) for line in self.output)

    def stage_seconds(self) -> dict[str, float]:
        if not self.stages:  # stopped before its first stage
            return {}
        ends = [offset for offset, _ in self.stages[1:]] + [self.ended - self.started]
        return {name: end - offset for (offset, name), end in zip(self.stages, ends, strict=True)}


@dataclass
class Scenario:
    name: str
    run_dir: str
    attempts: list[Attempt] = field(default_factory=list)
    faults: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # stage -> kind -> n
    problems: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(a.ended - a.started for a in self.attempts)


def stage_name(line: str) -> str | None:
    match = STAGE_LINE.match(line.strip())
    return match.group(2) if match else None


class Driver:
    """``jobs/full.py`` on the cluster, its output read line by line as it comes."""

    def __init__(self, run_dir: str, address: str, overrides: list[str], env: dict, log: Path):
        command = [sys.executable, str(ROOT / "jobs" / "full.py"), "--run-dir", run_dir]
        for override in [*overrides, f"ray.address={address}"]:
            command += ["--set", override]
        self.attempt = Attempt(started=time.monotonic())
        self.log = open(log, "a")  # noqa: SIM115 (closed in wait)
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        RUNNING.add(self.proc)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()  # readable while the driver runs
            self.attempt.output.append(line)
            name = stage_name(line)
            if name:
                self.attempt.stages.append((float(STAGE_LINE.match(line.strip()).group(1)), name))

    def stop_if_overdue(self, scenario: Scenario) -> None:
        """Kill a submission that has run past ATTEMPT_LIMIT_S (a hung driver), as a problem."""
        if time.monotonic() - self.attempt.started > ATTEMPT_LIMIT_S and self.proc.poll() is None:
            scenario.problems.append(f"a submission ran past {ATTEMPT_LIMIT_S:.0f} s and was killed")
            self.proc.kill()

    def current_stage(self) -> str:
        return self.attempt.stages[-1][1] if self.attempt.stages else "start-up"

    def wait(self, timeout: float = 3600) -> Attempt:
        self.attempt.code = self.proc.wait(timeout=timeout)
        RUNNING.discard(self.proc)
        self.reader.join(timeout=30)
        self.attempt.ended = time.monotonic()
        self.log.close()
        return self.attempt


def run_once(scenario: Scenario, address: str, overrides: list[str], env: dict, log: Path) -> Attempt:
    attempt = Driver(scenario.run_dir, address, overrides, env, log).wait()
    scenario.attempts.append(attempt)
    return attempt


def stop_inside_each_stage(scenario: Scenario, address: str, overrides: list[str], env: dict, log: Path,
                           reference: Attempt, sig: signal.Signals, rng: random.Random) -> None:
    """Submit, stop with ``sig`` once inside each of the reference's stages in turn (at a random
    point of its reference duration), submit again; then let the last submission finish."""
    durations = reference.stage_seconds()
    for target, seconds in durations.items():
        driver = Driver(scenario.run_dir, address, overrides, env, log)
        while driver.proc.poll() is None and target not in [name for _, name in driver.attempt.stages]:
            driver.stop_if_overdue(scenario)
            time.sleep(0.02)
        if driver.proc.poll() is None:
            time.sleep(rng.uniform(0.1, 0.7) * seconds)
            stopped_in = driver.current_stage()
            if driver.proc.poll() is None:
                driver.proc.send_signal(sig)
                scenario.faults[stopped_in][sig.name] += 1
        attempt = driver.wait()
        scenario.attempts.append(attempt)
        if attempt.code == 0:  # the target was already done, so the job finished
            return
        expected = 130 if sig == signal.SIGTERM else -signal.SIGKILL
        if attempt.code != expected and not attempt.finished():  # a stop in the teardown is no fault
            scenario.problems.append(f"stopped in {target!r} with {sig.name}: exit {attempt.code}, "
                                     f"last line {attempt.last_line()!r}")
    _finish(scenario, address, overrides, env, log)


def _finish(scenario: Scenario, address: str, overrides: list[str], env: dict, log: Path, tries: int = 3) -> None:
    for _ in range(tries):
        attempt = run_once(scenario, address, overrides, env, log)
        if attempt.code == 0:
            return
        scenario.problems.append(f"a resubmission failed: exit {attempt.code}, "
                                 f"last line {attempt.last_line()!r}")


class NodeChaos:
    """Removes a random worker node every ``every`` seconds (give or take half) and adds a fresh
    one; counts each kill against the stage the driver was in. Ray's ``Cluster.add_node``
    installs signal handlers, so this is driven from the main thread (:meth:`tick`)."""

    def __init__(self, cluster, workers: list, every: float, num_cpus: float, rng: random.Random):
        self.cluster, self.workers, self.every, self.num_cpus, self.rng = cluster, workers, every, num_cpus, rng
        self.kills: Counter = Counter()
        self.due = time.monotonic() + rng.uniform(0.5, 1.5) * every

    def tick(self, driver: Driver) -> None:
        if time.monotonic() < self.due or driver.proc.poll() is not None:
            return
        victim = self.rng.choice(self.workers)
        self.kills[driver.current_stage()] += 1
        self.cluster.remove_node(victim, allow_graceful=False)
        self.workers.remove(victim)
        self.workers.append(self.cluster.add_node(num_cpus=self.num_cpus))
        self.due = time.monotonic() + self.rng.uniform(0.5, 1.5) * self.every


def chaos_run(scenario: Scenario, chaos: NodeChaos, address: str, overrides: list[str], env: dict, log: Path,
              reference: Attempt, driver_kills: int, rng: random.Random, max_attempts: int = 12) -> None:
    """The job under node chaos, its driver SIGKILLed ``driver_kills`` times at random points of
    the reference's wall time and submitted again each time, until it finishes."""
    wall = reference.ended - reference.started
    killed = 0
    for _ in range(max_attempts):
        driver = Driver(scenario.run_dir, address, overrides, env, log)
        kill_at = driver.attempt.started + rng.uniform(0.15, 0.6) * wall if killed < driver_kills else float("inf")
        while driver.proc.poll() is None:
            driver.stop_if_overdue(scenario)
            chaos.tick(driver)
            if time.monotonic() >= kill_at and driver.proc.poll() is None:
                scenario.faults[driver.current_stage()]["driver SIGKILL"] += 1
                driver.proc.kill()
                killed += 1
                kill_at = float("inf")  # once: the process may take a moment to go
            time.sleep(0.1)
        attempt = driver.wait()
        scenario.attempts.append(attempt)
        if attempt.code == 0:
            break
        if attempt.code != -signal.SIGKILL:
            scenario.problems.append(f"the job failed under chaos (submitted again): exit {attempt.code}, "
                                     f"last line {attempt.last_line()!r}")
    else:
        scenario.problems.append(f"not finished after {max_attempts} submissions")
    for stage, n in chaos.kills.items():
        scenario.faults[stage]["node kill"] += n


def stage_costs(scenario: Scenario, reference: Attempt) -> dict[str, float]:
    """Seconds each stage took over all of a scenario's submissions, beyond the reference's."""
    spent: Counter = Counter()
    for attempt in scenario.attempts:
        spent.update(attempt.stage_seconds())
    return {name: spent[name] - seconds for name, seconds in reference.stage_seconds().items()}


def check(scenario: Scenario, reference_dir: str) -> None:
    from engine import rundiff

    if scenario.attempts and scenario.attempts[-1].code == 0:
        scenario.problems += rundiff.differences(scenario.run_dir, reference_dir) + rundiff.damage(scenario.run_dir)
    else:
        scenario.problems.append("the run never finished")


def table(scenarios: list[Scenario], reference: Attempt) -> str:
    kinds = sorted({kind for s in scenarios for counts in s.faults.values() for kind in counts})
    stages = list(reference.stage_seconds())
    stages += sorted({stage for s in scenarios for stage in s.faults} - set(stages))
    lines = ["| stage | reference s | " + " | ".join(kinds) + " | " + " | ".join(f"{s.name} +s" for s in scenarios) + " |",
             "|---" * (2 + len(kinds) + len(scenarios)) + "|"]
    costs = {s.name: stage_costs(s, reference) for s in scenarios}
    for stage in stages:
        faults = [sum(s.faults[stage][kind] for s in scenarios) for kind in kinds]
        extra = [f"{costs[s.name].get(stage, 0.0):+.0f}" for s in scenarios]
        ref = reference.stage_seconds().get(stage)
        lines.append(f"| {stage} | {'' if ref is None else f'{ref:.0f}'} | " + " | ".join(map(str, faults)) + " | "
                     + " | ".join(extra) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every method)")
    parser.add_argument("--kill-every", type=float, default=20.0, help="mean seconds between node kills (default 20)")
    parser.add_argument("--driver-kills", type=int, default=TARGET_DRIVER_KILLS)
    parser.add_argument("--signals", default="term,kill", help="systematic passes: term, kill, both or none")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--worker-cpus", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/chaos", help="folder for the drivers' logs")
    args = parser.parse_args(argv)
    from s3server import aws_env, moto_s3

    from engine.raylib import local_cluster

    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = SMALL_JOB + ([f"methods=[{args.methods}]"] if args.methods else [])
    signals = {"term": [signal.SIGTERM], "kill": [signal.SIGKILL], "both": [signal.SIGTERM, signal.SIGKILL],
               "term,kill": [signal.SIGTERM, signal.SIGKILL], "none": []}[args.signals]
    start = time.monotonic()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server: a line per request
    with moto_s3(BUCKET) as endpoint:
        os.environ.update(aws_env(endpoint))  # every node, the head included, inherits them, as a real cluster's nodes have them
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update({"TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"})
        with local_cluster(num_cpus=0, include_dashboard=False) as cluster:
            try:
                scenarios, first = _all_runs(cluster, args, overrides, signals, env, out, rng)
            finally:  # stopped (Ctrl-C, SIGTERM) or failed: no driver outlives the cluster
                for proc in RUNNING:
                    proc.kill()
    return report(scenarios, first, args, time.monotonic() - start)


def _all_runs(cluster, args, overrides, signals, env, out, rng) -> tuple[list[Scenario], Attempt]:
    workers = [cluster.add_node(num_cpus=args.worker_cpus) for _ in range(args.workers)]
    cluster.wait_for_nodes()
    reference = Scenario("reference", f"s3://{BUCKET}/reference")
    first = run_once(reference, cluster.address, overrides, env, out / "reference.log")
    if first.code != 0:
        raise SystemExit(f"the undisturbed run failed (exit {first.code}); see {out / 'reference.log'}")
    scenarios = []
    for sig in signals:
        scenario = Scenario(sig.name, f"s3://{BUCKET}/{sig.name.lower()}")
        stop_inside_each_stage(scenario, cluster.address, overrides + SPOT, env, out / f"{sig.name}.log",
                               first, sig, rng)
        scenarios.append(scenario)
    chaos = Scenario("chaos", f"s3://{BUCKET}/chaos")
    nodes = NodeChaos(cluster, workers, args.kill_every, args.worker_cpus, rng)
    chaos_run(chaos, nodes, cluster.address, overrides + SPOT, env, out / "chaos.log", first, args.driver_kills, rng)
    scenarios.append(chaos)
    for scenario in scenarios:
        check(scenario, reference.run_dir)
    return scenarios, first


def report(scenarios: list[Scenario], reference: Attempt, args, seconds: float) -> dict:
    print(table(scenarios, reference))
    print()
    for scenario in scenarios:
        print(f"{scenario.name}: {len(scenario.attempts)} submissions, {scenario.seconds:.0f} s "
              f"(reference {reference.ended - reference.started:.0f} s); "
              + ("equal to the reference, nothing damaged" if not scenario.problems else "PROBLEMS:"))
        for problem in scenario.problems:
            print(f"  - {problem}")
    chaos = next((s for s in scenarios if s.name == "chaos"), None)
    node_kills = sum(c["node kill"] for c in chaos.faults.values()) if chaos else 0
    driver_kills = sum(c["driver SIGKILL"] for c in chaos.faults.values()) if chaos else 0
    stops = {s.name: sum(sum(c.values()) for c in s.faults.values()) for s in scenarios if s.name != "chaos"}
    lost = sum(len(s.problems) for s in scenarios)
    print(f"\n| chaos | {node_kills} node kills, {driver_kills} driver kills, stops {stops}; problems: {lost} "
          f"| >= {TARGET_NODE_KILLS} node and {TARGET_DRIVER_KILLS} driver kills, nothing lost | "
          f"{platform.machine()} CPU | `python benchmarks/chaos.py` |")
    result = {"benchmark": "chaos", "metric": "node_kills", "value": node_kills, "target": TARGET_NODE_KILLS,
              "driver_kills": driver_kills, "stops": stops, "problems": [p for s in scenarios for p in s.problems],
              "equal": lost == 0, "seconds": round(seconds),
              "all_met": lost == 0 and node_kills >= TARGET_NODE_KILLS and driver_kills >= TARGET_DRIVER_KILLS, "reference_seconds": round(reference.ended - reference.started),
              "scenario_seconds": {s.name: round(s.seconds) for s in scenarios},
              "faults": {s.name: {stage: dict(c) for stage, c in s.faults.items()} for s in scenarios},
              "methods": args.methods or "all", "device": "cpu"}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
