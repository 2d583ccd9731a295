"""What a GPU run executes, checked on the CPU: every JEPA graph under torch.compile(fullgraph=True)
with bf16 autocast, compiled DDP against the same run uncompiled, and a two-node launch.

CUDA runs compile by default (COMPILE=-1) and autocast to bf16; CI has no GPU, so without these
tests the first sight of a graph break (an error under fullgraph), a dtype mix under autocast, a
compiled graph that stops seeing its parameters or a gradient that skips DDP's all-reduce would be
on a rented 8xH100. tests/test_compile.py covers span mode; this file covers the other graphs.
Nearly all of its time is inductor compiling, in the session's inductor cache (tests/conftest.py),
which starts empty in every session.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SCALAR_KERNELS_ENVIRONMENT, TRAINER_PATH, trainer_env
from test_trainer import run_trainer

# The smallest run that still reaches every compiled graph: 2 blocks (JEPA_GRAD_LAYERS and an
# early JEPA_LAYER need a block after the cut), one 4-sequence micro-batch, 3 steps, one compile-
# priming pass of each path (JEPA and zero-weight), a 1024-token validation and the roundtrip.
TINY_COMPILED = dict(NUM_LAYERS=2, XSA_LAST_N=1, ITERATIONS=3, WARMUP_STEPS=1, TRAIN_BATCH_TOKENS=1024,
                     QAT_START_FRACTION=0,  # late QAT's compiled phases: tests/test_record_stack.py
                     VAL_MAX_TOKENS=1024, EVAL_STRIDE=0)

# Each run combines several graph features, so that two compilations cover them all:
# - next: one predictor per horizon (JEPA_OFFSETS=1,2,4: three differently sliced regressions),
#   the cosine loss, TARGET_EMA_DECAY=0 (the target is the online features under detach(): no
#   target encoder, no second forward), SIGReg on the predictions (VICREG_ON=pred: the regulariser
#   concatenates rows of three horizons of different lengths) with its random directions as a
#   graph input.
# - chunk: the cumulative-sum chunk means, an EMA target encoder (a second compiled GPT that stops
#   at JEPA_LAYER=0: the last_layer early exit), JEPA_GRAD_LAYERS=1 (the detached recomputation of
#   block 0 from the embeddings), JEPA_TARGET_FRACTION=0.5 (the JEPA rows are a slice of the
#   micro-batch and the target encoder sees only those), VICReg on the target side, MSE.
COMPILED_RUNS = {
    "next-multihorizon-cosine-stopgrad-sigreg": dict(
        JEPA_MODE="next", JEPA_OFFSETS="1,2,4", JEPA_LOSS="cosine", TARGET_EMA_DECAY=0,
        ANTI_COLLAPSE="sigreg", VICREG_ON="pred"),
    "chunk-ema-gradlayers-rowslice-vicreg-mse": dict(
        JEPA_MODE="chunk", JEPA_CHUNK=4, JEPA_LOSS="mse", TARGET_EMA_DECAY=0.9, JEPA_LAYER=0,
        JEPA_GRAD_LAYERS=1, JEPA_TARGET_FRACTION=0.5, ANTI_COLLAPSE="vicreg", VICREG_ON="target"),
}

# Dynamo logs one line (INFO, TORCH_LOGS=dynamo) each time it starts compiling a frame.
COMPILE_START = "torchdynamo start tracing"


def run_merged(tmp_path: Path, dataset: dict[str, Path], timeout: int,
               **overrides: object) -> subprocess.CompletedProcess:
    """One trainer process with stderr merged into stdout (PYTHONUNBUFFERED keeps the order), so
    dynamo's compile log lines can be placed between the trainer's own lines."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = trainer_env(dataset, **{"LOG_DIR": tmp_path / "logs", "ARTIFACT_PATH": tmp_path / "model.ptz", **overrides})
    return subprocess.run([sys.executable, str(TRAINER_PATH)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


@pytest.mark.parametrize("name", list(COMPILED_RUNS))
def test_compiled_bf16_jepa_graphs(tmp_path, tiny_dataset, name):
    """Guards against: a graph break (fatal under fullgraph=True) or a dtype mismatch under bf16
    autocast in a JEPA path only a GPU run compiles; a compiled JEPA loss that comes out zero,
    NaN or constant; and any compilation once the training clock runs (a recompile on the GPU
    costs seconds of the 600 s budget: compile priming must have met every graph)."""
    options = COMPILED_RUNS[name]
    result = run_merged(tmp_path, tiny_dataset, timeout=480, RUN_ID="compiled", COMPILE=1, COMPUTE_DTYPE="bfloat16",
                        TORCH_LOGS="dynamo",
                        **TINY_COMPILED, **options)
    output = result.stdout
    assert result.returncode == 0, output[-6000:]
    assert "compile:True" in output and "autocast:torch.bfloat16" in output
    expected_target = "target_encoder:stop-grad online" if options["TARGET_EMA_DECAY"] == 0 else "target_encoder:ema"
    assert expected_target in output, [line for line in output.splitlines() if "target_encoder:" in line]

    # Compilation happens during priming and at evaluation, never between them.
    lines = output.splitlines()
    warmup_line = next(i for i, line in enumerate(lines) if line.startswith("warmup:"))
    last_train_line = max(i for i, line in enumerate(lines) if re.match(r"step:\d+/\d+ train_loss:", line))
    assert any(COMPILE_START in line for line in lines[:warmup_line]), "no dynamo log: TORCH_LOGS=dynamo changed?"
    compiled_in_training = [line for line in lines[warmup_line:last_train_line] if COMPILE_START in line]
    assert not compiled_in_training, compiled_in_training

    summary = json.loads((tmp_path / "logs" / "compiled.json").read_text())
    assert summary["config"]["jepa_mode"] == options["JEPA_MODE"] and summary["config"]["compile"] == 1
    history = summary["train_history"]
    assert [entry["step"] for entry in history] == [1, 2, 3]
    losses = [entry["train_loss"] for entry in history]
    # An untrained model predicts about uniformly: ln(1024) = 6.93 at the first step. A bf16 or
    # compiled-logits mistake (soft cap, tied head, cross-entropy in bf16) shows up here.
    assert all(math.isfinite(loss) for loss in losses) and 6.4 < losses[0] < 7.5 and max(losses) < 10, losses
    jepa = [entry["jepa_loss"] for entry in history]
    regulariser = [entry["reg_loss"] for entry in history]
    assert all(math.isfinite(value) and value > 0 for value in jepa + regulariser), (jepa, regulariser)
    assert all(entry["jepa_weight"] > 0 for entry in history)
    if options["JEPA_LOSS"] == "cosine":
        assert all(value <= 2.0 for value in jepa), jepa  # 1 - cos lies in [0, 2]
    assert len(set(jepa)) == len(jepa), jepa  # the predictor trains: the loss moves every step
    assert math.isfinite(summary["val_bpb"]) and math.isfinite(summary["roundtrip_val_bpb"])
    # The roundtrip compiles a fresh model from the artifact: it must score what training scored.
    assert abs(summary["roundtrip_val_bpb"] - summary["val_bpb"]) < 0.05


def test_compiled_two_process_ddp_matches_uncompiled(tmp_path, tiny_dataset):
    """Guards against: compiled graphs under DistributedDataParallel that miss DDP's gradient
    all-reduce, bake parameters in as constants (updates unseen by the next step) or leave the JEPA
    head's separate gradient sync out of step, also across GRAD_ACCUM_STEPS=2 micro-steps (the
    first accumulates without an all-reduce: require_backward_grad_sync off, as on a single GPU,
    where accumulation is 8). On a GPU all of these run only compiled.

    float32 compute, so the comparison can be tight: compiled kernels only reorder float sums, and
    after four Muon steps the two runs differ by 7e-8 relative at most (measured: losses per step,
    val_bpb, roundtrip). rel=1e-4 leaves three orders of magnitude for other CPUs' vector widths,
    while a rank stepping on its own half batch (a lost all-reduce) moves step 2's train_loss by ~1%
    and its jepa_loss by ~2%. Under bf16 autocast compiled and eager differ by up to 1.3e-3 in
    jepa_loss already (bf16 rounding at different points of fused and unfused kernels): a tolerance
    wide enough for that would barely separate a sync bug from rounding."""
    # The backbone without XSA, value embeddings and BigramHash (their graphs: the test above):
    # less to compile, and every parameter still goes through DDP's buckets.
    common = dict(JEPA_MODE="next", JEPA_OFFSETS="1,2", TARGET_EMA_DECAY=0.9, JEPA_WEIGHT=0.2, ANTI_COLLAPSE="vicreg",
                  COMPUTE_DTYPE="float32", NUM_LAYERS=2, XSA_LAST_N=0, VE_DIM=0, BIGRAM_VOCAB_SIZE=0,
                  ITERATIONS=4, WARMUP_STEPS=1, TRAIN_BATCH_TOKENS=2048, GRAD_ACCUM_STEPS=2,
                  QAT_START_FRACTION=0, VAL_MAX_TOKENS=1024, EVAL_STRIDE=0,
                  **SCALAR_KERNELS_ENVIRONMENT)  # the eager run's kernels as the compiled run's
    # The session's inductor cache (tests/conftest.py): new in every session, never an old run's.
    compiled = run_trainer(tmp_path / "compiled", tiny_dataset, nproc=2, timeout=480, RUN_ID="compiled", COMPILE=1,
                           **common)
    assert compiled.returncode == 0, (compiled.stdout[-2000:], compiled.stderr[-4000:])
    eager = run_trainer(tmp_path / "eager", tiny_dataset, nproc=2, timeout=300, RUN_ID="eager", COMPILE=0, **common)
    assert eager.returncode == 0, (eager.stdout[-2000:], eager.stderr[-4000:])
    assert "compile:True" in compiled.stdout and "compile:False" in eager.stdout
    assert "world_size:2" in compiled.stdout and "target_encoder:ema" in compiled.stdout

    one = json.loads((tmp_path / "compiled" / "logs" / "compiled.json").read_text())
    two = json.loads((tmp_path / "eager" / "logs" / "eager.json").read_text())
    assert one["world_size"] == two["world_size"] == 2
    assert [entry["step"] for entry in one["train_history"]] == [1, 2, 3, 4]
    for key in ("train_loss", "jepa_loss", "reg_loss"):
        a = [entry[key] for entry in one["train_history"]]
        b = [entry[key] for entry in two["train_history"]]
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), key
    assert one["val_bpb"] == pytest.approx(two["val_bpb"], rel=1e-4)
    assert one["roundtrip_val_bpb"] == pytest.approx(two["roundtrip_val_bpb"], rel=1e-4)


# ---------------------------------------------------------------------------
# Two nodes on loopback
# ---------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on now (the OS picks it); node 0's rendezvous store binds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_command(node_rank: int, nnodes: int, port: int) -> list[str]:
    # Static rendezvous (torchrun's default backend): node 0 hosts the store at MASTER_ADDR:PORT,
    # ranks follow --node-rank, so rank 0 is known in advance. c10d rendezvous would assign node
    # ranks in arrival order, and on one host both agents would race to host its store.
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc-per-node=1",
            f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}", str(TRAINER_PATH)]


