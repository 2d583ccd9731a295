"""Step-time and memory benchmark of the trainer's paths, measured in one process.

    python3 scripts/bench.py                          # tiny preset on this machine
    python3 scripts/bench.py --preset 11L --steps 30  # the record size (on a GPU)
    python3 scripts/bench.py --paths vanilla,next_ema --env "TRAIN_BATCH_TOKENS=16384"
    python3 scripts/bench.py --spec arms.json --baseline vanilla --json times.json  # scripts/ab.py's calibration

Every path is the real Trainer.step() of train_gpt_jepa.py (same compile, batch and data as a
run), differing only in the environment settings listed in PATHS. Paths are timed in
alternating rounds, so drift of a shared machine hits them all alike, and each path's step time
is the median over its rounds. A path's ratio is the median over rounds of its time divided by the
baseline's time in the same round (vanilla, JEPA_WEIGHT=0, unless --baseline): a round's paths
run back to back, so the machine's drift between rounds cancels. Compare ratios, not absolute
times, between machines. Without DATA_PATH shards a
synthetic shard of random tokens is used (step time does not depend on token values).

--pull times, for each JEPA path, a log step without and with the pull measurement
(Trainer.log_step_pull: ||g_JEPA|| / ||g_CE|| and Muon's update cosine from a fresh forward of the
last micro-batch), beside a plain training step: what the measurement costs in wall-clock time
(the training clock is paused for it, so it never reaches train_time).

    python3 scripts/bench.py --paths next_ema,span_ema --pull

--spec FILE replaces the built-in paths by {"name": {"ENV": "value", ...}, ...}: each path's
complete settings (scripts/ab.py measures its arms this way for --budget compute); ratios are
then against --baseline. Every path is timed with its JEPA weight constant (JEPA_WARMUP_STEPS=0,
JEPA_ANNEAL=0) and without an end to its schedule, so each timed step costs what a steady step
of that path costs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train_gpt_jepa as trainer_module  # noqa: E402

JEPA_ON = {"JEPA_WEIGHT": "0.1"}
# What every timed path gets on top of its settings: no end to the schedule, constant JEPA weight.
TIMING_SETTINGS = {"MAX_WALLCLOCK_SECONDS": "0", "ITERATIONS": "1000000", "JEPA_WARMUP_STEPS": "0", "JEPA_ANNEAL": "0"}
PATHS: dict[str, dict[str, str]] = {
    "vanilla": {"JEPA_WEIGHT": "0"},
    "next_ema": {**JEPA_ON, "JEPA_MODE": "next", "TARGET_EMA_DECAY": "0.9995"},
    "next_ema_frac25": {**JEPA_ON, "JEPA_MODE": "next", "TARGET_EMA_DECAY": "0.9995", "JEPA_TARGET_FRACTION": "0.25"},
    "next_sg": {**JEPA_ON, "JEPA_MODE": "next", "TARGET_EMA_DECAY": "0"},
    "chunk_sg": {**JEPA_ON, "JEPA_MODE": "chunk", "TARGET_EMA_DECAY": "0"},
    "span_ema": {**JEPA_ON, "JEPA_MODE": "span", "TARGET_EMA_DECAY": "0.9995"},
}


def synthetic_shard_folder(vocab_size: int, num_tokens: int) -> str:
    """A folder with one train shard of random tokens in the challenge format."""
    folder = tempfile.mkdtemp(prefix="bench_shards_")
    header = np.zeros(trainer_module.SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (trainer_module.SHARD_MAGIC, trainer_module.SHARD_VERSION, num_tokens)
    tokens = np.random.default_rng(0).integers(0, vocab_size, num_tokens, dtype=np.uint16)
    with open(os.path.join(folder, "fineweb_train_000000.bin"), "wb") as handle:
        handle.write(header.tobytes())
        handle.write(tokens.astype("<u2").tobytes())
    return folder


def build_trainer(environ: dict[str, str], data_path: str) -> trainer_module.Trainer:
    hp = trainer_module.load_hyperparameters(environ)
    grad_accum_steps = trainer_module.validate_hyperparameters(hp, world_size=1)
    runtime = trainer_module.setup_runtime(hp)
    files = trainer_module.find_shards(data_path, "train")
    return trainer_module.Trainer(hp, runtime, grad_accum_steps, files, trainer_module.RunLogger(None))


def time_steps(trainer: trainer_module.Trainer, first_step: int, steps: int) -> float:
    trainer.runtime.synchronize()
    started = time.perf_counter()
    for offset in range(steps):
        trainer.step(first_step + offset, lambda: 0.0)
    trainer.runtime.synchronize()
    return 1000.0 * (time.perf_counter() - started) / steps


def measure(paths: dict[str, dict[str, str]], steps: int, rounds: int, warmup: int
            ) -> tuple[dict[str, list[float]], dict[str, float | None], trainer_module.Runtime]:
    """Step times (ms, one value per round) and peak GPU memory of each path's real Trainer.step,
    built in this process and timed in alternating rounds. Each path's dict is its complete
    environment (DATA_PATH included)."""
    trainers = {}
    for name, environ in paths.items():
        data_path = environ["DATA_PATH"]
        trainer = build_trainer(environ, data_path)
        for step in range(warmup):
            trainer.step(step, lambda: 0.0)
        trainers[name] = trainer
    runtime = next(iter(trainers.values())).runtime
    timings: dict[str, list[float]] = {name: [] for name in paths}
    peak_mib: dict[str, float | None] = {name: None for name in paths}
    for round_index in range(rounds):
        for name, trainer in trainers.items():
            if runtime.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timings[name].append(time_steps(trainer, warmup + round_index * steps, steps))
            if runtime.device.type == "cuda":
                peak_mib[name] = max(peak_mib[name] or 0.0, torch.cuda.max_memory_allocated() / 2**20)
    del trainers
    gc.collect()
    return timings, peak_mib, runtime


def measure_pull_cost(environ: dict[str, str], steps: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Per round, the median ms of: a training step; a log step as the loop runs it without the pull
    (step, metric read, JEPA diagnostics); the same with Trainer.log_step_pull; and the pull alone."""
    trainer = build_trainer(environ, environ["DATA_PATH"])
    step = 0
    for step in range(warmup):
        trainer.step(step, lambda: 0.0)
    runtime = trainer.runtime
    figures: dict[str, list[float]] = {"train_step": [], "log_step": [], "log_step_with_pull": [], "pull": []}

    def timed(action) -> tuple[float, object]:
        runtime.synchronize()
        started = time.perf_counter()
        result = action()
        runtime.synchronize()
        return 1000.0 * (time.perf_counter() - started), result

    def log_step(step_index: int) -> trainer_module.StepOutcome:
        outcome = trainer.step(step_index, lambda: 0.0)
        trainer.read_metrics()
        trainer.jepa_diagnostics()
        return outcome

    for _ in range(rounds):
        samples: dict[str, list[float]] = {name: [] for name in figures}
        for _ in range(steps):
            step += 1
            samples["train_step"].append(timed(lambda: trainer.step(step, lambda: 0.0))[0])
            step += 1
            samples["log_step"].append(timed(lambda: log_step(step))[0])
            step += 1
            log_ms, outcome = timed(lambda: log_step(step))
            pull_ms, _ = timed(lambda: trainer.log_step_pull(outcome))
            samples["log_step_with_pull"].append(log_ms + pull_ms)
            samples["pull"].append(pull_ms)
        for name, values in samples.items():
            figures[name].append(statistics.median(values))
    return figures


