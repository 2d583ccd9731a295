"""The GPU code path on the CPU: torch.compile(fullgraph=True) and bf16 autocast, as CUDA runs
them by default. Without a GPU in CI this is the only check that no JEPA path breaks the graph
(a graph break is an error under fullgraph) or mixes dtypes under autocast."""

from __future__ import annotations

import json
import math

from test_trainer import run_trainer


def test_compiled_bf16_span_run_with_ema_target_and_grad_localisation(tmp_path, tiny_dataset):
    # Span mode exercises the most graph: the 2B-row online pass with the mask embedding, the
    # EMA target encoder stopping at JEPA_LAYER, JEPA_GRAD_LAYERS's recomputation, SIGReg.
    # The session's inductor cache (tests/conftest.py): new in every session, never an old run's.
    result = run_trainer(tmp_path, tiny_dataset, timeout=480, RUN_ID="compiled", COMPILE=1, COMPUTE_DTYPE="bfloat16",
                         JEPA_MODE="span", TARGET_EMA_DECAY=0.9, JEPA_GRAD_LAYERS=2, ANTI_COLLAPSE="sigreg",
                         NUM_LAYERS=2, XSA_LAST_N=1, ITERATIONS=3, WARMUP_STEPS=1, TRAIN_BATCH_TOKENS=1024,
                         QAT_START_FRACTION=0,  # late QAT's compiled phases: tests/test_record_stack.py
                         VAL_MAX_TOKENS=1024, EVAL_STRIDE=0)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compile:True" in result.stdout and "autocast:torch.bfloat16" in result.stdout
    summary = json.loads((tmp_path / "logs" / "compiled.json").read_text())
    losses = [entry["train_loss"] for entry in summary["train_history"]]
    assert all(math.isfinite(loss) for loss in losses) and 5.0 < losses[0] < 8.0
    assert math.isfinite(summary["roundtrip_val_bpb"])
