"""The record-parity baseline and the frontier switches (issue: record parity): orthogonal init,
the BOS fix, value embeddings, late QAT, SWA, RoPE rescaling, MIN_LR, Polar-Express Muon,
parallel residuals, depth recurrence, gated skips and attention outputs, and the presets."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch

import train_gpt_jepa as T
from conftest import TRAINER_PATH, cpu_runtime, tiny_hyperparameters, trainer_env
from test_trainer import assert_causal, make_trainer, run_trainer

# Every frontier switch on at once, on a model small enough for the CPU: 6 blocks so that loops
# (2-3), parallel residuals (from 4), VE (4, 5) and the U-Net pairs all have room.
EVERYTHING = dict(NUM_LAYERS=6, XSA_LAST_N=6, BIGRAM_VOCAB_SIZE=512, SMEAR_GATE=1, VE_DIM=32, VE_LAYERS="4,5",
                  PARALLEL_RESIDUAL_START=4, LOOP_LAYERS="2-3", LOOP_COUNT=2, SKIP_GATES=1, ATTN_OUTPUT_GATE=1)
ROUNDTRIP_LINE = re.compile(r"final_int\d+_[a-z]+_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)")


def trained_looking(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight: zero-initialised parts (output projections, bigram table, gates)
    would otherwise hide a leak or a dead path behind zeros."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


# ---------------------------------------------------------------------------
# Causality and the BOS fix
# ---------------------------------------------------------------------------


def test_causality_with_every_switch_on(tiny_dataset):
    hp = tiny_hyperparameters(tiny_dataset, **EVERYTHING)
    model = trained_looking(T.GPT(hp))
    model.looping = True
    assert model.layer_order() == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]
    assert all(block.attention.use_xsa for block in model.blocks)
    assert [block.parallel for block in model.blocks] == [False] * 4 + [True] * 2
    assert model.value_embedding is not None and model.skip_gates is not None
    assert_causal(model, hp.vocab_size)


@pytest.mark.parametrize("fix", [1, 0])
def test_a_documents_first_position_sees_nothing_of_the_previous_document(tiny_dataset, fix):
    hp = tiny_hyperparameters(tiny_dataset, BOS_SMEAR_FIX=fix, BIGRAM_VOCAB_SIZE=512, SMEAR_GATE=1)
    model = trained_looking(T.GPT(hp))
    tokens = torch.randint(3, hp.vocab_size, (2, 32))
    tokens[:, 0] = hp.bos_id
    tokens[:, 20] = hp.bos_id  # the second document starts at 20; 19 is the first one's last token
    changed = tokens.clone()
    changed[:, 19] = (tokens[:, 19] + 7) % (hp.vocab_size - 3) + 3
    before, after = model.embed(tokens), model.embed(changed)  # x0: everything before attention
    assert not torch.equal(before[:, 19], after[:, 19])  # the change itself is visible
    if fix:
        assert torch.equal(before[:, 20], after[:, 20])
        assert torch.equal(before[:, 21:], after[:, 21:])
    else:  # the leak the fix closes: SmearGate and BigramHash carry the change across the BOS
        assert not torch.allclose(before[:, 20], after[:, 20], atol=1e-6)


def test_span_masking_hides_the_value_embedding_and_a_masked_bos(tiny_dataset):
    """A masked token must look the same whatever it is, BOS included: value embeddings are
    zeroed there and the BOS fix does not single a masked BOS out."""
    hp = tiny_hyperparameters(tiny_dataset, VE_DIM=32, VE_LAYERS="2,3", BIGRAM_VOCAB_SIZE=512)
    model = trained_looking(T.GPT(hp))
    mask_embedding = torch.randn(hp.model_dim)
    tokens = torch.randint(3, hp.vocab_size, (1, 32))
    mask = torch.zeros(1, 32, dtype=torch.bool)
    mask[:, 10:14] = True
    changed = tokens.clone()
    changed[:, 10:14] = hp.bos_id  # the masked span now holds BOS tokens
    with torch.no_grad():
        _, first = model(tokens, feature_layer=3, token_mask=mask, mask_embedding=mask_embedding)
        _, second = model(changed, feature_layer=3, token_mask=mask, mask_embedding=mask_embedding)
    assert torch.equal(first, second)


# ---------------------------------------------------------------------------
# Initialisation, RoPE, Newton-Schulz, optimizer groups, schedule
# ---------------------------------------------------------------------------


def test_orthogonal_init_and_zero_init_projections(tiny_dataset):
    hp = tiny_hyperparameters(tiny_dataset, MODEL_DIM=128, BIGRAM_DIM=64, VE_DIM=64, VE_LAYERS="3")
    torch.manual_seed(0)
    model = T.GPT(hp)
    identity = torch.eye(hp.model_dim)
    for block in model.blocks:
        query = block.attention.query.weight  # square
        assert torch.allclose(query @ query.T, identity, atol=1e-5)
        expand = block.mlp.expand.weight  # tall (384 x 128): orthonormal columns
        assert torch.allclose(expand.T @ expand, identity, atol=1e-5)
        assert torch.count_nonzero(block.attention.output.weight) == 0
        assert torch.count_nonzero(block.mlp.contract.weight) == 0
    # The side embeddings' projections: orthogonal, scaled by 1/sqrt(2 * num_layers).
    scale = 1.0 / math.sqrt(2 * hp.num_layers)
    for projection in (model.bigram.projection.weight, model.value_embedding.projection.weight):
        assert torch.allclose(projection.T @ projection, scale ** 2 * torch.eye(64), atol=1e-6)
    off = T.GPT(tiny_hyperparameters(tiny_dataset, MODEL_DIM=128, ORTHO_INIT=0)).blocks[0].attention.query.weight
    assert not torch.allclose(off @ off.T, identity, atol=0.1)


def test_rope_base_is_rescaled_beyond_the_train_length_only():
    rotary = T.PartialRotary(16, 10000.0, rope_train_seq_len=64)
    reference = T.PartialRotary(16, 10000.0 * 2 ** (16 / 14))
    plain = T.PartialRotary(16, 10000.0)
    short, long = torch.randn(1, 2, 64, 32), torch.randn(1, 2, 128, 32)
    assert torch.equal(rotary(short), plain(short))  # not longer than 64: untouched
    assert torch.equal(rotary(long), reference(long))  # 128 = 2 x 64: base * 2^(16/14)
    assert not torch.allclose(rotary(long), plain(long))


@pytest.mark.parametrize("shape", [(64, 192), (512, 128)])
def test_newton_schulz_orthogonalises_and_polar_express_lands_closer(shape):
    torch.manual_seed(0)
    matrix = torch.randn(*shape)
    deviation = {}
    for kind in ("quintic", "polar"):
        result = T.newton_schulz_orthogonalize(matrix, 5, kind)
        assert result.shape == matrix.shape
        singular_values = torch.linalg.svdvals(result)
        deviation[kind] = (singular_values - 1).abs().max().item()
    # Muon's quintic leaves singular values in about [0.68, 1.13] here; Polar Express's
    # per-iteration coefficients in about [0.86, 1.14], half the worst deviation from 1.
    assert deviation["quintic"] < 0.35
    assert deviation["polar"] < 0.6 * deviation["quintic"]


def test_every_parameter_of_every_switch_is_in_exactly_one_optimizer_group(tiny_dataset):
    trainer = make_trainer(tiny_dataset, JEPA_WEIGHT=0.1, **EVERYTHING)
    muon, embeddings, scalars = trainer.optimizers
    groups = [[id(p) for g in opt.param_groups for p in g["params"]] for opt in trainer.optimizers]
    flat = [pid for group in groups for pid in group]
    everything = list(trainer.model.parameters()) + list(trainer.head.parameters())
    assert sorted(flat) == sorted(id(p) for p in everything)
    model = trainer.model
    assert id(model.value_embedding.table.weight) in set(groups[1])
    assert id(model.value_embedding.projection.weight) in set(groups[0])
    for param in (model.skip_gates, model.value_embedding.scale, model.blocks[0].attention.output_gate,
                  model.blocks[4].attention.value_embedding_scale):
        assert id(param) in set(groups[2])
    assert all(group["weight_decay"] == trainer.hp.scalar_wd > 0 for group in scalars.param_groups)


def test_min_lr_floors_the_warmdown_only(tiny_dataset):
    schedule = T.Schedule(tiny_hyperparameters(tiny_dataset, ITERATIONS=100, WARMDOWN_ITERS=50, MIN_LR=0.1),
                          jepa_active=True)
    assert schedule.lr_multiplier(10, 0.0) == 1.0
    assert schedule.lr_multiplier(75, 0.0) == pytest.approx(0.5)
    assert schedule.lr_multiplier(99, 0.0) == pytest.approx(0.1)  # the warmdown alone says 0.02
    assert schedule.warmdown(99, 0.0) == pytest.approx(0.02)  # the JEPA anneal is not floored


def test_phases_switch_at_their_fractions_and_priming_covers_each(tiny_dataset):
    hp = tiny_hyperparameters(tiny_dataset, ITERATIONS=100, LOOP_LAYERS="1-2", LOOP_START_FRACTION=0.35,
                              QAT_START_FRACTION=0.15)
    schedule = T.Schedule(hp, jepa_active=False)
    assert schedule.phase(34, 0.0) == (False, False)
    assert schedule.phase(35, 0.0) == (False, True)
    assert schedule.phase(85, 0.0) == (True, True)
    assert schedule.reachable_phases() == [(False, False), (False, True), (True, True)]
    off = T.Schedule(tiny_hyperparameters(tiny_dataset, QAT_START_FRACTION=0), jepa_active=False)
    assert off.reachable_phases() == [(False, False)]


# ---------------------------------------------------------------------------
# Late QAT and SWA
# ---------------------------------------------------------------------------


def test_qat_forward_weights_are_the_exporters_dequantised_weights(tmp_path, tiny_dataset):
    hp = tiny_hyperparameters(tiny_dataset, VE_DIM=32, VE_LAYERS="3")
    model = trained_looking(T.GPT(hp))
    artifact = T.export_artifact(model, hp, code_bytes=0, log=lambda message: None)
    path = tmp_path / "model.ptz"
    T.write_atomically(path, artifact)
    stored = T.read_artifact(path)["state_dict"]
    T.set_late_qat(model, 6)
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, T.CastedLinear):
            probe = torch.eye(module.in_features, requires_grad=True)
            seen = module(probe).T  # F.linear(I, W) = W^T: the weight the forward used
            assert torch.equal(seen, stored[f"{name}.weight"]), name
            checked += 1
    assert checked == 4 * 6 + 2  # q, k, v, output, expand, contract per block; bigram and VE projections
    # Straight-through: the gradient reaches the fp32 weight as if it were not quantised.
    layer = model.blocks[0].mlp.expand
    inputs = torch.randn(5, layer.in_features)
    layer(inputs).square().sum().backward()
    quantised_grad = layer.weight.grad.clone()
    layer.weight.grad = None
    weight_q = layer(torch.eye(layer.in_features)).T.detach()
    expected = 2 * (inputs @ weight_q.T).T @ inputs
    assert torch.allclose(quantised_grad, expected, atol=1e-5)
    model.eval()  # evaluation never fake-quantises
    assert torch.equal(layer(torch.eye(layer.in_features)).T, layer.weight)


def test_late_qat_and_looping_switch_on_during_training(tiny_dataset):
    trainer = make_trainer(tiny_dataset, ITERATIONS=10, LOOP_LAYERS="1-2", LOOP_START_FRACTION=0.3,
                           QAT_START_FRACTION=0.2)
    seen = []
    for step in range(10):
        trainer.step(step, lambda: 0.0)
        seen.append((trainer.model.blocks[0].mlp.expand.qat_bits, trainer.model.looping))
    assert seen[:3] == [(0, False)] * 3
    assert seen[3:8] == [(0, True)] * 5
    assert seen[8:] == [(6, True)] * 2


def test_swa_exports_the_mean_of_its_snapshots(tiny_dataset):
    trainer = make_trainer(tiny_dataset, ITERATIONS=12, WARMDOWN_ITERS=10, SWA_ENABLED=1, SWA_EVERY=3, SWA_START_LR=0.5,
                           QAT_START_FRACTION=0)
    snapshots = []
    for step in range(12):
        outcome = trainer.step(step, lambda: 0.0)
        if (step + 1) % 3 == 0 and outcome.lr_multiplier < 0.5:
            snapshots.append([p.detach().clone() for p in trainer.model.parameters()])
    assert len(snapshots) == 2 and trainer.swa_count == 2  # steps 9 and 12: multipliers 0.4 and 0.1
    label, weights = trainer.final_weights()
    assert label == "swa of 2 raw snapshots"
    for averaged, first, second in zip(weights, *snapshots):
        assert torch.allclose(averaged, (first + second) / 2, atol=1e-7)


def test_swa_averages_the_ema_snapshots_when_the_final_ema_is_on_and_skips_the_lr_warmup(tiny_dataset):
    trainer = make_trainer(tiny_dataset, ITERATIONS=12, WARMDOWN_ITERS=10, SWA_ENABLED=1, SWA_EVERY=3, SWA_START_LR=0.5,
                           QAT_START_FRACTION=0, FINAL_EMA=1, LR_WARMUP_STEPS=9)
    snapshots = []
    for step in range(12):
        outcome = trainer.step(step, lambda: 0.0)
        if step == 2:  # the LR warmup's multiplier (0.33) is below SWA_START_LR, the warmdown's is not
            assert outcome.lr_multiplier < 0.5 and trainer.swa_count == 0
        if (step + 1) % 3 == 0 and trainer.schedule.warmdown(step, 0.0) < 0.5:
            snapshots.append([tensor.clone() for tensor in trainer.final_ema])
    label, weights = trainer.final_weights()
    assert label == "swa of 2 ema snapshots"
    for averaged, first, second in zip(weights, *snapshots):
        assert torch.allclose(averaged, (first + second) / 2, atol=1e-7)


def test_bf16_tables_keep_an_fp32_ema_target(tiny_dataset):
    """MODEL_DTYPE=bfloat16: the online tables are bf16 (as in the records), but the EMA target
    encoder's stay fp32, or a step of 1 - decay would vanish under bf16 rounding."""
    hp = tiny_hyperparameters(tiny_dataset, JEPA_WEIGHT=0.1, TARGET_EMA_DECAY=0.999, MODEL_DTYPE="bfloat16")
    runtime = T.dataclasses.replace(cpu_runtime(), model_dtype=torch.bfloat16)
    trainer = T.Trainer(hp, runtime, 1, T.find_shards(hp.data_path, "train"), T.RunLogger(None))
    online, target = trainer.model.token_embedding.weight, trainer.target_encoder.token_embedding.weight
    assert online.dtype == torch.bfloat16 and target.dtype == torch.float32
    before = target.detach().clone()
    trainer.step(0, lambda: 0.0)
    expected = before + 0.001 * (online.detach().float() - before)  # lerp in fp32
    assert torch.allclose(target, expected, atol=1e-7, rtol=0)
    assert not torch.equal(target, before)  # the 0.001 step survived