def run_nodes(tmp_path: Path, dataset: dict[str, Path], nnodes: int, timeout: int,
              **overrides: object) -> list[tuple[int, str, str]]:
    """Launch nnodes torchrun processes at once, each in its own folder with its own LOG_DIR and
    ARTIFACT_PATH (as separate machines have separate disks). Returns (returncode, stdout, stderr)
    per node; on timeout every node's process group (torchrun and its worker) is killed: exit -9."""
    port = free_port()
    nodes = []
    for node_rank in range(nnodes):
        folder = tmp_path / f"node{node_rank}"
        folder.mkdir(parents=True)
        # GLOO_SOCKET_IFNAME=lo: gloo's connections go over the loopback interface ("lo" on Linux)
        # rather than whatever the hostname resolves to, which may be unroutable offline.
        env = trainer_env(dataset, LOG_DIR=folder / "logs", ARTIFACT_PATH=folder / "model.ptz",
                          GLOO_SOCKET_IFNAME="lo", **overrides)
        stdout, stderr = open(folder / "stdout.txt", "w"), open(folder / "stderr.txt", "w")
        process = subprocess.Popen(node_command(node_rank, nnodes, port), cwd=folder, env=env, stdout=stdout,
                                   stderr=stderr, start_new_session=True)
        nodes.append((folder, process, stdout, stderr))
    deadline = time.monotonic() + timeout
    try:
        for _, process, _, _ in nodes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                break
    finally:
        for _, process, stdout, stderr in nodes:
            if process.poll() is None:  # the whole group: torchrun's worker would outlive torchrun
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            stdout.close()
            stderr.close()
    return [(process.returncode, (folder / "stdout.txt").read_text(), (folder / "stderr.txt").read_text())
            for folder, process, _, _ in nodes]