def report_pull_cost(environments: dict[str, dict[str, str]], args: argparse.Namespace) -> None:
    first = trainer_module.load_hyperparameters(next(iter(environments.values())))
    runtime = trainer_module.setup_runtime(first)
    print(f"device: {trainer_module.device_name(runtime)}  torch {torch.__version__}  compile: {runtime.compile}  "
          f"preset: {first.preset}  steps {args.steps} x rounds {args.rounds} (medians)")
    print(f"{'path':<18}{'step_ms':>9}{'log_step_ms':>13}{'+pull_ms':>10}{'pull_ms':>9}{'pull/step':>10}"
          f"{'per log step of TRAIN_LOG_EVERY':>33}")
    for name, environ in environments.items():
        hp = trainer_module.load_hyperparameters(environ)
        if not hp.jepa_enabled:
            continue
        figures = measure_pull_cost(environ, args.steps, args.rounds, args.warmup)
        median = {key: statistics.median(values) for key, values in figures.items()}
        every = hp.train_log_every
        overhead = median["pull"] / (every * median["train_step"]) if every > 0 else 0.0
        print(f"{name:<18}{median['train_step']:>9.1f}{median['log_step']:>13.1f}{median['log_step_with_pull']:>10.1f}"
              f"{median['pull']:>9.1f}{median['pull'] / median['train_step']:>10.3f}"
              f"{f'{overhead:.2%} wall-clock at {every}':>33}")


SYNTHETIC_FOLDERS: dict[str, str] = {}  # DATA_PATH without shards -> a synthetic shard folder, made once


