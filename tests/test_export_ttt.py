"""Export and evaluation parity: GPTQ against the clip search, calibration on training data only,
the compressors, the optional JEPA head, and legal score-first test-time training."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt_jepa as T
from conftest import TRAINER_PATH, cpu_runtime, tiny_hyperparameters, trainer_env
from test_trainer import make_trainer, run_trainer

# ---------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_with_hessians(tiny_dataset):
    """A tiny model trained 40 steps, and the Hessians of its matrices on 16 training batches."""
    trainer = make_trainer(tiny_dataset, ITERATIONS=40, JEPA_WEIGHT=0, QAT_START_FRACTION=0, SWA_ENABLED=0,
                           GPTQ_CALIBRATION_BATCHES=16)
    for step in range(40):
        trainer.step(step, lambda: 0.0)
    hessians, _ = T.calibrate_gptq(trainer)
    return trainer, hessians


@pytest.mark.parametrize("bits", [6, 5, 4])
def test_gptq_output_error_is_at_most_the_clip_search_error_on_trained_matrices(trained_with_hessians, bits):
    """Measured per tensor, as the output error on the calibration activations: GPTQ never does
    worse than the clip search, and over the whole model it does clearly better."""
    trainer, hessians = trained_with_hessians
    matrices = {name: tensor for name, tensor in trainer.model.state_dict().items() if name in hessians}
    assert len(matrices) == len(hessians) == 26  # every linear layer of the tiny model got a Hessian
    gptq_total = clip_total = 0.0
    for name, weight in matrices.items():
        hessian = hessians[name]
        codes, scales, row_errors = T.gptq_quantize(weight, hessian, bits)
        gptq_error = T.hessian_row_errors(weight, T.dequantize_rows(codes, scales), hessian).sum().item()
        clip_codes, clip_scales, _ = T.quantize_rows(weight, bits)
        clip_error = T.hessian_row_errors(weight, T.dequantize_rows(clip_codes, clip_scales), hessian).sum().item()
        assert codes.abs().max() <= 2 ** (bits - 1) - 1
        assert gptq_error == pytest.approx(row_errors.sum().item(), rel=1e-4)  # the error it reports is its own
        if clip_error == 0:  # a zero-initialised projection that stayed zero
            assert gptq_error == 0
            continue
        assert gptq_error <= clip_error * (1 + 1e-6), f"{name}: GPTQ {gptq_error:.4e} > clip {clip_error:.4e}"
        gptq_total += gptq_error
        clip_total += clip_error
    assert gptq_total < 0.9 * clip_total


def test_gptq_with_an_identity_hessian_is_the_clip_search():
    """With uncorrelated inputs of equal energy there is nothing to compensate: GPTQ rounds each
    row at the clip with the least squared error, exactly as the clip search does."""
    torch.manual_seed(0)
    weight = torch.randn(48, 40) * 0.02
    codes, scales, _ = T.gptq_quantize(weight, torch.eye(40), 6)
    clip_codes, clip_scales, _ = T.quantize_rows(weight, 6)
    assert torch.equal(scales, clip_scales) and torch.equal(codes, clip_codes)


def test_gptq_ignores_inputs_that_never_fire():
    torch.manual_seed(1)
    inputs = torch.randn(512, 16)
    inputs[:, 3] = 0.0
    hessian = inputs.T @ inputs / 512
    codes, scales, row_errors = T.gptq_quantize(torch.randn(8, 16), hessian, 5)
    assert torch.isfinite(row_errors).all() and torch.equal(codes[:, 3], torch.zeros(8, dtype=torch.int8))


def test_the_exporter_quantises_matrices_with_gptq_and_tables_with_the_clip_search(trained_with_hessians, tmp_path):
    trainer, hessians = trained_with_hessians
    hp = dataclasses.replace(trainer.hp, embed_bits=7)
    path = tmp_path / "model.ptz"
    path.write_bytes(T.export_artifact(trainer.model, hp, 0, lambda message: None, hessians))
    entries = {entry["name"]: entry for entry in T.read_artifact(path)["tensors"]}
    query = entries["blocks.0.attention.query.weight"]
    assert (query["storage"], query["method"]) == ("int6", "gptq")
    assert entries["token_embedding.weight"]["storage"] == "int7"
    assert entries["token_embedding.weight"]["method"] == "clip"
    state = T.read_artifact(path)["state_dict"]
    codes, scales, _ = T.gptq_quantize(trainer.model.blocks[0].attention.query.weight, hessians[
        "blocks.0.attention.query.weight"], 6)
    assert torch.equal(state["blocks.0.attention.query.weight"], T.dequantize_rows(codes, scales))
    table = state["token_embedding.weight"]
    assert max(row.unique().numel() for row in table) <= 127  # int7: codes in [-63, 63] times one scale per row
    assert max(row.unique().numel() for row in table) > 63  # and more than int6 would allow


# ---------------------------------------------------------------------------
# Calibration reads training data only
# ---------------------------------------------------------------------------


def _copy_dataset(dataset: dict[str, Path], destination: Path) -> dict[str, Path]:
    shutil.copytree(dataset["data_path"], destination)
    return {"data_path": destination, "tokenizer_path": dataset["tokenizer_path"]}


def _alter_shard(path: Path, first_token: int) -> None:
    """Shift every token from first_token on by one id (a valid shard with other text)."""
    header_bytes = 256 * 4
    data = np.fromfile(path, dtype=np.uint16, offset=header_bytes)
    data[first_token:] = (data[first_token:].astype(np.int64) + 1) % 1024
    with open(path, "r+b") as handle:
        handle.seek(header_bytes)
        handle.write(data.astype(np.uint16).tobytes())


def test_calibration_reads_training_tokens_after_training_and_never_validation_tokens(tmp_path, tiny_dataset):
    """Three runs with FLOAT_WEIGHTS_PATH: the original data; its validation shard altered; its
    training shard altered only past what the 4 training steps read. The Hessians ignore the
    validation change and follow the training one, while the trained weights are the same in all."""
    variants = {"original": _copy_dataset(tiny_dataset, tmp_path / "original")}
    variants["val_altered"] = _copy_dataset(tiny_dataset, tmp_path / "val_altered")
    _alter_shard(T.find_shards(str(variants["val_altered"]["data_path"]), "val")[0], 0)
    variants["train_tail_altered"] = _copy_dataset(tiny_dataset, tmp_path / "train_tail_altered")
    # 4 steps x 2,048 tokens (+1 per read) are consumed by training; calibration reads next.
    _alter_shard(T.find_shards(str(variants["train_tail_altered"]["data_path"]), "train")[0], 4 * 2049 + 100)
    payloads = {}
    for name, dataset in variants.items():
        result = run_trainer(tmp_path / f"run_{name}", dataset, ITERATIONS=4, QUANT="gptq", GPTQ_CALIBRATION_BATCHES=4,
                             FLOAT_WEIGHTS_PATH=tmp_path / f"{name}.float.pt", JEPA_WEIGHT=0)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "gptq_calibration: 4 training batches x 2048 tokens per rank, 26 matrices" in result.stdout
        payloads[name] = torch.load(tmp_path / f"{name}.float.pt", weights_only=True)
    for name in ("val_altered", "train_tail_altered"):
        for key, tensor in payloads["original"]["state_dict"].items():
            assert torch.equal(tensor, payloads[name]["state_dict"][key]), f"{name}: training changed at {key}"
    original, val_altered, train_altered = (payloads[name]["hessians"] for name in variants)
    assert all(torch.equal(original[key], val_altered[key]) for key in original)
    assert any(not torch.equal(original[key], train_altered[key]) for key in original)


# ---------------------------------------------------------------------------
# Compressors and the artifact
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compressor", list(T.COMPRESSORS))
def test_every_compressor_roundtrips_and_names_itself_in_the_magic(compressor, trained_with_hessians, tmp_path):
    trainer, hessians = trained_with_hessians
    hp = dataclasses.replace(trainer.hp, compressor=compressor)
    path = tmp_path / "model.ptz"
    path.write_bytes(T.export_artifact(trainer.model, hp, 0, lambda message: None, hessians))
    assert path.read_bytes()[:8] == b"TGJEPA" + bytes([T.COMPRESSORS[compressor], 1])
    stored = T.read_artifact(path)
    assert stored["compressor"] == compressor
    reference = dataclasses.replace(trainer.hp, compressor="lzma")
    lzma_path = tmp_path / "lzma.ptz"
    lzma_path.write_bytes(T.export_artifact(trainer.model, reference, 0, lambda message: None, hessians))
    lzma_state = T.read_artifact(lzma_path)["state_dict"]
    assert all(torch.equal(stored["state_dict"][name], lzma_state[name]) for name in lzma_state)


def test_a_missing_compressor_package_is_one_line_at_start_up(tiny_dataset, monkeypatch):
    real_import = T.importlib.import_module

    def no_brotli(name: str, *args: object):
        if name == "brotli":
            raise ImportError("No module named 'brotli'")
        return real_import(name, *args)
    monkeypatch.setattr(T.importlib, "import_module", no_brotli)
    hp = tiny_hyperparameters(tiny_dataset, COMPRESSOR="brotli")
    with pytest.raises(T.ConfigError, match=r"COMPRESSOR=brotli needs the brotli package: pip install brotli"):
        T.validate_hyperparameters(hp, world_size=1)


@pytest.mark.parametrize("overrides, message", [
    ({"QUANT": "awq"}, "QUANT='awq' must be gptq or clip"),
    ({"COMPRESSOR": "gzip"}, "COMPRESSOR='gzip' must be one of lzma, brotli, zstd"),
    ({"MATRIX_BITS": "3"}, "MATRIX_BITS=3 must be between 4 and 8"),
    ({"EMBED_BITS": "9"}, "EMBED_BITS=9 must be between 4 and 8"),
    ({"QUANT": "gptq", "MAX_WALLCLOCK_SECONDS": "10", "GPTQ_RESERVE_SECONDS": "10"}, "GPTQ_RESERVE_SECONDS=10.0 must be >= 0 and below"),
    ({"TTT_PARAMS": "bias"}, "TTT_PARAMS='bias' must be all or lora"),
    ({"TTT_OBJECTIVE": "ce+jepa", "JEPA_WEIGHT": "0"}, "TTT_OBJECTIVE=ce\\+jepa needs a JEPA run"),
    ({"TTT_OBJECTIVE": "ce+jepa", "JEPA_MODE": "span"}, "supports JEPA_MODE next and chunk, not span"),
])
def test_bad_export_and_ttt_settings_are_refused_at_start_up(tiny_dataset, overrides, message):
    hp = tiny_hyperparameters(tiny_dataset, **overrides)
    with pytest.raises(T.ConfigError, match=message):
        T.validate_hyperparameters(hp, world_size=1)


def test_the_gptq_reserve_shortens_the_training_clock_only_under_gptq(tiny_dataset):
    gptq = tiny_hyperparameters(tiny_dataset, QUANT="gptq", MAX_WALLCLOCK_SECONDS=100, GPTQ_RESERVE_SECONDS=7,
                                WARMDOWN_ITERS=5)
    assert gptq.training_seconds == 93
    assert dataclasses.replace(gptq, quant="clip").training_seconds == 100
    assert dataclasses.replace(gptq, max_wallclock_seconds=0).training_seconds == 0
    # The warmdown ends at the shortened cap: at 93 s of a 100 s run the LR has reached zero.
    assert T.Schedule(gptq, jepa_active=False).warmdown(10, 93_000.0) == 0.0


# ---------------------------------------------------------------------------
# Score-first test-time training
# ---------------------------------------------------------------------------


def _ttt_setup(tiny_dataset, **overrides):
    settings = {"TTT": 1, "TTT_CHUNK_TOKENS": 512, "TTT_LR": 0.05, "TTT_EPOCHS": 2, "VAL_BATCH_SIZE": 1024, **overrides}
    hp = tiny_hyperparameters(tiny_dataset, **settings)
    torch.manual_seed(3)
    model = T.GPT(hp)
    luts = T.build_sentencepiece_luts(T.load_tokenizer(hp), hp.vocab_size, torch.device("cpu"))
    val = T.load_validation_tokens(T.find_shards(hp.data_path, "val"), hp.train_seq_len, hp.vocab_size, 4096).long()
    return hp, model.state_dict(), luts, val


def _chunk_losses(hp, state, luts, val, head_state=None):
    losses: list[torch.Tensor] = []
    result = T.run_test_time_training(hp, cpu_runtime(), state, head_state or {}, val, luts, losses)
    return result, losses


def test_ttt_chunks_are_whole_evaluation_windows_and_train_only_on_scored_tokens():
    windows = T.evaluation_windows(10_000, 256, 64)
    chunks = T.ttt_chunks(windows, 1000)
    assert [w for chunk in chunks for w in chunk] == windows
    scored_before = 0
    for chunk in chunks:
        first_target = chunk[0][0] + chunk[0][1] + 1
        assert first_target == scored_before + 1  # chunks follow each other without a gap
        scored_before = chunk[-1][2]
        ends = T.ttt_sequence_ends(chunk, 256)
        assert max(ends) == chunk[-1][2] and min(ends) - 256 >= 0
        covered = set().union(*(range(end - 255, end + 1) for end in ends))
        assert set(range(first_target, chunk[-1][2] + 1)) <= covered  # every scored target is trained on
        assert max(covered) <= chunk[-1][2]  # and nothing not yet scored


@pytest.mark.parametrize("stride", [0, 64])
def test_ttt_legality_later_chunks_never_change_an_earlier_score_and_earlier_ones_do(tiny_dataset, stride):
    """The mutation test: altering chunk 2's tokens leaves every token loss of chunks 0 and 1
    unchanged, bit for bit; altering a token of chunk 0 (more than a window before chunk 2, so no
    context reaches it) changes chunk 2's losses through training alone, and with TTT_LR=0 it does not."""
    hp, state, luts, val = _ttt_setup(tiny_dataset, EVAL_STRIDE=stride)
    _, reference = _chunk_losses(hp, state, luts, val)
    chunks = T.ttt_chunks(T.evaluation_windows(val.numel() - 1, hp.train_seq_len, stride), hp.ttt_chunk_tokens)
    assert len(chunks) >= 4
    later = val.clone()
    chunk_two_first = chunks[2][0][0] + chunks[2][0][1] + 1
    later[chunk_two_first:chunks[2][-1][2] + 1] = (later[chunk_two_first:chunks[2][-1][2] + 1] + 7) % hp.vocab_size
    _, altered = _chunk_losses(hp, state, luts, later)
    assert torch.equal(altered[0], reference[0]) and torch.equal(altered[1], reference[1])
    assert not torch.equal(altered[2], reference[2])

    earlier = val.clone()
    earlier[5] = (earlier[5] + 7) % hp.vocab_size
    assert chunk_two_first - 5 > hp.train_seq_len + 1
    _, trained_differently = _chunk_losses(hp, state, luts, earlier)
    assert not torch.equal(trained_differently[2], reference[2])
    frozen = dataclasses.replace(hp, ttt_lr=0.0)
    _, frozen_reference = _chunk_losses(frozen, state, luts, val)
    _, frozen_altered = _chunk_losses(frozen, state, luts, earlier)
    assert torch.equal(frozen_altered[2], frozen_reference[2])


