"""The int6+LZMA artifact: quantisation bounds, budget fitting, roundtrip and EVAL_ONLY
equality, integrity errors, and the sliding-window evaluation (GUIDE section 7)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys


import pytest
import torch
from torch import nn

import train_gpt_jepa as T
from conftest import TRAINER_PATH, cpu_runtime, tiny_hyperparameters, trainer_env
from test_trainer import make_trainer, run_trainer

ROUNDTRIP_LINE = re.compile(r"final_int\d+_[a-z]+_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_dataset) -> dict:
    """One short JEPA run with the sliding evaluation on; its artifact, log and summary."""
    folder = tmp_path_factory.mktemp("trained")
    result = run_trainer(folder, tiny_dataset, RUN_ID="trained", ITERATIONS=20, TRAIN_LOG_EVERY=10,
                         EVAL_STRIDE=128, JEPA_WEIGHT=0.1)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"folder": folder, "stdout": result.stdout, "artifact": folder / "model.ptz",
            "summary": json.loads((folder / "logs" / "trained.json").read_text())}


# ---------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 6, 5, 4])
@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed"])
def test_quantisation_error_bounds(bits, kind):
    generator = torch.Generator().manual_seed(bits)
    if kind == "gaussian":
        weight = torch.randn(64, 256, generator=generator) * 0.02
    else:  # Student-t with 2 degrees of freedom: rare huge entries stretch the row max
        normal, chi = torch.randn(64, 256, generator=generator), torch.randn(64, 256, 2, generator=generator)
        weight = 0.02 * normal / chi.square().mean(dim=-1).sqrt()
    codes, scales, row_error = T.quantize_rows(weight, bits)
    max_level = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= max_level
    restored = codes.float() * scales.float()[:, None]
    measured = (restored - weight).square().sum(dim=1)
    assert torch.allclose(measured, row_error, rtol=1e-4, atol=1e-12)
    # Never worse than plain max-abs scaling, whose error per entry is at most half a step.
    row_max = weight.abs().amax(dim=1)
    half_step_bound = weight.size(1) * (row_max / max_level / 2).square() * 1.01
    assert torch.all(row_error <= half_step_bound)
    if kind == "gaussian":  # uniform-noise theory: (3 sigma / levels)^2 / 12 of the variance, x2 slack
        relative = (row_error.sum() / weight.square().sum()).item()
        assert relative < 2 * (3.0 / max_level) ** 2 / 12


def test_clip_search_beats_max_scaling_on_heavy_tails():
    weight = torch.randn(32, 512) * 0.02
    weight[:, 0] = 0.5  # one outlier per row
    _, _, searched = T.quantize_rows(weight, 6)
    max_level = 31
    scale = (weight.abs().amax(dim=1) / max_level).half().float()
    plain = ((torch.round(weight / scale[:, None]).clamp(-max_level, max_level) * scale[:, None] - weight)
             .square().sum(dim=1))
    assert torch.all(searched <= plain + 1e-12) and searched.sum() < plain.sum()


def test_storage_classes_follow_module_types(tiny_dataset):
    model = T.GPT(tiny_hyperparameters(tiny_dataset))
    classes = T.tensor_storage_classes(model)
    assert classes["token_embedding.weight"] == "int8" and classes["bigram.table.weight"] == "int8"
    assert classes["blocks.0.attention.query.weight"] == "int6" and classes["bigram.projection.weight"] == "int6"
    assert classes["skip_weights"] == "float16" and classes["blocks.0.resid_mix"] == "float16"
    assert set(classes) == set(model.state_dict())


# ---------------------------------------------------------------------------
# Roundtrip
# ---------------------------------------------------------------------------


def test_roundtrip_logits_equal_hand_dequantised_weights(tiny_dataset, tmp_path):
    trainer = make_trainer(tiny_dataset, JEPA_WEIGHT=0.1)
    for step in range(3):
        trainer.step(step, lambda: 0.0)
    hp = trainer.hp
    path = tmp_path / "model.ptz"
    T.write_atomically(path, T.export_artifact(trainer.model, hp, code_bytes=0, log=lambda m: None))
    roundtrip = T.build_eval_model(hp, cpu_runtime(), T.read_artifact(path)["state_dict"])

    by_hand = T.GPT(hp)
    classes = T.tensor_storage_classes(trainer.model)
    state = {}
    for name, tensor in trainer.model.state_dict().items():
        if classes[name] == "float16":
            state[name] = tensor.half().float()
        else:
            codes, scales, _ = T.quantize_rows(tensor, int(classes[name][3:]))
            state[name] = (codes.float() * scales.float()[:, None]).view_as(tensor)
    by_hand.load_state_dict(state)
    tokens = torch.randint(0, hp.vocab_size, (2, 64))
    with torch.no_grad():
        assert torch.equal(roundtrip.logits(tokens), by_hand.logits(tokens))
        assert not torch.equal(by_hand.logits(tokens), trainer.model.logits(tokens))  # quantisation did happen


def test_artifact_holds_no_jepa_part(trained_run, tiny_dataset):
    artifact = T.read_artifact(trained_run["artifact"])
    hp = tiny_hyperparameters(tiny_dataset)
    assert set(artifact["state_dict"]) == set(T.GPT(hp).state_dict())
    assert not any(name.split(".")[0] in T.JEPA_MODULE_NAMES for name in artifact["state_dict"])
    assert set(T.JEPA_MODULE_NAMES) >= {name for name, _ in T.JepaHead(
        tiny_hyperparameters(tiny_dataset, JEPA_MODE="span")).named_children()} | {"mask_embedding"}
    model = T.GPT(hp)
    model.predictors = nn.Linear(4, 4)  # a JEPA part smuggled into the backbone
    with pytest.raises(AssertionError, match="predictors"):
        T.export_artifact(model, hp, code_bytes=0, log=lambda m: None)


def test_training_logs_the_roundtrip_and_size_lines(trained_run):
    out = trained_run["stdout"]
    assert ROUNDTRIP_LINE.search(out)
    # The size lines name the export that ran: int6 matrices, brotli (the default compressor).
    assert re.search(r"Serialized model int6\+brotli: \d+ bytes", out)
    assert re.search(r"Total submission size int6\+brotli: \d+ bytes", out)
    assert "final_int6_brotli_roundtrip_exact" in out and "lzma" not in out.split("Serialized model", 1)[1]
    assert re.search(r"final_sliding val_loss:\S+ val_bpb:\S+", out)
    summary = trained_run["summary"]
    assert summary["total_bytes"] == summary["artifact_bytes"] + summary["code_bytes"]
    assert summary["artifact_bytes"] == trained_run["artifact"].stat().st_size
    assert abs(summary["roundtrip_val_bpb"] - summary["val_bpb"]) < 0.01


def test_eval_only_in_a_fresh_process_reproduces_the_roundtrip_numbers(trained_run, tmp_path):
    """Nothing but the artifact and the trainer: no PRESET, no shape settings, another folder."""
    env = {key: value for key, value in trainer_env({"data_path": "", "tokenizer_path": ""}).items()
           if key.upper() not in {f.upper() for f in T.Hyperparameters.__dataclass_fields__} and key != "PRESET"}
    env.update(EVAL_ONLY="1", ARTIFACT_PATH=str(trained_run["artifact"]), LOG_DIR=str(tmp_path / "logs"))
    result = subprocess.run([sys.executable, str(TRAINER_PATH)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = ROUNDTRIP_LINE.search(trained_run["stdout"]).groups()
    evaluated = ROUNDTRIP_LINE.search(result.stdout).groups()
    assert evaluated == trained
    sliding = re.compile(r"final_sliding val_loss:(\S+) val_bpb:(\S+)")
    assert sliding.search(result.stdout).groups() == sliding.search(trained_run["stdout"]).groups()


def test_eval_only_rejects_a_shape_setting_that_contradicts_the_artifact(trained_run, tmp_path):
    env = trainer_env({"data_path": "", "tokenizer_path": ""}, EVAL_ONLY=1, ARTIFACT_PATH=trained_run["artifact"],
                      NUM_LAYERS=6, LOG_DIR=tmp_path)
    result = subprocess.run([sys.executable, str(TRAINER_PATH)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "NUM_LAYERS=6" in result.stderr and "artifact" in result.stderr


@pytest.mark.parametrize("damage", ["truncated", "foreign", "flipped"])
def test_damaged_artifacts_give_one_clear_line(trained_run, tmp_path, damage):
    blob = trained_run["artifact"].read_bytes()
    damaged = tmp_path / "damaged.ptz"
    if damage == "truncated":
        damaged.write_bytes(blob[: len(blob) // 2])
    elif damage == "foreign":
        damaged.write_bytes(b"PK\x03\x04 not ours" + blob[20:])
    else:
        damaged.write_bytes(blob[:-10] + bytes(b ^ 0xFF for b in blob[-10:]))
    env = trainer_env({"data_path": "", "tokenizer_path": ""}, EVAL_ONLY=1, ARTIFACT_PATH=damaged, LOG_DIR=tmp_path)
    env.pop("PRESET")
    result = subprocess.run([sys.executable, str(TRAINER_PATH)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(damaged) in lines[0]
    assert ("not a train_gpt_jepa artifact" if damage == "foreign" else "truncated or corrupt") in lines[0]


# ---------------------------------------------------------------------------
# Budget
# ---------------------------------------------------------------------------


def test_a_tight_budget_lowers_precision_and_fits(tiny_dataset, tmp_path):
    trainer = make_trainer(tiny_dataset)
    for step in range(3):
        trainer.step(step, lambda: 0.0)
    hp = trainer.hp
    default_size = len(T.export_artifact(trainer.model, hp, code_bytes=0, log=lambda m: None))
    budget = int(default_size * 0.9)
    choices: list[str] = []
    tight = T.export_artifact(trainer.model, T.dataclasses.replace(hp, artifact_budget_bytes=budget + 1000),
                              code_bytes=1000, log=choices.append)
    assert len(tight) <= budget
    assert choices and all(re.match(r"export: \S+ int[65] -> int[54] \(relative error", c) for c in choices)
    path = tmp_path / "tight.ptz"
    T.write_atomically(path, tight)
    storages = {entry["storage"] for entry in T.read_artifact(path)["tensors"]}
    assert storages & {"int5", "int4"}
    T.build_eval_model(hp, cpu_runtime(), T.read_artifact(path)["state_dict"])  # loads strictly


def test_an_impossible_budget_exits_with_the_sizes_and_keeps_the_logs(tmp_path, tiny_dataset):
    result = run_trainer(tmp_path, tiny_dataset, RUN_ID="toosmall", ITERATIONS=2, ARTIFACT_BUDGET_BYTES=150_000)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the artifact does not fit") and "ARTIFACT_BUDGET_BYTES=150,000" in lines[-1]
    assert "NUM_LAYERS" in lines[-1]
    summary = json.loads((tmp_path / "logs" / "toosmall.json").read_text())
    assert summary["status"] == "export_failed" and summary["val_bpb"] > 0
    assert not (tmp_path / "model.ptz").exists()


def test_an_unwritable_artifact_path_is_one_line_and_keeps_the_logs(tmp_path, tiny_dataset):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the artifact's folder should be")
    result = run_trainer(tmp_path, tiny_dataset, RUN_ID="unwritable", ITERATIONS=2,
                         ARTIFACT_PATH=blocker / "model.ptz")
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: could not write the artifact") and "ARTIFACT_PATH=" in last_line
    summary = json.loads((tmp_path / "logs" / "unwritable.json").read_text())
    assert summary["status"] == "export_failed" and summary["val_bpb"] > 0


# ---------------------------------------------------------------------------
# Sliding-window evaluation
# ---------------------------------------------------------------------------


class TargetEcho(nn.Module):
    """A fake model whose per-token 'loss' is the target id: any double-counted or skipped
    token shifts the mean. It records each batch's size."""

    def __init__(self):
        super().__init__()
        self.batch_sizes: list[int] = []

    def forward(self, inputs, targets, reduction="mean"):
        self.batch_sizes.append(inputs.size(0))
        return targets.double(), None


