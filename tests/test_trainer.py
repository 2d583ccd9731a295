"""The core trainer: causality, the JEPA machinery, optimizer groups, start-up validation and
the single- vs multi-process equivalence (GUIDE sections 3, 4, 5, 9)."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt_jepa as T
from conftest import TRAINER_PATH, cpu_runtime, tiny_hyperparameters, trainer_env


def make_trainer(dataset: dict[str, Path], **overrides: object) -> T.Trainer:
    hp = tiny_hyperparameters(dataset, **overrides)
    grad_accum_steps = T.validate_hyperparameters(hp, world_size=1)
    return T.Trainer(hp, cpu_runtime(), grad_accum_steps, T.find_shards(hp.data_path, "train"), T.RunLogger(None))


def run_trainer(tmp_path: Path, dataset: dict[str, Path], nproc: int = 1, timeout: int = 300,
                **overrides: object) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = trainer_env(dataset, **{"LOG_DIR": tmp_path / "logs", "ARTIFACT_PATH": tmp_path / "model.ptz", **overrides})
    if nproc == 1:
        command = [sys.executable, str(TRAINER_PATH)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(TRAINER_PATH)]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def train_losses(log_dir: Path, run_id: str) -> list[float]:
    summary = json.loads((log_dir / f"{run_id}.json").read_text())
    return [entry["train_loss"] for entry in summary["train_history"]]


# ---------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------


def test_causality_with_bigram_smear_and_xsa(tiny_dataset):
    hp = tiny_hyperparameters(tiny_dataset, XSA_LAST_N=4, BIGRAM_VOCAB_SIZE=512, SMEAR_GATE=1)
    torch.manual_seed(0)
    model = T.GPT(hp)
    # Trained-looking weights: the zero-initialised parts (bigram table, output projections)
    # would otherwise hide a leak behind zeros.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    assert all(block.attention.use_xsa for block in model.blocks)
    assert_causal(model, hp.vocab_size)


def assert_causal(model: T.GPT, vocab_size: int, length: int = 64, cut: int = 40) -> None:
    """Changing the tokens after position `cut` leaves every logit up to it unchanged (and does
    change the later ones, so the check cannot pass on a model that ignores its input)."""
    tokens = torch.randint(0, vocab_size, (2, length))
    changed = tokens.clone()
    changed[:, cut + 1:] = torch.randint(0, vocab_size, (2, length - cut - 1))
    before, after = model.logits(tokens), model.logits(changed)
    assert torch.allclose(before[:, :cut + 1], after[:, :cut + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, cut + 1:], after[:, cut + 1:], atol=1e-3)


def test_partial_rope_leaves_the_unrotated_dims_alone():
    rotary = T.PartialRotary(rotary_dims=4, base=10000.0)
    x = torch.randn(1, 2, 5, 8)
    y = rotary(x)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert torch.allclose(y[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1), atol=1e-5)  # a rotation
    assert torch.allclose(y[:, :, 0], x[:, :, 0])  # position 0 is not rotated
    assert not torch.allclose(y[:, :, 1:, :4], x[:, :, 1:, :4])


# ---------------------------------------------------------------------------
# JEPA machinery
# ---------------------------------------------------------------------------


def test_target_encoder_gets_no_gradient_and_follows_the_ema_formula(tiny_dataset):
    trainer = make_trainer(tiny_dataset, TARGET_EMA_DECAY=0.9)
    target = trainer.target_encoder
    assert target is not None and all(not p.requires_grad for p in target.parameters())
    target_before = [p.detach().clone() for p in target.parameters()]
    trainer.step(0, lambda: 0.0)
    online_after = [p.detach().clone() for p in trainer.model.parameters()]
    assert all(p.grad is None for p in target.parameters())
    for ema, old, online in zip(target.parameters(), target_before, online_after):
        assert torch.allclose(ema, 0.9 * old + 0.1 * online, atol=1e-6)
    assert any(not torch.equal(ema, old) for ema, old in zip(target.parameters(), target_before))


def test_decay_zero_reuses_the_online_features_exactly(tiny_dataset):
    """TARGET_EMA_DECAY=0 builds no target encoder; its JEPA loss must equal the loss computed
    with an explicit second forward through a copy of the online encoder."""
    trainer = make_trainer(tiny_dataset, TARGET_EMA_DECAY=0)
    assert trainer.target_encoder is None
    inputs, targets = trainer.loader.next_batch(trainer.local_batch_tokens, trainer.hp.train_seq_len)
    terms = trainer.micro_step_losses(inputs, targets, ce_weight=1.0, jepa_weight=1.0)

    explicit_target = copy.deepcopy(trainer.model)
    layer = trainer.hp.jepa_layer_index
    with torch.no_grad():
        _, target_features = explicit_target(inputs, feature_layer=layer, last_layer=layer)
    _, context_features = trainer.model(inputs, targets, feature_layer=layer)
    prediction, regulariser = trainer.head(context_features, target_features)
    assert torch.allclose(terms.prediction, prediction, atol=1e-6, rtol=1e-5)
    assert torch.allclose(terms.regulariser, regulariser, atol=1e-6, rtol=1e-5)


def test_predictor_projections_and_every_block_weight_change(tiny_dataset):
    trainer = make_trainer(tiny_dataset, JEPA_WEIGHT=0.5)
    watched = {f"head.{n}": p for n, p in trainer.head.named_parameters()}
    watched.update({n: p for n, p in trainer.model.named_parameters() if n.startswith("blocks.")})
    before = {name: p.detach().clone() for name, p in watched.items()}
    for step in range(3):
        trainer.step(step, lambda: 0.0)
    unchanged = [name for name, p in watched.items() if torch.equal(p, before[name])]
    assert not unchanged, f"parameters that never moved: {unchanged}"
    assert any(name.startswith("head.predictors.") for name in watched)
    assert any("context_projection" in name for name in watched) and any("target_projection" in n for n in watched)


def test_every_parameter_is_in_exactly_one_optimizer_group(tiny_dataset):
    trainer = make_trainer(tiny_dataset)
    muon, embeddings, scalars = trainer.optimizers
    groups = [[id(p) for g in opt.param_groups for p in g["params"]] for opt in trainer.optimizers]
    flat = [pid for group in groups for pid in group]
    everything = list(trainer.model.parameters()) + list(trainer.head.parameters())
    assert sorted(flat) == sorted(id(p) for p in everything)
    # The #1581 bug: predictor matrices missing from every optimizer. Ours are in Muon.
    muon_ids = set(groups[0])
    for name, param in trainer.head.named_parameters():
        if param.ndim == 2:
            assert id(param) in muon_ids, name
    assert id(trainer.model.token_embedding.weight) in set(groups[1])
    assert isinstance(muon, T.Muon) and isinstance(scalars, torch.optim.AdamW)
    assert all(p.ndim < 2 or p is trainer.model.skip_weights or p.shape[0] == 2 for g in scalars.param_groups
               for p in g["params"])


def test_jepa_weight_zero_builds_nothing_jepa_and_starts_from_the_same_backbone(tiny_dataset):
    vanilla = make_trainer(tiny_dataset, JEPA_WEIGHT=0)
    jepa = make_trainer(tiny_dataset, JEPA_WEIGHT=0.1)
    assert vanilla.head is None and vanilla.target_encoder is None
    vanilla_ids = {id(p) for opt in vanilla.optimizers for g in opt.param_groups for p in g["params"]}
    assert vanilla_ids == {id(p) for p in vanilla.model.parameters()}
    for (name, a), (_, b) in zip(vanilla.model.state_dict().items(), jepa.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_zero_weight_steps_skip_the_target_forward(tiny_dataset):
    trainer = make_trainer(tiny_dataset, TARGET_EMA_DECAY=0.9)
    calls = []
    trainer.compiled_target = lambda *args, **kwargs: calls.append(1) or trainer.target_encoder(*args, **kwargs)
    inputs, targets = trainer.loader.next_batch(trainer.local_batch_tokens, trainer.hp.train_seq_len)
    terms = trainer.micro_step_losses(inputs, targets, ce_weight=1.0, jepa_weight=0.0)
    assert calls == [] and terms.prediction is None
    vanilla_loss, _ = trainer.model(inputs, targets)
    assert torch.equal(terms.total, vanilla_loss)
    trainer.micro_step_losses(inputs, targets, ce_weight=1.0, jepa_weight=0.1)
    assert calls == [1]


def test_multi_horizon_weights_and_targets(tiny_dataset):
    hp = tiny_hyperparameters(tiny_dataset, JEPA_OFFSETS="1,2,4", JEPA_OFFSET_DECAY=0.5, ANTI_COLLAPSE="none")
    head = T.JepaHead(hp)
    assert head.offsets == [1, 2, 4] and len(head.predictors) == 3
    assert head.offset_weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    context, target = torch.randn(2, 16, hp.model_dim), torch.randn(2, 16, hp.model_dim)
    loss, _ = head(context, target)
    z_context = head.context_projection(T.rms_norm(context))
    z_target = head.target_projection(T.rms_norm(target))
    expected = sum(w * torch.nn.functional.mse_loss(pred(z_context[:, :16 - k]), z_target[:, k:])
                   for w, k, pred in zip(head.offset_weights, head.offsets, head.predictors))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_schedule_ramps_and_anneals_the_jepa_weight(tiny_dataset):
    hp = tiny_hyperparameters(tiny_dataset, ITERATIONS=100, WARMDOWN_ITERS=20, JEPA_WARMUP_STEPS=10, JEPA_WEIGHT=0.2)
    schedule = T.Schedule(hp, jepa_active=True)
    assert schedule.jepa_weight(0, 0.0) == 0.0
    assert schedule.jepa_weight(5, 0.0) == pytest.approx(0.1)
    assert schedule.jepa_weight(50, 0.0) == pytest.approx(0.2)
    assert schedule.jepa_weight(90, 0.0) == pytest.approx(0.1)  # half-way through the warmdown
    assert schedule.lr_multiplier(90, 0.0) == pytest.approx(0.5)
    no_anneal = T.Schedule(tiny_hyperparameters(tiny_dataset, ITERATIONS=100, WARMDOWN_ITERS=20,
                                                JEPA_WARMUP_STEPS=10, JEPA_WEIGHT=0.2, JEPA_ANNEAL=0), True)
    assert no_anneal.jepa_weight(90, 0.0) == pytest.approx(0.2)


# ---------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------


def test_a_tiny_run_learns_and_writes_its_logs(tmp_path, tiny_dataset):
    result = run_trainer(tmp_path, tiny_dataset, RUN_ID="learn", ITERATIONS=30, TRAIN_LOG_EVERY=5)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = train_losses(tmp_path / "logs", "learn")
    assert losses[-1] < losses[0] - 0.5, losses
    log_text = (tmp_path / "logs" / "learn.txt").read_text()
    assert log_text.startswith(TRAINER_PATH.read_text()[:200])  # the log opens with the trainer's source
    assert "  JEPA_WEIGHT=0.1" in log_text and "step:30/30 val_loss:" in log_text
    summary = json.loads((tmp_path / "logs" / "learn.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 30
    import hashlib
    assert summary["code_sha256"] == hashlib.sha256(TRAINER_PATH.read_bytes()).hexdigest()
    assert summary["config"]["jepa_weight"] == 0.1 and summary["val_bpb"] > 0


def test_two_process_gloo_run_matches_one_process_with_accumulation(tmp_path, tiny_dataset):
    common = dict(ITERATIONS=4, TRAIN_LOG_EVERY=1, JEPA_WEIGHT=0.2, TARGET_EMA_DECAY=0.9, VAL_MAX_TOKENS=2048)
    single = run_trainer(tmp_path / "single", tiny_dataset, RUN_ID="single", GRAD_ACCUM_STEPS=2, **common)
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_trainer(tmp_path / "double", tiny_dataset, nproc=2, RUN_ID="double", GRAD_ACCUM_STEPS=1, **common)
    assert double.returncode == 0, (double.stdout[-2000:], double.stderr[-3000:])
    one = json.loads((tmp_path / "single" / "logs" / "single.json").read_text())
    two = json.loads((tmp_path / "double" / "logs" / "double.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("train_loss", "jepa_loss", "reg_loss"):
        a = [entry[key] for entry in one["train_history"]]
        b = [entry[key] for entry in two["train_history"]]
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), key
    assert one["val_bpb"] == pytest.approx(two["val_bpb"], rel=1e-5)


# ---------------------------------------------------------------------------
# Start-up validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, expected", [
    ({"JEPA_WIEGHT": "0.5"}, "JEPA_WIEGHT"),
    ({"NUM_LAYER": "4"}, "did you mean NUM_LAYERS"),
    ({"MODEL_DIM": "100", "NUM_HEADS": "3"}, "MODEL_DIM=100 is not divisible by NUM_HEADS=3"),
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS=3"),
    ({"ROPE_DIMS": "7"}, "ROPE_DIMS=7"),
    ({"ROPE_DIMS": "64"}, "ROPE_DIMS=64"),
    ({"JEPA_MODE": "nxet"}, "JEPA_MODE='nxet'"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000"),
    ({"JEPA_WEIGHT": "abc"}, "JEPA_WEIGHT='abc'"),
    ({"PRESET": "huge"}, "PRESET='huge'"),
    ({"JEPA_LAYER": "9"}, "JEPA_LAYER=9"),
])
def test_bad_settings_exit_with_one_line_naming_the_variable(tmp_path, tiny_dataset, overrides, expected):
    result = run_trainer(tmp_path, tiny_dataset, timeout=60, **overrides)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_and_tokenizer_name_the_path_and_both_fixes(tmp_path, tiny_dataset):
    missing = run_trainer(tmp_path, tiny_dataset, timeout=60, DATA_PATH=tmp_path / "nowhere")
    assert missing.returncode == 2
    assert str(tmp_path / "nowhere") in missing.stderr
    assert "cached_challenge_fineweb.py" in missing.stderr and "build_local_corpus.py" in missing.stderr
    no_tokenizer = run_trainer(tmp_path, tiny_dataset, timeout=60, TOKENIZER_PATH=tmp_path / "none.model")
    assert no_tokenizer.returncode == 2 and "none.model" in no_tokenizer.stderr
    assert "build_local_corpus.py" in no_tokenizer.stderr


def test_vocab_size_must_match_the_tokenizer(tmp_path, tiny_dataset):
    result = run_trainer(tmp_path, tiny_dataset, timeout=60, VOCAB_SIZE=2048)
    assert result.returncode == 2 and "VOCAB_SIZE=2048" in result.stderr and "1024 ids" in result.stderr


def test_unknown_variables_of_other_tools_are_not_typos():
    T.check_unknown_env({"PATH": "/bin", "HOME": "/root", "MASTER_PORT": "1234", "TORCHINDUCTOR_CACHE_DIR": "x",
                         "CUDA_VISIBLE_DEVICES": "0", "HOSTNAME": "box", "OFFICIAL_TOKENIZER_PATH": "x"})
    with pytest.raises(T.ConfigError, match="VICREG_VAR_WEIGTH"):
        T.check_unknown_env({"VICREG_VAR_WEIGTH": "1"})


@pytest.mark.parametrize("name", [name for name in T.CHOICES if name != "preset"])
def test_every_choice_setting_accepts_its_values_and_refuses_any_other(tiny_dataset, name):
    """CHOICES is the one list of a setting's values: validation accepts each of them (the defaults of
    the other settings otherwise) and refuses anything else with one line that names the variable and
    lists them."""
    unknown = 7 if isinstance(next(iter(T.CHOICES[name])), int) else "nonsense"
    with pytest.raises(T.ConfigError, match=re.escape(f"{name.upper()}={unknown!r} must be")) as refused:
        T.validate_hyperparameters(tiny_hyperparameters(tiny_dataset, **{name.upper(): unknown}), world_size=1)
    assert all(str(value) in str(refused.value) for value in T.CHOICES[name])
    for value in T.CHOICES[name]:
        if name == "compressor" and value != "lzma" and importlib.util.find_spec(T.COMPRESSOR_PACKAGES[value]) is None:
            continue  # a compressor whose package is missing is refused for that reason (test_export_ttt.py)
        T.validate_hyperparameters(tiny_hyperparameters(tiny_dataset, **{name.upper(): value}), world_size=1)


def test_choices_cover_the_defaults_and_the_tables_keyed_by_them():
    defaults = T.Hyperparameters()
    assert all(getattr(defaults, name) in values for name, values in T.CHOICES.items())
    assert list(T.CHOICES["preset"]) == list(T.PRESETS)  # PRESET is checked when the settings load
    assert set(T.CHOICES["compressor"]) == set(T.COMPRESSORS)  # the artifact's compressor ids
    assert set(T.CHOICES["muon_ns"]) == set(T.NEWTON_SCHULZ_KINDS)
    with pytest.raises(T.ConfigError, match=re.escape("PRESET='huge' is unknown: use one of tiny, 11L, frontier, 20L")):
        T.load_hyperparameters({"PRESET": "huge"})