@pytest.mark.parametrize("stride", [0, 64])
def test_ttt_without_training_scores_exactly_what_the_evaluation_scores(tiny_dataset, stride):
    hp, state, luts, val = _ttt_setup(tiny_dataset, EVAL_STRIDE=stride, TTT_EPOCHS=0)
    result, _ = _chunk_losses(hp, state, luts, val)
    model = T.build_eval_model(hp, cpu_runtime(), state)
    assert (result["val_loss"], result["val_bpb"]) == T.evaluate_bpb(model, val, hp.train_seq_len, hp.val_batch_size,
                                                                     luts, cpu_runtime(), stride=stride)
    trained, _ = _chunk_losses(dataclasses.replace(hp, ttt_epochs=2), state, luts, val)
    assert trained["val_bpb"] != result["val_bpb"] and trained["train_ms"] > 0


def test_lora_ttt_starts_as_the_artifact_and_trains_only_its_adapters(tiny_dataset):
    hp, state, luts, val = _ttt_setup(tiny_dataset, TTT_PARAMS="lora", TTT_LORA_RANK=4)
    ttt = T.ScoreFirstTrainer(hp, cpu_runtime(), state, {})
    plain = T.build_eval_model(hp, cpu_runtime(), state)
    inputs = val[:hp.train_seq_len][None]
    assert torch.equal(ttt.model.logits(inputs), plain.logits(inputs))
    adapters = sum(isinstance(module, T.LoraLinear) for module in ttt.model.modules())
    assert adapters == 6 * hp.num_layers
    assert {id(p) for p in ttt.parameters} == {id(p) for m in ttt.model.modules() if isinstance(m, T.LoraLinear)
                                               for p in (m.down, m.up)}
    frozen_before = {name: t.clone() for name, t in ttt.model.state_dict().items() if ".base." in name or
                     name.startswith("token_embedding")}
    windows = T.evaluation_windows(val.numel() - 1, hp.train_seq_len)
    ttt.train_on(val.long(), T.ttt_chunks(windows, hp.ttt_chunk_tokens)[0], hp.ttt_lr, 4)
    after = ttt.model.state_dict()
    assert all(torch.equal(tensor, after[name]) for name, tensor in frozen_before.items())
    assert any(m.up.abs().sum() > 0 for m in ttt.model.modules() if isinstance(m, T.LoraLinear))


