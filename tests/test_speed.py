"""The speed levers change nothing but speed: target fraction, skipped target forwards and the
foreach EMA compute what the plain formulas compute."""

from __future__ import annotations

import torch

import train_gpt_jepa as T
from test_trainer import make_trainer


def test_target_fraction_one_equals_the_full_computation_and_a_half_uses_the_first_rows(tiny_dataset):
    for fraction, rows in ((1.0, None), (0.5, 4)):
        trainer = make_trainer(tiny_dataset, TARGET_EMA_DECAY=0.9, JEPA_TARGET_FRACTION=fraction)
        inputs, targets = trainer.loader.next_batch(trainer.local_batch_tokens, trainer.hp.train_seq_len)
        assert inputs.size(0) == 8
        terms = trainer.micro_step_losses(inputs, targets, ce_weight=1.0, jepa_weight=1.0)
        layer = trainer.hp.jepa_layer_index
        used = inputs if rows is None else inputs[:rows]
        with torch.no_grad():
            _, target_features = trainer.target_encoder(used, feature_layer=layer, last_layer=layer)
        ce, context_features = trainer.model(inputs, targets, feature_layer=layer)
        prediction, regulariser = trainer.head(context_features[: used.size(0)], target_features)
        assert torch.equal(terms.ce, ce)  # CE always sees the whole micro-batch
        assert torch.allclose(terms.prediction, prediction, rtol=1e-6, atol=1e-7)
        assert torch.allclose(terms.regulariser, regulariser, rtol=1e-6, atol=1e-7)
        assert torch.allclose(terms.total, ce + prediction + regulariser, rtol=1e-6, atol=1e-6)


def test_foreach_ema_equals_the_per_tensor_formula():
    generator = torch.Generator().manual_seed(0)
    online = [torch.randn(shape, generator=generator) for shape in ((3, 4), (7,), (2, 5, 6))]
    ema = [torch.randn(tensor.shape, generator=generator) for tensor in online]
    expected = [0.99 * e + 0.01 * o for e, o in zip(ema, online)]
    T.ema_update(ema, online, decay=0.99)
    for got, want in zip(ema, expected):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_step_has_one_agreed_sync_and_schedules_use_the_agreed_time(tiny_dataset):
    """The elapsed time a step reports is the value of the clock at its sync point, and the next
    step's schedule reads exactly that value (identical on every rank by construction)."""
    trainer = make_trainer(tiny_dataset, MAX_WALLCLOCK_SECONDS=100, WARMDOWN_ITERS=1000, ITERATIONS=1000)
    readings = iter([30_000.0, 99_000.0])
    trainer.step(0, lambda: next(readings))
    assert trainer.agreed_elapsed_ms == 30_000.0
    outcome = trainer.step(1, lambda: next(readings))
    assert trainer.agreed_elapsed_ms == 99_000.0
    # The warmdown of step 1 uses 99 s of 100 s: time-based remaining fraction, far below 1.
    assert outcome.lr_multiplier < 0.05
