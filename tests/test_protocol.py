"""A JEPA run pays only for JEPA (the comparison protocol's trainer side): the step computes its
losses and nothing else, the diagnostics come on log steps from the last micro-batch, the
backbone is clipped exactly as in its vanilla control, and compile priming covers every path."""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.utils import counters

import train_gpt_jepa as T
from conftest import cpu_runtime, tiny_hyperparameters
from test_trainer import make_trainer


def backbone_gradients(trainer: T.Trainer) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in trainer.model.parameters()]


def test_backbone_is_clipped_by_its_own_norm_as_in_the_vanilla_run(tiny_dataset):
    vanilla = make_trainer(tiny_dataset, JEPA_WEIGHT=0, GRAD_CLIP_NORM=0.3)
    jepa = make_trainer(tiny_dataset, JEPA_WEIGHT=0.5, GRAD_CLIP_NORM=0.3, TARGET_EMA_DECAY=0.9)
    inputs, targets = vanilla.loader.next_batch(vanilla.local_batch_tokens, vanilla.hp.train_seq_len)
    vanilla.micro_step_losses(inputs, targets, ce_weight=1.0, jepa_weight=0.0).total.backward()
    jepa.micro_step_losses(inputs, targets, ce_weight=1.0, jepa_weight=0.5).total.backward()
    # The same backbone gradient in both runs (the vanilla one), beside a JEPA head whose gradient
    # is far larger: one global norm would scale the JEPA run's backbone much further down.
    unclipped = backbone_gradients(vanilla)
    for param, gradient in zip(jepa.model.parameters(), unclipped):
        param.grad = gradient.clone()
    for param in jepa.head.parameters():
        if param.grad is not None:
            param.grad.mul_(100.0)
    backbone_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in unclipped])).item()
    assert backbone_norm > 0.3  # the clip binds, so a wrong coefficient would show

    vanilla.clip_gradients()
    jepa.clip_gradients()
    for name, got, want in zip([n for n, _ in jepa.model.named_parameters()], backbone_gradients(jepa),
                               backbone_gradients(vanilla)):
        assert torch.equal(got, want), name
    coefficient = backbone_gradients(vanilla)[0].norm() / unclipped[0].norm()
    assert coefficient.item() == pytest.approx(0.3 / backbone_norm, rel=1e-4)
    head_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in jepa.head.parameters()
                                                      if p.grad is not None])).item()
    assert head_norm == pytest.approx(0.3, rel=1e-4)  # the head is clipped too, on its own


def test_a_jepa_step_computes_no_diagnostics(tiny_dataset, monkeypatch):
    trainer = make_trainer(tiny_dataset, TARGET_EMA_DECAY=0.9)

    def forbidden(*args, **kwargs):
        raise AssertionError("a diagnostic was computed inside the training step")

    monkeypatch.setattr(T, "effective_rank", forbidden)
    monkeypatch.setattr(T.JepaHead, "_latent_std", staticmethod(forbidden))
    monkeypatch.setattr(T.JepaHead, "diagnostics", forbidden)
    calls: list[str] = []
    original = T.JepaHead._regulariser
    monkeypatch.setattr(T.JepaHead, "_regulariser", lambda self, *a: calls.append("reg") or original(self, *a))
    rows: list[int] = []
    original_rows = T.JepaHead._rows
    monkeypatch.setattr(T.JepaHead, "_rows", staticmethod(lambda latents: rows.append(1) or original_rows(latents)))
    outcome = trainer.step(0, lambda: 0.0, jepa_weight=0.5)
    assert outcome.jepa_weight == 0.5
    # The regularised side only, once per micro-step: the other side is never even assembled.
    assert calls == ["reg"] * trainer.grad_accum_steps and len(rows) == trainer.grad_accum_steps
    metrics = trainer.read_metrics()
    assert set(metrics) == {"train_loss", "total_loss", "jepa_loss", "reg_loss"}
    # Without an anti-collapse term there is no side to assemble at all.
    calls.clear(), rows.clear()
    make_trainer(tiny_dataset, ANTI_COLLAPSE="none").step(0, lambda: 0.0, jepa_weight=0.5)
    assert calls == [] and rows == []


