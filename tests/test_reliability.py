"""Long runs survive: SIGTERM + RESUME=auto continue bit for bit, a non-finite loss stops cleanly
(or is skipped), bad data gives one clear line, a checkpoint of another configuration is
refused, and the wall-clock cap counts training time only."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt_jepa as T
from conftest import TRAINER_PATH, trainer_env
from test_trainer import run_trainer

# SWA snapshots (of the EMA) after steps 4 and 6 go into the checkpoint, four more follow; late QAT starts after the resume.
RESUME_SETTINGS = dict(ITERATIONS=14, TRAIN_LOG_EVERY=1, VAL_LOSS_EVERY=5, FINAL_EMA=1, TARGET_EMA_DECAY=0.9,
                       JEPA_MODE="span", WARMDOWN_ITERS=12, LR_WARMUP_STEPS=2, JEPA_WARMUP_STEPS=3,
                       SWA_ENABLED=1, SWA_EVERY=2, SWA_START_LR=0.95)


def comparable(summary: dict) -> dict:
    """What must be identical between an interrupted-and-resumed run and an uninterrupted one."""
    strip = lambda entries: [{k: v for k, v in e.items() if k != "train_time_ms"} for e in entries]  # noqa: E731
    return {"train": strip(summary["train_history"]), "val": strip(summary["val_history"]),
            "val_bpb": summary["val_bpb"], "roundtrip_val_bpb": summary["roundtrip_val_bpb"], "steps": summary["steps"]}


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_dataset):
    straight = run_trainer(tmp_path / "straight", tiny_dataset, RUN_ID="straight", **RESUME_SETTINGS)
    assert straight.returncode == 0, straight.stderr[-2000:]

    folder = tmp_path / "interrupted"
    folder.mkdir()
    env = trainer_env(tiny_dataset, LOG_DIR=folder / "logs", ARTIFACT_PATH=folder / "model.ptz",
                      CHECKPOINT_DIR=folder / "checkpoints", RUN_ID="resumed", **RESUME_SETTINGS)
    process = subprocess.Popen([sys.executable, str(TRAINER_PATH)], cwd=folder, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # stop it in the middle, after step 6 has been logged
        if line.startswith("step:6/"):
            process.send_signal(signal.SIGTERM)
            break
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr
    assert stderr.strip().startswith("stopped: stopped by a signal after step") and "RESUME=auto" in stderr
    checkpoints = list((folder / "checkpoints" / "resumed").glob("step_*.pt"))
    assert len(checkpoints) == 1
    interrupted = json.loads((folder / "logs" / "resumed.json").read_text())
    assert interrupted["status"] == "interrupted" and 6 <= interrupted["steps"] < 14
    assert not (folder / "model.ptz").exists()

    resumed = subprocess.run([sys.executable, str(TRAINER_PATH)], cwd=folder, env={**env, "RESUME": "auto"},
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resume: {checkpoints[0]} at step {interrupted['steps']}" in resumed.stdout
    one = json.loads((tmp_path / "straight" / "logs" / "straight.json").read_text())
    two = json.loads((folder / "logs" / "resumed.json").read_text())
    assert comparable(two) == comparable(one)  # bit for bit: exact float equality
    assert one["final_weights"] == two["final_weights"] == "swa of 6 ema snapshots"


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path, tiny_dataset):
    result = run_trainer(tmp_path, tiny_dataset, RUN_ID="fresh", ITERATIONS=2, RESUME="auto",
                         CHECKPOINT_DIR=tmp_path / "none")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resume: no checkpoint under" in result.stdout


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path, tiny_dataset):
    first = run_trainer(tmp_path, tiny_dataset, RUN_ID="base", ITERATIONS=4, CHECKPOINT_EVERY=2,
                        CHECKPOINT_DIR=tmp_path / "checkpoints")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "base" / "step_000002.pt").exists()
    other = run_trainer(tmp_path, tiny_dataset, RUN_ID="base", ITERATIONS=4, RESUME="auto", JEPA_WEIGHT=0.3,
                        MODEL_DIM=192, NUM_HEADS=4, CHECKPOINT_DIR=tmp_path / "checkpoints", timeout=120)
    assert other.returncode == 2
    line = other.stderr.strip()
    assert line.startswith("error: checkpoint") and "different configuration" in line
    assert "JEPA_WEIGHT=0.3 (checkpoint: 0.1)" in line and "MODEL_DIM=192 (checkpoint: 128)" in line
    # Operational settings may change: logging cadence, where checkpoints go, the NaN policy.
    same = run_trainer(tmp_path, tiny_dataset, RUN_ID="base", ITERATIONS=4, RESUME="auto", TRAIN_LOG_EVERY=3,
                       NAN_POLICY="skip", CHECKPOINT_DIR=tmp_path / "checkpoints")
    assert same.returncode == 0, same.stderr[-2000:]


def test_resume_auto_needs_a_run_id(tmp_path, tiny_dataset):
    result = run_trainer(tmp_path, tiny_dataset, RESUME="auto", timeout=60)
    assert result.returncode == 2 and "RESUME=auto needs RUN_ID" in result.stderr


# ---------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------


def test_the_trainers_one_atomic_write_keeps_the_old_file_when_a_writer_fails(tmp_path):
    """atomic_output is how the trainer writes every file (artifact, checkpoint, summary, float
    weights): a writer that fails midway leaves the previous file whole and no temporary behind."""
    target = tmp_path / "deep" / "step_000001.pt"
    with T.atomic_output(target) as handle:
        torch.save({"step": 1}, handle)
    assert torch.load(target, weights_only=True) == {"step": 1}
    with pytest.raises(RuntimeError, match="disk went away"):
        with T.atomic_output(target) as handle:
            handle.write(b"half a checkpoint")
            raise RuntimeError("disk went away")
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert sorted(path.name for path in target.parent.iterdir()) == ["step_000001.pt"]
    T.write_atomically(target, b"bytes")
    assert target.read_bytes() == b"bytes" and len(list(target.parent.iterdir())) == 1


def test_a_nan_stops_cleanly_with_a_checkpoint_and_no_artifact(tmp_path, tiny_dataset):
    result = run_trainer(tmp_path, tiny_dataset, RUN_ID="nan", ITERATIONS=8, DEBUG_NAN_STEP=3,
                         CHECKPOINT_DIR=tmp_path / "checkpoints")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: non-finite loss at step 4: total_loss=nan ce_loss=")
    assert "jepa_loss=" in lines[0] and "reg_loss=" in lines[0]
    checkpoint = tmp_path / "checkpoints" / "nan" / "step_000003.pt"
    assert str(checkpoint) in lines[0]
    saved = torch.load(checkpoint, weights_only=True)
    assert all(torch.isfinite(tensor).all() for tensor in saved["model"].values())
    assert not (tmp_path / "model.ptz").exists()
    summary = json.loads((tmp_path / "logs" / "nan.json").read_text())
    assert summary["status"] == "nonfinite_loss" and summary["steps"] == 3
    # The line's advice works: resuming with NAN_POLICY=skip finishes the run.
    resumed = run_trainer(tmp_path, tiny_dataset, RUN_ID="nan", ITERATIONS=8, RESUME="auto", NAN_POLICY="skip",
                          CHECKPOINT_DIR=tmp_path / "checkpoints")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (tmp_path / "model.ptz").exists()


def test_nan_policy_skip_drops_the_step_and_logs_it(tmp_path, tiny_dataset):
    result = run_trainer(tmp_path, tiny_dataset, RUN_ID="skip", ITERATIONS=6, DEBUG_NAN_STEP=2, NAN_POLICY="skip")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step:3/6 skipped: non-finite loss (total_loss=nan" in result.stdout
    summary = json.loads((tmp_path / "logs" / "skip.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["status"] == "completed"
    assert all(np.isfinite(entry["train_loss"]) for entry in summary["train_history"])


# ---------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------


def copy_dataset(dataset: dict[str, Path], folder: Path) -> Path:
    target = folder / "data"
    shutil.copytree(dataset["data_path"], target)
    return target


def rewrite_header(path: Path, index: int, value: int) -> None:
    header = np.fromfile(path, dtype="<i4", count=256)
    header[index] = value
    with open(path, "r+b") as handle:
        handle.write(header.astype("<i4").tobytes())


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (T.SHARD_MAGIC, T.SHARD_VERSION, tokens.size)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


@pytest.mark.parametrize("damage, expected", [
    ("magic", "has magic 12345 version 1, expected 20240520 version 1: not a challenge shard"),
    ("version", "version 7, expected 20240520 version 1"),
    ("truncated", "truncated or corrupt"),
    ("token_id", "holds token id 2000 >= VOCAB_SIZE=1024"),
    ("short_val", "fewer than one sequence of TRAIN_SEQ_LEN=256"),
    ("no_train", "no train shards match"),
])
def test_data_errors_name_the_file_and_the_fix(tmp_path, tiny_dataset, damage, expected):
    data = copy_dataset(tiny_dataset, tmp_path)
    train_shard, val_shard = data / "fineweb_train_000000.bin", data / "fineweb_val_000000.bin"
    named = train_shard
    if damage == "magic":
        rewrite_header(train_shard, 0, 12345)
    elif damage == "version":
        rewrite_header(train_shard, 1, 7)
    elif damage == "truncated":
        train_shard.write_bytes(train_shard.read_bytes()[:-100])
    elif damage == "token_id":
        write_shard(train_shard, np.array([1, 5, 2000, 7] * 600))
    elif damage == "short_val":
        write_shard(val_shard, np.array([1, 5, 6, 7]))
        named = None
    else:
        train_shard.unlink()
        named = data
    result = run_trainer(tmp_path, tiny_dataset, DATA_PATH=data, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    if named is not None:
        assert str(named) in lines[0]
    assert any(fix in lines[0] for fix in ("rebuild or re-download", "build_local_corpus.py", "VOCAB_SIZE/TOKENIZER_PATH",
                                           "use more validation text"))


# ---------------------------------------------------------------------------
# Wall-clock cap
# ---------------------------------------------------------------------------


def test_the_wallclock_cap_counts_training_only(tmp_path, tiny_dataset):
    started = time.perf_counter()
    result = run_trainer(tmp_path, tiny_dataset, RUN_ID="capped", ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=4, QUANT="gptq",
                         VAL_LOSS_EVERY=3, VAL_MAX_TOKENS=8192, TRAIN_LOG_EVERY=50)
    wall_seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "logs" / "capped.json").read_text())
    assert "stopping_early: wallclock_cap" in result.stdout and summary["steps"] < 100000
    # The loop stops at the cap less the GPTQ reserve (2 s in the tiny preset); calibration follows.
    assert 2000 <= summary["train_time_ms"] <= 2000 + 3 * summary["step_avg_ms"] + 500
    assert summary["train_and_calibration_ms"] == pytest.approx(summary["train_time_ms"]
                                                                + summary["calibration_time_ms"], abs=0.2)
    assert summary["eval_time_ms"] > 500  # many validations ran, and their time was not counted
    assert wall_seconds > (summary["train_time_ms"] + summary["eval_time_ms"]) / 1000
    assert "timing: train " in result.stdout and " validation " in result.stdout and " export " in result.stdout


def test_two_process_checkpoints_gather_every_muon_shard_and_resume_exactly(tmp_path, tiny_dataset):
    """Muon's momentum lives on the rank that owns each matrix: the checkpoint must gather all of
    them, and a resumed 2-process run must continue exactly as the uninterrupted one."""
    settings = dict(ITERATIONS=6, TRAIN_LOG_EVERY=1, CHECKPOINT_EVERY=3, CHECKPOINT_DIR=tmp_path / "checkpoints",
                    VAL_MAX_TOKENS=2048, TARGET_EMA_DECAY=0.9)
    straight = run_trainer(tmp_path / "a", tiny_dataset, nproc=2, RUN_ID="whole", **settings)
    assert straight.returncode == 0, (straight.stdout[-1500:], straight.stderr[-1500:])
    checkpoint = tmp_path / "checkpoints" / "whole" / "step_000003.pt"
    saved = torch.load(checkpoint, weights_only=True)
    muon_params = len(saved["optimizers"][0]["param_groups"][0]["params"])
    assert len(saved["optimizers"][0]["state"]) == muon_params  # both ranks' shards are in the file
    assert len(saved["span_generators"]) == 2
    resumed = run_trainer(tmp_path / "b", tiny_dataset, nproc=2, RUN_ID="continued", RESUME=checkpoint, **settings)
    assert resumed.returncode == 0, (resumed.stdout[-1500:], resumed.stderr[-1500:])
    one = json.loads((tmp_path / "a" / "logs" / "whole.json").read_text())
    two = json.loads((tmp_path / "b" / "logs" / "continued.json").read_text())
    assert comparable(two) == comparable(one)
