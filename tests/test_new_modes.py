"""JEPA_MODE=nextlat (NextLat, arXiv 2511.05963) and JEPA_MODE=stp (Semantic Tube Prediction,
arXiv 2602.22617): causality and teacher forcing, document boundaries, the frozen head, the
seeded triples, learning, the gradient into the backbone, settings, and the compiled bf16 and
two-process paths (GUIDE sections 5 and 9)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import train_gpt_jepa as T
from conftest import tiny_hyperparameters
from test_gpu_path import COMPILE_START, TINY_COMPILED, run_merged
from test_trainer import assert_causal, make_trainer, run_trainer
from test_variants import block_gradient_norms, perturbed_model

BOS = 1


def tokens_without_bos(generator: torch.Generator, shape: tuple[int, int], vocab_size: int) -> torch.Tensor:
    return torch.randint(2, vocab_size, shape, generator=generator)


def nextlat_head(hp: T.Hyperparameters, seed: int = 0) -> T.JepaHead:
    """A NextLat head whose transition output layer is not zero (at init the prediction is h[t]
    itself, which would hide whether the next token is read at all)."""
    torch.manual_seed(seed)
    head = T.JepaHead(hp)
    with torch.no_grad():
        head.transition.fc_out.weight.normal_(std=0.05)
    return head


# ---------------------------------------------------------------------------
# Short trainings, shared by the tests below (one per mode)
# ---------------------------------------------------------------------------

LEARN_STEPS = 30
# stp's loss moves slowly at the paper's weights (0.005-0.04): a strong weight and more triples
# show within 30 steps that the gradient straightens the trajectories.
LEARN_SETTINGS = {
    "nextlat": dict(JEPA_MODE="nextlat", JEPA_WEIGHT=0.5, NEXTLAT_ROLLOUT=2),
    "stp": dict(JEPA_MODE="stp", JEPA_WEIGHT=2.0, STP_TRIPLES=64),
}


@pytest.fixture(scope="module")
def trained(tiny_dataset) -> dict[str, dict]:
    """Each mode trained LEARN_STEPS steps in-process from the same seed: the trainer, the JEPA
    loss of every step and the transition model's initial weights."""
    runs = {}
    for mode, settings in LEARN_SETTINGS.items():
        trainer = make_trainer(tiny_dataset, ITERATIONS=LEARN_STEPS, **settings)
        initial = {name: p.detach().clone() for name, p in trainer.head.named_parameters()}
        jepa_losses = []
        for step in range(LEARN_STEPS):
            trainer.step(step, lambda: 0.0)
            metrics = trainer.read_metrics()
            assert all(math.isfinite(value) for value in metrics.values()), metrics
            jepa_losses.append(metrics["jepa_loss"])
        runs[mode] = {"trainer": trainer, "jepa_losses": jepa_losses, "initial": initial}
    return runs