def test_ttt_with_the_jepa_objective_adds_the_heads_loss(tiny_dataset):
    trainer = make_trainer(tiny_dataset, JEPA_WEIGHT=0.5, TTT_OBJECTIVE="ce+jepa", TTT_CHUNK_TOKENS=512,
                           TTT_LR=0.05, VAL_BATCH_SIZE=1024)
    hp = trainer.hp
    val = T.load_validation_tokens(T.find_shards(hp.data_path, "val"), hp.train_seq_len, hp.vocab_size, 2048)
    luts = T.build_sentencepiece_luts(T.load_tokenizer(hp), hp.vocab_size, torch.device("cpu"))
    head_state = trainer.head.state_dict()
    with_jepa, _ = _chunk_losses(hp, trainer.model.state_dict(), luts, val, head_state)
    ce_only, _ = _chunk_losses(dataclasses.replace(hp, ttt_objective="ce"), trainer.model.state_dict(), luts, val)
    assert with_jepa["val_bpb"] != ce_only["val_bpb"]
    assert with_jepa["parameters"] == ce_only["parameters"] + sum(p.numel() for p in trainer.head.parameters())
    with pytest.raises(T.ConfigError, match="needs the JEPA head in the artifact"):
        T.ScoreFirstTrainer(hp, cpu_runtime(), trainer.model.state_dict(), {})