# ---------------------------------------------------------------------------
# Depth recurrence and whole runs
# ---------------------------------------------------------------------------


def test_loops_add_compute_but_no_parameters(tiny_dataset):
    plain = T.GPT(tiny_hyperparameters(tiny_dataset))
    looped = T.GPT(tiny_hyperparameters(tiny_dataset, LOOP_LAYERS="1-2", LOOP_COUNT=2))
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in looped.parameters())
    looped.load_state_dict(plain.state_dict())
    trained_looking(looped)
    tokens = torch.randint(0, 1024, (1, 32))
    without = looped.logits(tokens)
    looped.looping = True
    assert looped.layer_order() == [0, 1, 2, 1, 2, 1, 2, 3]
    assert not torch.allclose(without, looped.logits(tokens), atol=1e-4)


def test_jepa_reads_the_last_pass_of_its_block_with_loops_and_parallel_residuals(tiny_dataset):
    hp = tiny_hyperparameters(tiny_dataset, JEPA_WEIGHT=0.1, LOOP_LAYERS="1-2", PARALLEL_RESIDUAL_START=2,
                              JEPA_LAYER=2, JEPA_GRAD_LAYERS=2, VE_DIM=0)
    model = trained_looking(T.GPT(hp))
    model.looping = True
    tokens = torch.randint(0, hp.vocab_size, (2, 32))
    # By hand: run the passes 0, 1, 2, 1, 2, 1, 2 and keep the last output of block 2.
    x0 = model.embed(tokens)
    x, skips = x0, {}
    for index in [0, 1, 2, 1, 2, 1, 2]:
        x = model._run_block(index, x, x0, skips, None)
    _, features = model(tokens, feature_layer=2, grad_blocks=2)
    assert torch.allclose(features, x, atol=1e-6)
    _, target = model(tokens, feature_layer=2, last_layer=2)
    assert torch.allclose(target, x, atol=1e-6)
    # JEPA_GRAD_LAYERS=2: the JEPA gradient reaches only the last two passes (blocks 1 and 2).
    features.square().sum().backward()
    assert model.blocks[0].mlp.expand.weight.grad is None
    assert model.blocks[1].mlp.expand.weight.grad is not None and model.blocks[2].mlp.expand.weight.grad is not None