def test_two_nodes_on_loopback_match_one_process_with_accumulation(tmp_path, tiny_dataset):
    """Guards against: a multi-node launch (torchrun --nnodes=2 --node-rank=..., one rendezvous
    store on node 0) that hangs or diverges where --standalone works: ranks from WORLD_SIZE/RANK
    rather than the node-local LOCAL_RANK, files read by every rank where only node 0 wrote them
    (nodes do not share a disk here), and the same global batch split across nodes. Same
    configuration and tolerance as the single-host gloo test in tests/test_trainer.py."""
    common = dict(RUN_ID="nodes", ITERATIONS=4, TRAIN_LOG_EVERY=1, JEPA_WEIGHT=0.2, TARGET_EMA_DECAY=0.9,
                  VAL_MAX_TOKENS=2048)
    single = run_trainer(tmp_path / "single", tiny_dataset, GRAD_ACCUM_STEPS=2, **common)
    assert single.returncode == 0, single.stderr[-3000:]
    nodes = run_nodes(tmp_path / "nodes", tiny_dataset, nnodes=2, timeout=300, GRAD_ACCUM_STEPS=1, **common)
    report = "\n".join(f"--- node {rank}: exit {code}\nstdout tail:\n{out[-1500:]}\nstderr tail:\n{err[-3000:]}"
                       for rank, (code, out, err) in enumerate(nodes))
    assert all(code == 0 for code, _, _ in nodes), report
    assert "world_size:2" in nodes[0][1], report
    one = json.loads((tmp_path / "single" / "logs" / "nodes.json").read_text())
    two = json.loads((tmp_path / "nodes" / "node0" / "logs" / "nodes.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert not (tmp_path / "nodes" / "node1" / "logs" / "nodes.json").exists()  # rank 1 writes no log
    for key in ("train_loss", "jepa_loss", "reg_loss"):
        a = [entry[key] for entry in one["train_history"]]
        b = [entry[key] for entry in two["train_history"]]
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), key
    assert one["val_bpb"] == pytest.approx(two["val_bpb"], rel=1e-5)
    assert one["roundtrip_val_bpb"] == pytest.approx(two["roundtrip_val_bpb"], rel=1e-5)