# ---------------------------------------------------------------------------
# End to end: training with TTT, EVAL_ONLY reproduces it
# ---------------------------------------------------------------------------


def test_a_run_with_ttt_and_its_eval_only_agree_to_the_last_digit(tmp_path, tiny_dataset):
    """zstd, GPTQ, the exported JEPA head and score-first TTT with the JEPA objective: the training
    run logs final_ttt beside the roundtrip, EVAL_ONLY reproduces both exactly, TTT=0 in EVAL_ONLY
    leaves the roundtrip lines as they were, and a head-less artifact refuses the JEPA objective."""
    common = dict(ITERATIONS=6, JEPA_WEIGHT=0.3, VAL_MAX_TOKENS=2048, EVAL_STRIDE=128, COMPRESSOR="zstd", QUANT="gptq",
                  TTT=1, TTT_OBJECTIVE="ce+jepa", TTT_CHUNK_TOKENS=512, TTT_EPOCHS=1, VAL_BATCH_SIZE=1024)
    result = run_trainer(tmp_path, tiny_dataset, RUN_ID="ttt", **common)
    assert result.returncode == 0, result.stderr[-2000:]
    ttt_line = re.search(r"final_ttt val_loss:\S+ val_bpb:\S+ eval_time:\d+ms", result.stdout)
    assert ttt_line and "export: quant:gptq matrix_bits:6 embed_bits:8 compressor:zstd jepa_head:1" in result.stdout
    summary = json.loads((tmp_path / "logs" / "ttt.json").read_text())
    assert summary["ttt_val_bpb"] != summary["sliding_val_bpb"] and summary["roundtrip_val_bpb"] > 0
    assert any(entry["name"].startswith(T.HEAD_PREFIX) for entry in T.read_artifact(tmp_path / "model.ptz")["tensors"])

    # The evaluation settings trainer_env sets itself must match the run's; the rest come from the artifact.
    evaluation = dict(VAL_MAX_TOKENS=2048, EVAL_STRIDE=128)
    env = trainer_env(tiny_dataset, EVAL_ONLY=1, ARTIFACT_PATH=tmp_path / "model.ptz", LOG_DIR=tmp_path / "eval",
                      **evaluation)
    replay = subprocess.run([sys.executable, str(TRAINER_PATH)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert replay.returncode == 0, replay.stderr[-2000:]
    for name in (r"final_int\d+_[a-z]+_roundtrip_exact", "final_sliding", "final_ttt_exact"):
        pattern = re.compile(rf"{name} val_loss:(\S+) val_bpb:(\S+)")
        assert pattern.search(replay.stdout).groups() == pattern.search(result.stdout).groups(), name

    # Two ranks share the windows and the sequences (gradients summed): the same TTT up to float order.
    two = run_trainer(tmp_path / "two_ranks", tiny_dataset, nproc=2, EVAL_ONLY=1, ARTIFACT_PATH=tmp_path / "model.ptz",
                      **evaluation)
    assert two.returncode == 0, two.stderr[-2000:]
    ttt_exact = re.compile(r"final_ttt_exact val_loss:(\S+) val_bpb:(\S+)")
    assert float(ttt_exact.search(two.stdout).group(2)) == pytest.approx(
        float(ttt_exact.search(result.stdout).group(2)), rel=1e-5)

    no_ttt = subprocess.run([sys.executable, str(TRAINER_PATH)], cwd=tmp_path, env={**env, "TTT": "0"},
                            capture_output=True, text=True, timeout=300)
    assert "final_ttt" not in no_ttt.stdout
    pattern = re.compile(r"final_int\d+_[a-z]+_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)")
    assert pattern.search(no_ttt.stdout).groups() == pattern.search(result.stdout).groups()

    headless = run_trainer(tmp_path / "headless", tiny_dataset, ITERATIONS=2, JEPA_WEIGHT=0.3, VAL_MAX_TOKENS=2048)
    assert headless.returncode == 0, headless.stderr[-2000:]
    refused = subprocess.run([sys.executable, str(TRAINER_PATH)], cwd=tmp_path, capture_output=True, text=True,
                             env={**env, "ARTIFACT_PATH": str(tmp_path / "headless" / "model.ptz"), "TTT": "1",
                                  "TTT_OBJECTIVE": "ce+jepa"}, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: TTT_OBJECTIVE=ce+jepa needs the JEPA head")