def test_a_looped_run_exports_and_eval_only_reproduces_it(tmp_path, tiny_dataset):
    result = run_trainer(tmp_path / "run", tiny_dataset, RUN_ID="looped", ITERATIONS=6, LOOP_LAYERS="1-2",
                         LOOP_START_FRACTION=0.5, VE_DIM=32, VE_LAYERS="2,3", SWA_ENABLED=1, SWA_EVERY=2, WARMDOWN_ITERS=6,
                         PARALLEL_RESIDUAL_START=3, SKIP_GATES=1, ATTN_OUTPUT_GATE=1, QAT_START_FRACTION=0.3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "looping: on from step 3" in result.stdout and "late_qat: on from step 5" in result.stdout
    assert "final_swa" in result.stdout
    env = {key: value for key, value in trainer_env({"data_path": "", "tokenizer_path": ""}).items()
           if key.upper() not in {f.upper() for f in T.Hyperparameters.__dataclass_fields__} and key != "PRESET"}
    env.update(EVAL_ONLY="1", ARTIFACT_PATH=str(tmp_path / "run" / "model.ptz"), LOG_DIR=str(tmp_path / "logs"))
    evaluated = subprocess.run([sys.executable, str(TRAINER_PATH)], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert ROUNDTRIP_LINE.search(evaluated.stdout).groups() == ROUNDTRIP_LINE.search(result.stdout).groups()


# The presets at their own depth and settings, shrunk to tiny widths and batches.
TINY_SHAPES = dict(MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=16, BIGRAM_VOCAB_SIZE=256, BIGRAM_DIM=16,
                   VE_DIM=16, D_LATENT=32, TRAIN_SEQ_LEN=64, TRAIN_BATCH_TOKENS=512, GRAD_ACCUM_STEPS=1,
                   ITERATIONS=10, WARMDOWN_ITERS=5, WARMUP_STEPS=0, MAX_WALLCLOCK_SECONDS=0, VAL_LOSS_EVERY=0,
                   VAL_BATCH_SIZE=4096, VAL_MAX_TOKENS=4096, EVAL_STRIDE=0, TRAIN_LOG_EVERY=5, FINAL_EMA=1,
                   SWA_EVERY=2, SWA_START_LR=0.5)


@pytest.mark.parametrize("preset", ["11L", "frontier"])
def test_the_record_presets_validate_and_train_on_tiny_shapes(tmp_path, tiny_dataset, preset):
    overrides = dict(TINY_SHAPES, PRESET=preset)
    hp = T.load_hyperparameters({key: str(value) for key, value in overrides.items()})
    T.validate_hyperparameters(hp, world_size=1)
    assert hp.num_layers == 11
    result = run_trainer(tmp_path, tiny_dataset, RUN_ID=preset, JEPA_WEIGHT=0, **overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(value) for value in re.findall(r"train_loss:(\S+)", result.stdout)]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert ROUNDTRIP_LINE.search(result.stdout)
    if preset == "frontier":
        assert "looping: on from step 4" in result.stdout and "final_swa" in result.stdout


def test_compiled_bf16_priming_covers_every_phase_of_the_frontier_switches(tiny_dataset):
    """COMPILE=1 and bf16, the GPU path: late QAT and looping change the graph mid-run, so priming
    must compile each phase; then a run through all of them compiles nothing more."""
    from torch._dynamo.utils import counters

    hp = tiny_hyperparameters(tiny_dataset, COMPILE=1, COMPUTE_DTYPE="bfloat16", WARMUP_STEPS=1, JEPA_WEIGHT=0.1,
                              TARGET_EMA_DECAY=0, JEPA_WARMUP_STEPS=1, NUM_LAYERS=2, XSA_LAST_N=2,
                              LOOP_LAYERS="0-0", LOOP_START_FRACTION=0.5, QAT_START_FRACTION=0.5,
                              PARALLEL_RESIDUAL_START=1, SKIP_GATES=1, ATTN_OUTPUT_GATE=1, MUON_NS="polar",
                              ITERATIONS=6, TRAIN_BATCH_TOKENS=1024)
    grad_accum_steps = T.validate_hyperparameters(hp, world_size=1)
    torch._dynamo.reset()
    trainer = T.Trainer(hp, cpu_runtime(compile=True, autocast_dtype=torch.bfloat16), grad_accum_steps,
                        T.find_shards(hp.data_path, "train"), T.RunLogger(None))
    assert trainer.model.token_embedding.weight.dtype == torch.bfloat16  # MODEL_DTYPE=auto follows bf16
    assert trainer.model.blocks[0].attention.query.weight.dtype == torch.float32  # linears stay fp32
    counters.clear()
    # The JEPA step and the zero-weight step, each before and after QAT and looping start (at 50%).
    assert T.prime_and_undo(trainer) == 4
    primed_graphs = counters["stats"]["unique_graphs"]
    assert trainer.phase == (False, False) and not trainer.model.looping
    phases, weights = [], []
    for step in range(6):
        weights.append(trainer.step(step, lambda: 0.0).jepa_weight)
        phases.append(trainer.phase)
    assert phases == [(False, False)] * 3 + [(True, True)] * 3
    assert weights[0] == 0.0 and all(weight > 0 for weight in weights[1:])
    assert counters["stats"]["unique_graphs"] == primed_graphs, dict(counters["stats"])
    assert trainer.weights_finite()
    # The switches really act inside the compiled graph (public late QAT was dead code once
    # torch.compile folded its flag): each one changes the compiled loss, as it does eagerly.
    inputs, targets = trainer.loader.next_batch(trainer.local_batch_tokens, hp.train_seq_len)

    # With gradients on, as in a training step: the primed graphs serve these calls.

    def losses(qat: bool, looping: bool) -> tuple[float, float]:
        trainer.set_phase((qat, looping))
        with trainer.runtime.autocast():
            return trainer.compiled_model(inputs, targets)[0].item(), trainer.model(inputs, targets)[0].item()

    plain, both = losses(False, False), losses(True, True)
    for compiled, eager in (plain, both):
        assert compiled == pytest.approx(eager, abs=0.02)
    assert plain[0] != both[0] and plain[1] != both[1]
    assert counters["stats"]["unique_graphs"] == primed_graphs, dict(counters["stats"])
    torch._dynamo.reset()


def test_compiled_newton_schulz_matches_the_eager_iteration():
    """The CUDA path compiles Newton-Schulz (Muon(compiled=True)); the same graph on the CPU."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    matrix = torch.randn(48, 80)
    compiled = torch.compile(T.newton_schulz_orthogonalize)
    for kind in ("quintic", "polar"):
        assert torch.allclose(compiled(matrix, 5, kind), T.newton_schulz_orthogonalize(matrix, 5, kind), atol=1e-4)
    torch._dynamo.reset()