@pytest.mark.parametrize("stride", [0, 1, 7, 64, 100, 128])
def test_sliding_windows_score_every_token_exactly_once(stride):
    tokens = torch.randint(0, 50, (1000,))
    luts = (torch.ones(64, dtype=torch.int16), torch.zeros(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool))
    seq_len = 128
    usable = ((tokens.numel() - 1) // seq_len) * seq_len
    val_tokens = tokens[:usable + 1]
    model = TargetEcho()
    loss, bpb = T.evaluate_bpb(model, val_tokens, seq_len, 4 * seq_len, luts, cpu_runtime(), stride=stride)
    # The last batch is padded with windows that score nothing: one shape, one compilation.
    assert set(model.batch_sizes) == {4}
    expected = val_tokens[1:].double().mean().item()
    assert loss == pytest.approx(expected, rel=1e-12)
    assert bpb == pytest.approx(expected / math.log(2.0), rel=1e-12)  # 1 byte per token


def test_sliding_eval_with_stride_equal_to_seq_len_equals_the_plain_eval(tiny_dataset):
    hp = tiny_hyperparameters(tiny_dataset)
    torch.manual_seed(0)
    model = T.GPT(hp)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    sp = T.load_tokenizer(hp)
    luts = T.build_sentencepiece_luts(sp, hp.vocab_size)
    val = T.load_validation_tokens(T.find_shards(hp.data_path, "val"), hp.train_seq_len, hp.vocab_size, 2048)
    plain = T.evaluate_bpb(model, val, hp.train_seq_len, 1024, luts, cpu_runtime())
    sliding = T.evaluate_bpb(model, val, hp.train_seq_len, 1024, luts, cpu_runtime(), stride=hp.train_seq_len)
    assert sliding == plain
    shorter = T.evaluate_bpb(model, val, hp.train_seq_len, 1024, luts, cpu_runtime(), stride=64)
    assert shorter != plain
