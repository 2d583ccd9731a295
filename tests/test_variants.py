"""The JEPA variants: span masking without leaks, chunk targets, the curriculum, layer
localisation, SIGReg and collapse detection (GUIDE section 5)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import train_gpt_jepa as T
from conftest import tiny_hyperparameters
from test_trainer import make_trainer, run_trainer


def perturbed_model(hp: T.Hyperparameters, seed: int = 0) -> T.GPT:
    """A backbone whose zero-initialised parts are non-zero, so nothing hides behind zeros."""
    torch.manual_seed(seed)
    model = T.GPT(hp)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


# ---------------------------------------------------------------------------
# Span mode
# ---------------------------------------------------------------------------


def test_span_context_pass_does_not_see_the_masked_tokens(tiny_dataset):
    hp = tiny_hyperparameters(tiny_dataset, JEPA_MODE="span", BIGRAM_VOCAB_SIZE=512, SMEAR_GATE=1, XSA_LAST_N=2)
    model = perturbed_model(hp)
    mask_embedding = torch.randn(hp.model_dim)
    length = 96
    starts, lengths = T.sample_spans(3, length, hp, torch.Generator().manual_seed(1))
    mask = T.spans_to_mask(starts, lengths, length)
    tokens = torch.randint(0, hp.vocab_size, (3, length))
    changed = torch.where(mask, torch.randint(0, hp.vocab_size, (3, length)), tokens)
    assert not torch.equal(tokens, changed)
    layer = hp.num_layers - 1

    def context(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids, feature_layer=layer, token_mask=mask, mask_embedding=mask_embedding)[1]

    after_span = T.F.pad(mask[:, :-1], (1, 0)) & ~mask
    assert after_span.any()
    original, perturbed = context(tokens), context(changed)
    assert torch.equal(original[mask], perturbed[mask])
    assert torch.equal(original[after_span], perturbed[after_span])
    assert torch.equal(original, perturbed)  # nothing anywhere depends on a masked token
    # The guards are needed: the raw BigramHash after a span, and the unmasked pass, do leak.
    assert not torch.equal(model.bigram(tokens)[after_span], model.bigram(changed)[after_span])
    with torch.no_grad():
        unmasked = model(tokens, feature_layer=layer)[1], model(changed, feature_layer=layer)[1]
    assert not torch.equal(unmasked[0][mask], unmasked[1][mask])


@pytest.mark.parametrize("spans, mean, minimum, length", [(4, 16.0, 2, 256), (1, 3.0, 1, 32), (8, 40.0, 5, 1024)])
def test_spans_are_non_overlapping_in_bounds_and_counted(tiny_dataset, spans, mean, minimum, length):
    hp = tiny_hyperparameters(tiny_dataset, JEPA_NUM_SPANS=spans, JEPA_SPAN_MEAN=mean, JEPA_SPAN_MIN=minimum,
                              TRAIN_SEQ_LEN=length)
    starts, lengths = T.sample_spans(2000, length, hp, torch.Generator().manual_seed(0))
    assert starts.shape == lengths.shape == (2000, spans)
    longest = length // (2 * spans)
    assert int(lengths.min()) >= minimum and int(lengths.max()) <= longest
    assert int(starts.min()) >= 0 and int((starts + lengths).max()) <= length
    assert torch.all(starts[:, 1:] >= starts[:, :-1] + lengths[:, :-1])  # in order, never overlapping
    mask = T.spans_to_mask(starts, lengths, length)
    assert torch.equal(mask.sum(dim=1), lengths.sum(dim=1))
    # The geometric law with the configured mean, clamped to [min, longest]: compare to its exact mean.
    p = 1.0 / mean
    support = torch.arange(1, 20 * int(mean) + 50, dtype=torch.float64)
    probabilities = p * (1 - p) ** (support - 1)
    expected = (support.clamp(minimum, longest) * probabilities).sum().item()
    assert lengths.double().mean().item() == pytest.approx(expected, rel=0.05)


def test_span_head_regresses_targets_at_masked_positions_only(tiny_dataset):
    hp = tiny_hyperparameters(tiny_dataset, JEPA_MODE="span", ANTI_COLLAPSE="none")
    head = T.JepaHead(hp)
    context, target = torch.randn(2, 32, hp.model_dim), torch.randn(2, 32, hp.model_dim)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[0, 3:7] = mask[1, 10:20] = True
    loss, _ = head(context, target, mask)
    changed_target = target.clone()
    changed_target[~mask] = torch.randn_like(changed_target[~mask])  # unmasked targets do not matter
    assert torch.equal(head(context, changed_target, mask)[0], loss)
    z_context = head.context_projection(T.rms_norm(context))[mask]
    z_target = head.target_projection(T.rms_norm(target))[mask]
    assert torch.allclose(loss, T.F.mse_loss(head.predictors[0](z_context), z_target))


@pytest.mark.parametrize("anti_collapse, side", [("vicreg", "pred"), ("vicreg", "target"), ("sigreg", "pred")])
def test_span_weighted_losses_equal_those_of_the_masked_rows_alone(tiny_dataset, anti_collapse, side):
    # Span mode scores masked positions through 0/1 row weights (fixed shapes for compile); every
    # term must equal the same computation on the masked rows selected by indexing.
    hp = tiny_hyperparameters(tiny_dataset, JEPA_MODE="span", ANTI_COLLAPSE=anti_collapse, VICREG_ON=side)
    head = T.JepaHead(hp)
    torch.nn.init.normal_(head.predictors[0].contract.weight, std=0.05)  # not the identity
    context, target = torch.randn(3, 40, hp.model_dim), torch.randn(3, 40, hp.model_dim)
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[0, 2:9] = mask[1, 20:31] = mask[2, 0:5] = mask[2, 33:40] = True
    directions = T.F.normalize(torch.randn(hp.d_latent, 16, generator=torch.Generator().manual_seed(3)), dim=0)
    prediction_loss, regulariser_loss = head(context, target, mask, directions)
    diagnostics = head.diagnostics(context, target, mask, directions)

    predicted = head.predictors[0](head.context_projection(T.rms_norm(context))[mask])
    z_target = head.target_projection(T.rms_norm(target))[mask]
    regularised, other = (predicted, z_target) if side == "pred" else (z_target, predicted)

    def regulariser(z: torch.Tensor) -> torch.Tensor:
        if anti_collapse == "sigreg":
            return hp.sigreg_weight * T.sigreg_loss(z, directions)
        variance, covariance = T.vicreg_terms(z)
        return hp.vicreg_var_weight * variance + hp.vicreg_cov_weight * covariance

    expected = torch.stack([
        T.F.mse_loss(predicted, z_target), regulariser(regularised), regulariser(other),
        predicted.std(dim=0).mean(), predicted.std(dim=0).min(), z_target.std(dim=0).mean(), z_target.std(dim=0).min(),
    ])
    assert torch.allclose(prediction_loss, expected[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(regulariser_loss, expected[1], rtol=1e-4, atol=1e-6)
    # The log-step diagnostics (the other side's regulariser, both sides' stds) on the same rows.
    got = [diagnostics[name] for name in ("reg_other", "pred_std_mean", "pred_std_min", "tgt_std_mean", "tgt_std_min")]
    assert got == pytest.approx(expected[2:].tolist(), rel=1e-4, abs=1e-6)


def test_vicreg_on_defaults_to_pred_in_span_mode(tiny_dataset):
    assert tiny_hyperparameters(tiny_dataset, JEPA_MODE="span").regularised_side == "pred"
    assert tiny_hyperparameters(tiny_dataset, JEPA_MODE="next").regularised_side == "target"
    assert tiny_hyperparameters(tiny_dataset, JEPA_MODE="span", VICREG_ON="target").regularised_side == "target"


# ---------------------------------------------------------------------------
# Chunk mode
# ---------------------------------------------------------------------------


def test_chunk_targets_equal_the_explicit_mean(tiny_dataset):
    hp = tiny_hyperparameters(tiny_dataset, JEPA_MODE="chunk", JEPA_CHUNK=5, ANTI_COLLAPSE="none")
    head = T.JepaHead(hp)
    context, target = torch.randn(2, 40, hp.model_dim), torch.randn(2, 40, hp.model_dim)
    loss, _ = head(context, target)
    z_context = head.context_projection(T.rms_norm(context))
    z_target = head.target_projection(T.rms_norm(target))
    explicit = torch.stack([z_target[:, t + 1:t + 6].mean(dim=1) for t in range(40 - 5)], dim=1)
    expected = T.F.mse_loss(head.predictors[0](z_context[:, :35]), explicit)
    assert torch.allclose(loss, expected, atol=1e-6)


# ---------------------------------------------------------------------------
# Curriculum and localisation
# ---------------------------------------------------------------------------


def block_gradient_norms(trainer: T.Trainer) -> list[float]:
    return [sum(float(p.grad.abs().sum()) if p.grad is not None else 0.0 for p in block.parameters())
            for block in trainer.model.blocks]


def test_curriculum_has_no_ce_gradient_in_its_first_stage(tiny_dataset):
    trainer = make_trainer(tiny_dataset, JEPA_ONLY_FRACTION=0.5, ITERATIONS=10, JEPA_LAYER=1)
    schedule = trainer.schedule
    assert [schedule.ce_weight(step, 0.0) for step in (0, 4, 5, 9)] == [0.0, 0.0, 1.0, 1.0]
    inputs, targets = trainer.loader.next_batch(trainer.local_batch_tokens, trainer.hp.train_seq_len)
    for step, expect_ce_gradient in ((2, False), (7, True)):
        trainer.micro_step_losses(inputs, targets, schedule.ce_weight(step, 0.0), 0.5).total.backward()
        norms = block_gradient_norms(trainer)
        # Blocks 2 and 3 lie after JEPA_LAYER=1: only the CE loss can reach them.
        assert (norms[2] > 0 and norms[3] > 0) == expect_ce_gradient, norms
        assert norms[0] > 0 and norms[1] > 0  # the JEPA loss trains blocks 0..1 in both stages
        trainer.model.zero_grad(set_to_none=True)
        trainer.head.zero_grad(set_to_none=True)


def test_curriculum_stage_change_is_logged(tmp_path, tiny_dataset):
    result = run_trainer(tmp_path, tiny_dataset, RUN_ID="curriculum", ITERATIONS=6, JEPA_ONLY_FRACTION=0.5)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "curriculum: step 3: CE weight 0 -> 1 (JEPA_ONLY_FRACTION=0.5)" in result.stdout
    assert " ce_w:0 " in result.stdout and " ce_w:1 " in result.stdout


@pytest.mark.parametrize("grad_layers, reached", [(2, [False, False, True, True]), (1, [False, False, False, True]),
                                                  (0, [True, True, True, True])])
def test_jepa_grad_layers_limits_where_the_jepa_loss_reaches(tiny_dataset, grad_layers, reached):
    trainer = make_trainer(tiny_dataset, JEPA_GRAD_LAYERS=grad_layers, TARGET_EMA_DECAY=0)
    inputs, targets = trainer.loader.next_batch(trainer.local_batch_tokens, trainer.hp.train_seq_len)
    trainer.micro_step_losses(inputs, targets, ce_weight=0.0, jepa_weight=1.0).total.backward()
    assert [norm > 0 for norm in block_gradient_norms(trainer)] == reached
    embedding_gradient = trainer.model.token_embedding.weight.grad
    assert (embedding_gradient.abs().sum() > 0) == (grad_layers == 0)
    assert trainer.head.context_projection.weight.grad.abs().sum() > 0


def test_jepa_layer_picks_the_block_that_feeds_the_projections(tiny_dataset):
    hp = tiny_hyperparameters(tiny_dataset, JEPA_LAYER=-3)
    assert hp.jepa_layer_index == 1
    model = perturbed_model(hp)
    tokens = torch.randint(0, hp.vocab_size, (1, 16))
    captured = []
    model.blocks[1].register_forward_hook(lambda module, args, output: captured.append(output))
    _, features = model(tokens, feature_layer=hp.jepa_layer_index)
    assert torch.equal(features, captured[0])


# ---------------------------------------------------------------------------
# Every mode trains
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["next", "span", "chunk"])
@pytest.mark.parametrize("decay", [0.0, 0.99])
def test_every_mode_trains_with_falling_loss_and_moving_predictor(tiny_dataset, mode, decay):
    extra = {"JEPA_OFFSETS": "1,2"} if mode == "next" else {}
    anti_collapse = "sigreg" if decay == 0.0 and mode == "chunk" else "vicreg"
    trainer = make_trainer(tiny_dataset, JEPA_MODE=mode, TARGET_EMA_DECAY=decay, JEPA_WEIGHT=0.5,
                           ANTI_COLLAPSE=anti_collapse, **extra)
    predictor_before = [p.detach().clone() for p in trainer.head.predictors.parameters()]
    losses = []
    for step in range(8):
        trainer.step(step, lambda: 0.0)
        metrics = trainer.read_metrics()
        assert all(math.isfinite(value) for value in metrics.values()), metrics
        losses.append(metrics["train_loss"])
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.5, losses
    assert all(not torch.equal(a, b) for a, b in zip(trainer.head.predictors.parameters(), predictor_before))
    if mode == "span":
        assert trainer.head.mask_embedding.abs().sum() > 0  # the mask embedding trains too


# ---------------------------------------------------------------------------
# Anti-collapse
# ---------------------------------------------------------------------------


def test_sigreg_is_small_for_standard_normal_latents_and_large_for_collapsed_ones():
    generator = torch.Generator().manual_seed(0)
    directions = T.F.normalize(torch.randn(32, 64, generator=generator), dim=0)
    normal = T.sigreg_loss(torch.randn(4096, 32, generator=generator), directions)
    shrunk = T.sigreg_loss(0.1 * torch.randn(4096, 32, generator=generator), directions)
    constant = T.sigreg_loss(torch.zeros(4096, 32), directions)
    shifted = T.sigreg_loss(torch.randn(4096, 32, generator=generator) + 2.0, directions)
    assert normal < 0.01 and shrunk > 20 * normal and constant > 20 * normal and shifted > 20 * normal


@pytest.mark.parametrize("anti_collapse, collapses", [("none", True), ("vicreg", False), ("sigreg", False)])
def test_collapse_is_detected_without_anti_collapse_and_prevented_with_it(tmp_path, tiny_dataset,
                                                                          anti_collapse, collapses):
    result = run_trainer(tmp_path, tiny_dataset, RUN_ID="collapse", ITERATIONS=30, TRAIN_LOG_EVERY=5,
                         TARGET_EMA_DECAY=0, JEPA_WEIGHT=1.0, ANTI_COLLAPSE=anti_collapse, SIGREG_WEIGHT=1.0,
                         COLLAPSE_STD_FLOOR=0.15)
    assert result.returncode == 0, result.stderr[-2000:]
    history = json.loads((tmp_path / "logs" / "collapse.json").read_text())["train_history"]
    lowest = min(entry["tgt_std_mean"] for entry in history)
    assert ("warning: latent collapse" in result.stdout) == collapses
    assert (lowest < 0.15) == collapses, lowest