def with_data(environ: dict[str, str]) -> dict[str, str]:
    """The environment with a DATA_PATH that has train shards (a synthetic one if it has none)."""
    probe = trainer_module.load_hyperparameters(environ)
    if list(Path(probe.data_path).glob("fineweb_train_*.bin")):
        return {**environ, "DATA_PATH": probe.data_path}
    if probe.data_path not in SYNTHETIC_FOLDERS:
        SYNTHETIC_FOLDERS[probe.data_path] = synthetic_shard_folder(
            probe.vocab_size, num_tokens=max(4 * probe.train_batch_tokens, 1 << 20))
        print(f"bench: no shards under {probe.data_path}: using synthetic random tokens in "
              f"{SYNTHETIC_FOLDERS[probe.data_path]}")
    return {**environ, "DATA_PATH": SYNTHETIC_FOLDERS[probe.data_path]}



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="PRESET of the trainer (tiny, 11L, frontier, 20L)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per path and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the paths")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per path first (compilation)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma list of: {', '.join(PATHS)}")
    parser.add_argument("--env", default="", help='extra settings for every path, e.g. "COMPILE=0 SEED=2"')
    parser.add_argument("--spec", help="JSON file {name: {ENV: value}}: complete settings of each path to time")
    parser.add_argument("--baseline", default="vanilla", help="the path ratios are taken against (default vanilla)")
    parser.add_argument("--json", dest="json_path", help="also write the figures to this JSON file")
    parser.add_argument("--pull", action="store_true",
                        help="time a log step with and without the JEPA pull measurement instead (JEPA paths)")
    args = parser.parse_args(argv)

    extra = dict(item.split("=", 1) for item in args.env.split())
    if args.spec:
        specified = json.loads(Path(args.spec).read_text(encoding="utf-8"))
        path_settings = {name: {**settings, **extra} for name, settings in specified.items()}
        base: dict[str, str] = {}
    else:
        names = [name.strip() for name in args.paths.split(",") if name.strip()]
        unknown = [name for name in names if name not in PATHS]
        if unknown:
            parser.error(f"--paths: unknown paths {unknown}")
        path_settings = {name: {**PATHS[name], **extra} for name in names}
        base = {"PRESET": args.preset, "WARMDOWN_ITERS": "0", "FINAL_EMA": "0"}
    if not args.pull and args.baseline not in path_settings:
        parser.error(f"--baseline {args.baseline}: not among the paths ({', '.join(path_settings)})")
    environments = {name: with_data({**base, **settings, **TIMING_SETTINGS}) for name, settings in path_settings.items()}
    if args.pull:
        report_pull_cost(environments, args)
        return 0
    timings, peak_mib, runtime = measure(environments, args.steps, args.rounds, args.warmup)
    names = list(environments)
    hp = trainer_module.load_hyperparameters(environments[args.baseline])
    print(f"device: {trainer_module.device_name(runtime)}  torch {torch.__version__}  compile: {runtime.compile}  "
          f"autocast: {runtime.autocast_dtype}")
    print(f"preset: {hp.preset}  layers {hp.num_layers} dim {hp.model_dim}  batch {hp.train_batch_tokens} tokens "
          f"x seq {hp.train_seq_len}  steps {args.steps} x rounds {args.rounds}  extra: {args.env or '-'}")
    def ratio(name: str) -> float:  # paired by round: drift of a shared machine between rounds cancels
        return statistics.median(t / b for t, b in zip(timings[name], timings[args.baseline]))

    rows = []
    print(f"{'path':<18}{'step_avg_ms':>12}{'ratio':>8}{'peak_MiB':>10}   rounds (ms); ratios to {args.baseline}")
    for name in names:
        median = statistics.median(timings[name])
        memory = f"{peak_mib[name]:.0f}" if peak_mib[name] is not None else "n/a"
        spread = " ".join(f"{value:.1f}" for value in timings[name])
        print(f"{name:<18}{median:>12.2f}{ratio(name):>8.3f}{memory:>10}   {spread}")
        rows.append({"path": name, "settings": path_settings[name], "step_avg_ms": median, "ratio": ratio(name),
                     "peak_memory_mib": peak_mib[name], "rounds_ms": timings[name]})
    if args.json_path:
        record = {"device": trainer_module.device_name(runtime), "torch": torch.__version__, "preset": hp.preset,
                  "compile": runtime.compile, "extra_env": args.env, "steps": args.steps, "rounds": args.rounds,
                  "warmup": args.warmup, "baseline": args.baseline, "paths": rows}
        Path(args.json_path).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