@pytest.mark.parametrize("overrides", [
    {"TARGET_EMA_DECAY": 0.9, "JEPA_TARGET_FRACTION": 0.5},
    {"TARGET_EMA_DECAY": 0.0, "JEPA_OFFSETS": "1,2", "VICREG_ON": "pred"},
])
def test_log_step_diagnostics_equal_the_old_in_step_computation(tiny_dataset, overrides):
    trainer = make_trainer(tiny_dataset, **overrides)
    for step in range(2):
        trainer.step(step, lambda: 0.0, jepa_weight=0.5)
    diagnostics = trainer.jepa_diagnostics()

    # What the step used to compute for its last micro-batch, written out for the same batch and weights.
    hp, head = trainer.hp, trainer.head
    inputs = trainer.last_jepa_batch[0][: trainer.jepa_rows(trainer.last_jepa_batch[0])]
    assert inputs.size(0) == (4 if hp.jepa_target_fraction == 0.5 else 8)
    layer = hp.jepa_layer_index
    with torch.no_grad():
        _, context = trainer.model(inputs, feature_layer=layer)
        encoder = trainer.target_encoder if trainer.target_encoder is not None else trainer.model
        _, target = encoder(inputs, feature_layer=layer, last_layer=layer)
        z_context = head.context_projection(T.rms_norm(context))
        z_target = head.target_projection(T.rms_norm(target)).reshape(-1, hp.d_latent)
        length = inputs.size(1)
        predicted = torch.cat([predictor(z_context[:, :length - k]).reshape(-1, hp.d_latent)
                               for k, predictor in zip(head.offsets, head.predictors)])
        other = predicted if head.regularised_side == "target" else z_target
        variance, covariance = T.vicreg_terms(other)
        singular = torch.linalg.svdvals(z_target - z_target.mean(dim=0))
        share = singular / singular.sum()
    expected = {
        "reg_other": (hp.vicreg_var_weight * variance + hp.vicreg_cov_weight * covariance).item(),
        "pred_std_mean": predicted.std(dim=0).mean().item(), "pred_std_min": predicted.std(dim=0).min().item(),
        "tgt_std_mean": z_target.std(dim=0).mean().item(), "tgt_std_min": z_target.std(dim=0).min().item(),
        "tgt_rank": math.exp(-(share * share.log()).sum().item()),
    }
    assert diagnostics == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_training_log_lines_carry_the_diagnostics(tmp_path, tiny_dataset):
    from test_trainer import run_trainer

    result = run_trainer(tmp_path, tiny_dataset, RUN_ID="diag", ITERATIONS=3, TARGET_EMA_DECAY=0.9)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step:") and "train_loss" in line]
    assert len(lines) == 3
    for name in ("jepa_loss:", "reg_loss:", "reg_other:", "pred_std:", "tgt_std:", "tgt_rank:", "jepa_w:"):
        assert all(name in line for line in lines), name


def test_priming_compiles_every_path_and_nothing_compiles_after_training_starts(tiny_dataset):
    # JEPA_WARMUP_STEPS=100: training's step 0 has JEPA weight 0 (the vanilla graph) and the next
    # steps take the JEPA graph. WARMUP_STEPS=1 alone would see only one of them; priming forces both.
    hp = tiny_hyperparameters(tiny_dataset, COMPILE=1, COMPUTE_DTYPE="bfloat16", WARMUP_STEPS=1,
                              JEPA_WARMUP_STEPS=100, TARGET_EMA_DECAY=0.9, NUM_LAYERS=2, XSA_LAST_N=1,
                              TRAIN_BATCH_TOKENS=1024, QAT_START_FRACTION=0)  # QAT phases: test_record_stack
    grad_accum_steps = T.validate_hyperparameters(hp, world_size=1)
    torch._dynamo.reset()
    trainer = T.Trainer(hp, cpu_runtime(compile=True, autocast_dtype=torch.bfloat16), grad_accum_steps,
                        T.find_shards(hp.data_path, "train"), T.RunLogger(None))
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    counters.clear()
    assert T.prime_and_undo(trainer) == 2  # one JEPA step and one vanilla step, though WARMUP_STEPS=1
    primed_graphs = counters["stats"]["unique_graphs"]
    assert primed_graphs > 0  # the counter sees compilation at all
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), initial))  # undone
    weights = []
    for step in range(3):
        weights.append(trainer.step(step, lambda: 0.0).jepa_weight)
        if step == 1:
            trainer.jepa_diagnostics()  # a log step's diagnostics run the plain modules
    assert weights[0] == 0.0 and weights[1] > 0.0
    assert counters["stats"]["unique_graphs"] == primed_graphs, dict(counters["stats"])
    torch._dynamo.reset()