@pytest.mark.parametrize("mode", ["nextlat", "stp"])
def test_each_mode_learns_its_objective(trained, mode):
    run = trained[mode]
    losses = run["jepa_losses"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    if mode == "nextlat":
        # The backbone moves fast at first (the KL against a moving head rises), then the
        # transition model catches up: well below even the identity transition of step 0.
        assert last < losses[0] and last < first / 3, losses
        head = run["trainer"].head
        assert not torch.any(run["initial"]["transition.fc_out.weight"])  # zero-initialised ...
        moved = [name for name, p in head.named_parameters() if not torch.equal(p, run["initial"][name])]
        assert sorted(moved) == sorted(run["initial"]), moved  # ... and every transition weight trains
    else:
        assert last < first - 0.2, losses  # 1 - cos falls: the trajectories straighten
        assert list(run["trainer"].head.parameters()) == []  # no predictor, nothing else trained


@pytest.mark.parametrize("mode", ["nextlat", "stp"])
def test_the_mode_leaves_the_backbone_forward_causal_and_unchanged(trained, mode):
    """The CE the trainer optimises is the plain backbone's, and the logits at t depend on no token
    after t, with weights trained under the mode."""
    trainer = trained[mode]["trainer"]
    assert_causal(trainer.model, trainer.hp.vocab_size)
    inputs, targets = trainer.loader.next_batch(trainer.local_batch_tokens, trainer.hp.train_seq_len)
    terms = trainer.micro_step_losses(inputs, targets, ce_weight=1.0, jepa_weight=0.5)
    with torch.no_grad():
        plain_ce, _ = trainer.model(inputs, targets)
    assert torch.allclose(terms.ce.detach(), plain_ce, atol=1e-6, rtol=0)
    assert torch.allclose(terms.total.detach(), terms.ce.detach() + 0.5 * terms.prediction.detach(), atol=1e-6)


# ---------------------------------------------------------------------------
# NextLat
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rollout", [1, 2])
def test_nextlat_prediction_reads_the_next_token_and_nothing_later(tiny_dataset, rollout):
    hp = tiny_hyperparameters(tiny_dataset, JEPA_MODE="nextlat", NEXTLAT_ROLLOUT=rollout)
    model, head = perturbed_model(hp), nextlat_head(hp)
    generator = torch.Generator().manual_seed(0)
    tokens = tokens_without_bos(generator, (2, 48), hp.vocab_size)
    cut = 30

    def predictions(ids: torch.Tensor) -> torch.Tensor:  # the deepest rollout step: (B, T - rollout, D)
        with torch.no_grad():
            hidden = T.rms_norm(model(ids, feature_layer=hp.num_layers - 1)[1])
            return head.nextlat_rollout(hidden, ids, model.token_embedding.weight)[-1][0]

    later = tokens.clone()
    later[:, cut + rollout + 1:] = tokens_without_bos(generator, (2, 48 - cut - rollout - 1), hp.vocab_size)
    teacher = tokens.clone()
    teacher[:, cut + rollout] = (tokens[:, cut + rollout] + 7) % (hp.vocab_size - 2) + 2  # x[t+k] for t = cut
    original = predictions(tokens)
    # h_hat[t+k] from t reads x[t+1..t+k]: tokens after t+k change nothing up to t = cut ...
    assert torch.equal(original[:, :cut + 1], predictions(later)[:, :cut + 1])
    # ... while the teacher-forced token x[t+k] is read (and nothing before t sees it).
    changed = predictions(teacher)
    assert not torch.allclose(original[:, cut], changed[:, cut], atol=1e-4)
    assert torch.equal(original[:, :cut], changed[:, :cut])


@pytest.mark.parametrize("rollout", [1, 2])
def test_nextlat_pairs_across_a_document_start_contribute_nothing(tiny_dataset, rollout):
    """The states just before a BOS get no gradient (their only transitions cross into the next
    document), and the loss equals its definition over the pairs that stay inside a document,
    written out pair by pair: the previous document's last state cannot reach the loss through a
    transition into the next one."""
    hp = tiny_hyperparameters(tiny_dataset, JEPA_MODE="nextlat", NEXTLAT_ROLLOUT=rollout)
    head = nextlat_head(hp)
    generator = torch.Generator().manual_seed(1)
    tokens = tokens_without_bos(generator, (2, 24), hp.vocab_size)
    tokens[0, [9, 17]] = BOS
    tokens[1, [0, 5]] = BOS
    features = torch.randn(2, 24, hp.model_dim, generator=generator, requires_grad=True)
    table = torch.randn(hp.vocab_size, hp.model_dim, generator=generator) * 0.05
    loss, regulariser = head(features, features.detach(), input_ids=tokens, embedding_weight=table)
    loss.backward()
    assert regulariser == 0
    reached = features.grad.abs().sum(dim=-1) > 0  # (B, T)
    before_bos = torch.zeros_like(reached)
    before_bos[:, :-1] = tokens[:, 1:] == BOS
    before_bos[:, -1] = True  # the last position has no successor in the row
    assert not reached[before_bos].any()
    assert reached[~before_bos].all()

    # The loss, pair by pair: h_hat rolled forward k steps from t, kept only when x[t+1..t+k] has no BOS.
    with torch.no_grad():
        hidden = T.rms_norm(features)
        embedded = T.rms_norm(torch.nn.functional.embedding(tokens, table))
        smooth_l1_terms, kl_terms = [], []
        for depth in range(1, rollout + 1):
            smooth_l1, kl = [], []
            for row in range(2):
                for t in range(24 - depth):
                    if (tokens[row, t + 1:t + depth + 1] == BOS).any():
                        continue
                    state = hidden[row, t]
                    for step in range(1, depth + 1):
                        state = head.transition(state[None], embedded[row, t + step][None])[0]
                    target = hidden[row, t + depth]
                    smooth_l1.append(torch.nn.functional.smooth_l1_loss(state, target))
                    log_q = torch.log_softmax(T.frozen_head_logits(state, table, hp.logit_softcap), -1)
                    log_p = torch.log_softmax(T.frozen_head_logits(target, table, hp.logit_softcap), -1)
                    kl.append((log_p.exp() * (log_p - log_q)).sum())
            smooth_l1_terms.append(torch.stack(smooth_l1).mean())
            kl_terms.append(torch.stack(kl).mean())
        expected = (sum(smooth_l1_terms) + sum(kl_terms)) / rollout  # both weights 1, as in the paper
    assert torch.allclose(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_nextlat_kl_never_trains_the_head_and_e_is_read_detached(tiny_dataset):
    """The tied table is both e(x) and the output head: nothing of the NextLat loss reaches it
    directly (the backbone still trains it through h, as an input embedding)."""
    hp = tiny_hyperparameters(tiny_dataset, JEPA_MODE="nextlat", NEXTLAT_ROLLOUT=2)
    head = nextlat_head(hp)
    generator = torch.Generator().manual_seed(2)
    tokens = tokens_without_bos(generator, (2, 16), hp.vocab_size)
    table = torch.nn.Parameter(torch.randn(hp.vocab_size, hp.model_dim, generator=generator) * 0.05)
    features = torch.randn(2, 16, hp.model_dim, generator=generator, requires_grad=True)
    loss, _ = head(features, features.detach(), input_ids=tokens, embedding_weight=table)
    loss.backward()
    assert table.grad is None
    assert features.grad.abs().sum() > 0 and head.transition.fc_in.weight.grad.abs().sum() > 0
    # The KL alone also reaches h[t] (the backbone), with the head frozen.
    only_kl = T.JepaHead(tiny_hyperparameters(tiny_dataset, JEPA_MODE="nextlat", NEXTLAT_SMOOTH_L1_WEIGHT=0))
    only_kl.load_state_dict(head.state_dict())
    features.grad = None
    only_kl(features, features.detach(), input_ids=tokens, embedding_weight=table)[0].backward()
    assert features.grad.abs().sum() > 0 and table.grad is None


# ---------------------------------------------------------------------------
# STP
# ---------------------------------------------------------------------------


def several_documents(vocab_size: int) -> torch.Tensor:
    """Rows with documents of every awkward length: 1 and 2 positions (no triple fits), a row
    that starts mid-document, one that starts with a BOS, one without any BOS."""
    generator = torch.Generator().manual_seed(3)
    tokens = tokens_without_bos(generator, (4, 40), vocab_size)
    tokens[0, [6, 7, 9, 25]] = BOS  # documents [0,6) [6,7) [7,9) [9,25) [25,40)
    tokens[1, [0, 3, 20]] = BOS
    tokens[2, [39]] = BOS
    return tokens


def test_stp_triples_stay_inside_one_document_in_order(tiny_dataset):
    tokens = several_documents(1024)
    draws = torch.rand(4, 4000, 4, generator=torch.Generator().manual_seed(4))
    triples, weights = T.sample_tube_triples(tokens, draws, BOS)
    assert triples.shape == (4, 4000, 3) and weights.shape == (4, 4000)
    s, r, t = triples.unbind(-1)
    valid = weights > 0
    assert ((0 <= s) & (s < r) & (r < t) & (t < 40))[valid].all()
    document = torch.cumsum(tokens == BOS, dim=1)  # document index of each position (a BOS opens one)
    assert torch.equal(document.gather(1, s)[valid], document.gather(1, t)[valid])  # no BOS in s+1..t
    # Anchors in documents of 1 or 2 positions give weight 0, every other anchor a triple.
    anchors = (draws[..., 0] * 40).long()
    short = torch.zeros(4, 40, dtype=torch.bool)
    short[0, 6:9] = True  # [6, 7) and [7, 9)
    short[2, 39] = True  # the row's last position opens a document
    assert torch.equal(~valid, short.gather(1, anchors))
    # Every position of a longer document is drawn, its first (a BOS) and its last included.
    covered = torch.zeros(4, 40, dtype=torch.bool)
    for row in range(4):
        covered[row, triples[row][valid[row]].reshape(-1)] = True
    assert torch.equal(covered, ~short)


def test_stp_loss_is_one_minus_the_cosine_of_consecutive_chords(tiny_dataset):
    hp = tiny_hyperparameters(tiny_dataset, JEPA_MODE="stp", STP_TRIPLES=8)
    head = T.JepaHead(hp)
    assert list(head.parameters()) == []
    tokens = several_documents(hp.vocab_size)
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(4, 40, hp.model_dim, generator=generator)
    draws = T.draw_tube_uniforms(4, hp, generator)
    loss, regulariser = head(features, features, input_ids=tokens, tube_draws=draws)
    triples, weights = T.sample_tube_triples(tokens, draws, BOS)
    hidden = T.rms_norm(features)
    terms = [1 - torch.nn.functional.cosine_similarity(hidden[b, t] - hidden[b, r], hidden[b, r] - hidden[b, s], dim=0)
             for b in range(4) for k, (s, r, t) in enumerate(triples[b].tolist()) if weights[b, k]]
    assert regulariser == 0 and len(terms) > 16
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)


def test_stp_draws_come_from_the_seeded_generator(tiny_dataset):
    """Arms with the same SEED draw the same triples (paired), a different SEED others, and the
    trainer's reset (compile priming undone) starts them over."""
    first, again, other = (make_trainer(tiny_dataset, JEPA_MODE="stp", SEED=seed) for seed in (7, 7, 8))
    draws = []
    for trainer in (first, again, other):
        inputs, targets = trainer.loader.next_batch(trainer.local_batch_tokens, trainer.hp.train_seq_len)
        trainer.micro_step_losses(inputs, targets, 1.0, 0.1)
        draws.append(trainer.last_tube_draws)
    assert draws[0].shape == (first.jepa_rows(inputs), first.hp.stp_triples, 4)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    first.reset_stream_state()
    inputs, targets = first.loader.next_batch(first.local_batch_tokens, first.hp.train_seq_len)
    first.micro_step_losses(inputs, targets, 1.0, 0.1)
    assert torch.equal(first.last_tube_draws, draws[0])


# ---------------------------------------------------------------------------
# Both modes in the trainer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["nextlat", "stp"])
def test_the_jepa_term_alone_reaches_every_block(tiny_dataset, mode):
    trainer = make_trainer(tiny_dataset, JEPA_MODE=mode)
    inputs, targets = trainer.loader.next_batch(trainer.local_batch_tokens, trainer.hp.train_seq_len)
    terms = trainer.micro_step_losses(inputs, targets, ce_weight=0.0, jepa_weight=1.0)
    terms.total.backward()
    assert all(norm > 0 for norm in block_gradient_norms(trainer)), block_gradient_norms(trainer)
    assert trainer.model.token_embedding.weight.grad.abs().sum() > 0  # through h, as an input embedding


@pytest.mark.parametrize("mode", ["nextlat", "stp"])
def test_parts_groups_target_encoder_and_artifact_keys(tiny_dataset, mode):
    # The tiny preset's TARGET_EMA_DECAY=0.99 is ignored: no EMA copy for these modes.
    trainer = make_trainer(tiny_dataset, JEPA_MODE=mode)
    assert trainer.hp.target_ema_decay > 0 and trainer.target_encoder is None
    grouped = [id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
    everything = list(trainer.model.parameters()) + list(trainer.head.parameters())
    assert sorted(grouped) == sorted(id(p) for p in everything)
    muon = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in muon for p in trainer.head.parameters() if p.ndim == 2)
    assert set(T.JEPA_MODULE_NAMES) >= {name for name, _ in trainer.head.named_children()}
    assert not any(name.split(".")[0] in T.JEPA_MODULE_NAMES for name in trainer.model.state_dict())
    if mode == "nextlat":
        assert [name for name, _ in trainer.head.named_children()] == ["transition"]
        assert trainer.head.transition.fc_in.weight.shape == (trainer.hp.model_dim, 2 * trainer.hp.model_dim)
    line = T.jepa_settings_line(trainer.hp)
    assert line.startswith(f"jepa_mode:{mode} ") and "ignored: TARGET_EMA_DECAY" in line


@pytest.mark.parametrize("overrides, expected", [
    ({"JEPA_MODE": "nextlat", "JEPA_OFFSETS": "1,2"}, "NEXTLAT_ROLLOUT"),
    ({"JEPA_MODE": "stp", "JEPA_OFFSETS": "2"}, "JEPA_OFFSETS='2'"),
    ({"JEPA_MODE": "nextlat", "JEPA_LAYER": "-2"}, "JEPA_LAYER=-2 with JEPA_MODE=nextlat"),
    ({"JEPA_MODE": "nextlat", "NEXTLAT_ROLLOUT": "3"}, "NEXTLAT_ROLLOUT=3 must be 1 or 2"),
    ({"JEPA_MODE": "nextlat", "NEXTLAT_SMOOTH_L1_WEIGHT": "0", "NEXTLAT_KL_WEIGHT": "0"}, "both 0"),
    ({"JEPA_MODE": "stp", "STP_TRIPLES": "0"}, "STP_TRIPLES=0"),
    ({"JEPA_MODE": "stp", "TTT": "1", "TTT_OBJECTIVE": "ce+jepa"}, "supports JEPA_MODE next and chunk, not stp"),
    ({"JEPA_MODE": "nextlat", "TTT": "1", "TTT_OBJECTIVE": "ce+jepa"}, "not nextlat"),
    ({"JEPA_MODE": "nxtlat"}, "nextlat, stp"),
])
def test_refused_settings_name_the_variable(tiny_dataset, overrides, expected):
    with pytest.raises(T.ConfigError, match=re.escape(expected)):
        T.validate_hyperparameters(tiny_hyperparameters(tiny_dataset, **overrides), world_size=1)


def test_a_typo_of_the_new_settings_is_caught():
    with pytest.raises(T.ConfigError, match="did you mean NEXTLAT_ROLLOUT"):
        T.check_unknown_env({"NEXTLAT_ROLOUT": "2"})
    with pytest.raises(T.ConfigError, match="did you mean STP_TRIPLES"):
        T.check_unknown_env({"STP_TRIPLE": "8"})


# ---------------------------------------------------------------------------
# Compiled bf16 runs and two processes (trainer subprocesses)
# ---------------------------------------------------------------------------

# nextlat: rollout 2 (two differently sliced transitions and KLs), JEPA_GRAD_LAYERS=1 (features
# recomputed from detached inputs) and JEPA_TARGET_FRACTION=0.5 (the tokens sliced with them);
# stp: the triple sampler (cummax/cummin, gathers, a sort) on an early JEPA_LAYER.
COMPILED_MODES = {
    "nextlat": dict(JEPA_MODE="nextlat", NEXTLAT_ROLLOUT=2, JEPA_GRAD_LAYERS=1, JEPA_TARGET_FRACTION=0.5),
    "stp": dict(JEPA_MODE="stp", JEPA_LAYER=0, STP_TRIPLES=8),
}


@pytest.mark.parametrize("mode", list(COMPILED_MODES))
def test_compiled_bf16_run_without_recompiling(tmp_path, tiny_dataset, mode):
    result = run_merged(tmp_path, tiny_dataset, timeout=480, RUN_ID="compiled", COMPILE=1, COMPUTE_DTYPE="bfloat16",
                        TORCH_LOGS="dynamo",
                        **TINY_COMPILED, **COMPILED_MODES[mode])
    output = result.stdout
    assert result.returncode == 0, output[-6000:]
    assert "compile:True" in output and "autocast:torch.bfloat16" in output
    lines = output.splitlines()
    warmup_line = next(i for i, line in enumerate(lines) if line.startswith("warmup:"))
    last_train_line = max(i for i, line in enumerate(lines) if re.match(r"step:\d+/\d+ train_loss:", line))
    assert any(COMPILE_START in line for line in lines[:warmup_line])
    assert not [line for line in lines[warmup_line:last_train_line] if COMPILE_START in line]
    history = json.loads((tmp_path / "logs" / "compiled.json").read_text())["train_history"]
    jepa = [entry["jepa_loss"] for entry in history]
    assert all(math.isfinite(value) and value > 0 for value in jepa) and len(set(jepa)) == len(jepa), jepa
    assert all(6.4 < entry["train_loss"] < 10 for entry in history)
    diagnostics = ("nextlat_smooth_l1", "nextlat_kl") if mode == "nextlat" else ("stp_cos", "stp_valid")
    assert all(math.isfinite(entry[name]) for entry in history for name in diagnostics)
    assert f" {diagnostics[0]}:" in output


def test_nextlat_two_processes_match_one_with_accumulation(tmp_path, tiny_dataset):
    """The transition model lives outside DDP like the predictors: its gradients are averaged by
    the head's own all-reduce, so 2 gloo processes step exactly as 1 process with 2 micro-steps."""
    common = dict(JEPA_MODE="nextlat", ITERATIONS=3, JEPA_WEIGHT=0.5, VAL_MAX_TOKENS=2048, NUM_LAYERS=2,
                  XSA_LAST_N=1)
    single = run_trainer(tmp_path / "single", tiny_dataset, RUN_ID="single", GRAD_ACCUM_STEPS=2, **common)
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_trainer(tmp_path / "double", tiny_dataset, nproc=2, RUN_ID="double", GRAD_ACCUM_STEPS=1, **common)
    assert double.returncode == 0, (double.stdout[-2000:], double.stderr[-3000:])
    one = json.loads((tmp_path / "single" / "logs" / "single.json").read_text())
    two = json.loads((tmp_path / "double" / "logs" / "double.json").read_text())
    for key in ("train_loss", "jepa_loss"):
        a = [entry[key] for entry in one["train_history"]]
        b = [entry[key] for entry in two["train_history"]]
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), key
    assert one["val_bpb"] == pytest.approx(two["val_bpb"], rel=1e-5)
