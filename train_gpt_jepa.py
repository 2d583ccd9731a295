"""
train_gpt_jepa.py: the whole JEPA workbench for OpenAI's Parameter Golf, in one file.

Everything a run needs lives here, in the order a run uses it: the settings (environment
variables, presets, validation), the runtime (device, processes, logging), the challenge's shard
loader and bits-per-byte tables, the GPT backbone (GQA, partial RoPE, U-Net skips, BigramHash,
SmearGate, XSA), the JEPA parts (projections, predictors, EMA target encoder, VICReg / SIGReg),
the Muon and AdamW optimizers, the GPTQ / int6 exporter with its compressors, evaluation with
score-first test-time training, the training loop, and main(), the recipe that runs them. The
file's own bytes count toward the 16,000,000-byte artifact.

    torchrun --standalone --nproc_per_node=8 train_gpt_jepa.py    # 8 GPUs
    python3 train_gpt_jepa.py                                     # one GPU, or the CPU
    PRESET=tiny JEPA_WEIGHT=0 python3 train_gpt_jepa.py           # CPU smoke run, vanilla

JEPA_WEIGHT=0 is the exact vanilla baseline: no JEPA module is built, no target forward runs,
and the step function, compilation and batch are the same as in a JEPA run.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import gc
import glob
import hashlib
import importlib
import json
import lzma
import math
import os
import signal
import struct
import subprocess
import sys
import time
import traceback
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, NamedTuple

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


# How a run stops early: main() prints each as one line on stderr and exits with its status.
class ConfigError(Exception):
    """A bad setting or input; main() prints it as one line and exits with status 2."""


class RunFailure(Exception):
    """The run cannot go on; main() prints one line and exits with status 1."""


class RunInterrupted(Exception):
    """SIGTERM/SIGINT: a checkpoint was written; main() exits with status 75 (temporary failure)."""


# =============================================================================
# SETTINGS: hyperparameters from environment variables, presets, validation
# =============================================================================
# Every field is read from the environment variable of the same name in upper case
# (jepa_weight <- JEPA_WEIGHT). PRESET picks a set of defaults; a variable set explicitly wins.
# The class defaults are the 11-layer record configuration. A setting that takes one of a few
# values declares them once, in CHOICES after the class: validation accepts exactly those, and
# the settings table (scripts/env_table.py, docs/settings.md) lists them with what each means.


@dataclass(frozen=True)
class Hyperparameters:
    # ---- run and data ----
    preset: str = "11L"  # the set of defaults a run starts from (PRESETS; a variable set explicitly wins)
    data_path: str = "./data/datasets/fineweb10B_sp1024"  # folder of fineweb_{train,val}_*.bin
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"  # SentencePiece model
    run_id: str = ""  # names logs/<RUN_ID>.txt and .json; empty = date, time and a random suffix
    seed: int = 1337  # seeds the weights, span masks and SIGReg directions
    log_dir: str = "logs"  # where <RUN_ID>.txt (full log) and <RUN_ID>.json (summary) go

    # ---- training length and batch ----
    iterations: int = 20000  # optimizer steps; an upper bound when the wall-clock cap stops first
    max_wallclock_seconds: float = 600.0  # training-time cap (eval and export not counted); 0 = none
    warmdown_iters: int = 3500  # LR falls linearly to 0 over the last this-many steps (or their time)
    lr_warmup_steps: int = 0  # linear LR warmup from 0 over the first steps
    warmup_steps: int = 20  # compile-priming steps, undone before step 0; JEPA runs prime JEPA and vanilla steps
    train_batch_tokens: int = 786_432  # tokens per optimizer step over all ranks and micro-steps
    train_seq_len: int = 2048  # tokens per training sequence (and per evaluation window)
    grad_accum_steps: int = 0  # micro-steps per optimizer step; 0 = 8 // WORLD_SIZE as in parameter-golf
    train_max_tokens: int = 0  # data-limited training: loop over the first N training tokens (shards in order); 0 = all

    # ---- evaluation and logging ----
    val_loss_every: int = 1000  # validate every this-many steps; 0 = only at the end
    val_batch_size: int = 524_288  # tokens per validation batch over all ranks
    val_max_tokens: int = 0  # cap on validation tokens (smoke runs); 0 = the whole split
    eval_stride: int = 64  # stride of the final sliding-window evaluation; 0 = off
    train_log_every: int = 200  # a train line every this-many steps (and the first 5)
    eval_only: bool = False  # evaluate ARTIFACT_PATH in a fresh process, train nothing

    # ---- device ----
    compile: int = -1  # torch.compile
    compute_dtype: str = "auto"  # autocast dtype
    model_dtype: str = "auto"  # embedding tables' dtype (linears and control tensors stay fp32)
    tf32: bool = True  # CUDA: TF32 for the fp32 matmuls left under autocast, as the records set it

    # ---- model shape ----
    vocab_size: int = 1024  # must equal the tokenizer's piece count
    num_layers: int = 11  # transformer blocks
    model_dim: int = 512  # residual stream width
    num_heads: int = 8  # query heads; head dim = MODEL_DIM / NUM_HEADS
    num_kv_heads: int = 4  # GQA: each key/value head serves NUM_HEADS // NUM_KV_HEADS query heads
    mlp_mult: float = 3.0  # MLP hidden width = MLP_MULT * MODEL_DIM
    rope_dims: int = 16  # partial RoPE: only the first ROPE_DIMS dims of each head are rotated
    rope_base: float = 10000.0  # RoPE frequency base
    qk_gain_init: float = 1.5  # initial per-head gain on the normalised queries
    logit_softcap: float = 30.0  # logits = cap * tanh(logits / cap)
    tied_embed_init_std: float = 0.005  # init std of the tied input/output embedding
    bigram_vocab_size: int = 1536  # BigramHash buckets (#549 trained 1536); 0 = off
    bigram_dim: int = 128  # BigramHash table width before its projection to MODEL_DIM
    smear_gate: bool = True  # mix each position's embedding with the previous one's
    bos_smear_fix: bool = True  # SmearGate and BigramHash never reach across a BOS into the previous document (#1855)
    bos_id: int = 1  # the token that starts every document (the challenge's <s>)
    xsa_last_n: int = 4  # exclusive self-attention in the last N blocks (NUM_LAYERS = every block)
    ln_scale: bool = True  # scale block inputs after RMSNorm by 1/sqrt(layer + 1)
    ortho_init: bool = True  # orthogonal init of every linear of at least 64x64 that does not start at zero
    rope_train_seq_len: int = 1024  # longer sequences get an NTK-rescaled RoPE base (#549 at 2048); 0 = never
    ve_dim: int = 128  # value embeddings: width of the shared table (#549: 128); 0 = off
    ve_layers: str = "-2,-1"  # blocks whose attention adds the value embedding to v; negative counts from the end (#549: 9,10 of 11)
    parallel_residual_start: int = -1  # blocks from this index on run attention and MLP in parallel (#1529: 8); -1 = off
    loop_layers: str = ""  # depth recurrence: a block range such as 3-5 run LOOP_COUNT more times; empty = off
    loop_count: int = 2  # extra passes over LOOP_LAYERS (#1855: 2, so 3-5 runs three times)
    loop_start_fraction: float = 0.35  # looping starts once this fraction of training is done (#1855: 0.35)
    skip_gates: bool = False  # U-Net skips through a learned per-channel sigmoid gate (#1855)
    attn_output_gate: bool = False  # per-head sigmoid gate on attention outputs, read from 12 channels (#1787)

    # ---- optimizer ----
    tied_embed_lr: float = 0.035  # AdamW, embeddings
    matrix_lr: float = 0.025  # Muon, every matrix (backbone and JEPA)
    scalar_lr: float = 0.025  # AdamW, vectors and scalars (gains, mixes, skip weights, gates)
    muon_momentum: float = 0.99  # Muon momentum after its warmup
    muon_momentum_warmup_start: float = 0.92  # Muon momentum at step 0, rising linearly
    muon_momentum_warmup_steps: int = 1500  # steps of that rise
    muon_backend_steps: int = 5  # Newton-Schulz iterations
    muon_ns: str = "quintic"  # Newton-Schulz coefficients
    muon_wd: float = 0.04  # decoupled weight decay of Muon matrices
    adam_wd: float = 0.04  # decoupled weight decay of embeddings
    scalar_wd: float = 0.04  # decoupled weight decay of gains, scales, mixes and gates (the records: ADAM_WD)
    min_lr: float = 0.0  # floor of the LR multiplier in the warmdown (#1787: 0.1)
    beta1: float = 0.9  # AdamW betas and epsilon
    beta2: float = 0.95  # (see BETA1)
    adam_eps: float = 1e-8  # (see BETA1)
    grad_clip_norm: float = 0.3  # 0 = no clipping
    final_ema: int = -1  # export an EMA of the weights
    final_ema_decay: float = 0.997  # decay of that EMA, updated after every step
    swa_enabled: bool = True  # export the mean of SWA snapshots (of the EMA when FINAL_EMA is on) from late in the warmdown
    swa_every: int = 50  # a snapshot every this-many steps ...
    swa_start_lr: float = 0.2  # ... once the warmdown's LR multiplier (before MIN_LR) is below this (the records: 0.2)
    qat_start_fraction: float = 0.15  # late QAT: MATRIX_BITS fake quantisation (clip search) over the last this fraction of training; 0 = off

    # ---- JEPA ----
    jepa_weight: float = 0.1  # weight of the JEPA loss; 0 = vanilla (no JEPA part built or run)
    jepa_grad_share: float = 0.0  # >0: steer the weight (from JEPA_WEIGHT) so the JEPA backbone gradient is this share of CE's; 0 = fixed weight
    jepa_mode: str = "next"  # the JEPA objective
    d_latent: int = 256  # width of the latent space of projections and predictors
    jepa_pred_mult: float = 2.0  # predictor hidden width = JEPA_PRED_MULT * D_LATENT
    jepa_head_lr: float = 0.0  # Muon LR of the JEPA parts' matrices (projections, predictors), own group; 0 = MATRIX_LR
    jepa_offsets: str = "1"  # next mode: horizons k, comma separated; "1,2,4,8" = multi-horizon
    jepa_offset_decay: float = 0.5  # horizon i (0-based) weighted by decay**i, weights normalised
    jepa_loss: str = "mse"  # the prediction loss of next, span and chunk
    target_ema_decay: float = 0.9995  # EMA target encoder; 0 = the online encoder under stop-gradient
    jepa_warmup_steps: int = 100  # JEPA weight ramps from 0 over these steps
    jepa_anneal: bool = True  # JEPA weight falls to 0 with the LR warmdown (measured: 0.0050 bpb better than 0 at grad share 0.3, campaign/anneal_default)
    jepa_layer: int = -1  # block whose output feeds the projections; negative counts from the end
    jepa_grad_layers: int = 0  # JEPA gradients reach only the last K block passes up to JEPA_LAYER (blocks, without loops); 0 = all
    jepa_only_fraction: float = 0.0  # curriculum: this first fraction of training has CE weight 0
    jepa_target_fraction: float = 1.0  # fraction of each micro-batch's sequences given JEPA targets
    jepa_chunk: int = 8  # chunk mode: target = mean latent of the next JEPA_CHUNK positions
    jepa_num_spans: int = 4  # span mode: masked spans per sequence
    jepa_span_mean: float = 16.0  # span mode: mean of the geometric span length
    jepa_span_min: int = 2  # span mode: shortest span
    nextlat_smooth_l1_weight: float = 1.0  # nextlat: weight of SmoothL1(h_hat[t+1], sg h[t+1]) (paper: 1)
    nextlat_kl_weight: float = 1.0  # nextlat: weight of KL(head(sg h[t+1]) || head(h_hat[t+1])), head frozen (paper: 1)
    nextlat_rollout: int = 1  # nextlat: transition steps, teacher-forced tokens
    nextlat_hidden: int = 0  # nextlat: width of the transition MLP; 0 = MODEL_DIM
    stp_triples: int = 16  # stp: random s < r < t triples per sequence, each inside one document (paper weights: JEPA_WEIGHT 0.005-0.04)
    anti_collapse: str = "vicreg"  # the regulariser that keeps the latents from collapsing
    vicreg_on: str = "auto"  # side the regulariser acts on
    vicreg_var_weight: float = 1.0  # VICReg variance hinge: each latent dim's std kept >= 1
    vicreg_cov_weight: float = 0.04  # VICReg off-diagonal covariance penalty
    sigreg_weight: float = 0.1  # SIGReg (LeJEPA) weight when ANTI_COLLAPSE=sigreg
    sigreg_slices: int = 256  # random 1-D projections tested against N(0, 1) per step
    sigreg_max_rows: int = 8192  # SIGReg reads every k-th latent row, at most this many (0 = all rows)
    collapse_std_floor: float = 0.1  # target latent std below this on a log step is reported as collapse (untrained: ~0.58)

    # ---- artifact ----
    artifact_path: str = "final_model.int6.ptz"  # written atomically by training, read by EVAL_ONLY
    artifact_budget_bytes: int = 16_000_000  # artifact file + this file's bytes must fit
    lzma_preset: int = 9  # LZMA level of the artifact (9, 6 and the extreme flag measured within 0.01%)
    compressor: str = "brotli"  # the artifact's compressor
    quant: str = "clip"  # how matrices are quantised
    matrix_bits: int = 6  # bits of every matrix (and of late QAT); the budget fallback lowers them towards 4
    embed_bits: int = 8  # bits of the embedding tables (per-row clip search; #1586: 7)
    gptq_calibration_batches: int = 64  # training micro-batches whose activations give each matrix's Hessian
    gptq_reserve_seconds: float = 10.0  # training stops this much before MAX_WALLCLOCK_SECONDS: calibration reads training data, so it counts
    gptq_damp: float = 0.01  # GPTQ damping: this fraction of the mean Hessian diagonal is added to it
    gptq_block_size: int = 128  # GPTQ columns per lazy-update block
    float_weights_path: str = ""  # also write the unquantised final weights, JEPA head and Hessians here (scripts/export_study.py)

    # ---- test-time training (legal, score-first) ----
    ttt: bool = False  # after the roundtrip: score each validation chunk, then train on it (#549)
    ttt_chunk_tokens: int = 32768  # scored tokens per chunk (whole evaluation windows)
    ttt_lr: float = 0.005  # SGD learning rate, cosine-decayed over the chunks
    ttt_epochs: int = 3  # passes over each chunk after it is scored
    ttt_momentum: float = 0.9  # SGD momentum (Adam: its beta1)
    ttt_optimizer: str = "sgd"  # the optimizer of test-time training
    ttt_params: str = "all"  # what test-time training trains
    ttt_lora_rank: int = 8  # rank of those adapters
    ttt_objective: str = "ce"  # the loss of test-time training
    ttt_grad_clip: float = 1.0  # gradient norm clip of each TTT step; 0 = none

    # ---- reliability ----
    checkpoint_every: int = 0  # save a resumable checkpoint every this-many steps; 0 = only on signals
    checkpoint_dir: str = "checkpoints"  # checkpoints go to CHECKPOINT_DIR/<RUN_ID>/
    resume: str = ""  # auto (latest checkpoint of this RUN_ID) | a checkpoint path | empty
    nan_policy: str = "stop"  # what a non-finite loss does
    debug_nan_step: int = -1  # test hook: make the loss of this step (0-based) non-finite

    # ---- derived values ----
    @property
    def jepa_enabled(self) -> bool:
        return self.jepa_weight > 0

    @property
    def jepa_uses_latents(self) -> bool:
        """next, span and chunk regress projected latents of a target encoder; nextlat and stp
        work on the backbone's own hidden states (no projections, target encoder or regulariser)."""
        return self.jepa_mode in ("next", "span", "chunk")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def jepa_offset_list(self) -> list[int]:
        return [int(part) for part in self.jepa_offsets.split(",") if part.strip()]

    @property
    def jepa_layer_index(self) -> int:
        return self.jepa_layer % self.num_layers

    @property
    def regularised_side(self) -> str:
        if self.vicreg_on != "auto":
            return self.vicreg_on
        return "pred" if self.jepa_mode == "span" else "target"

    @property
    def value_embedding_layers(self) -> list[int]:
        if self.ve_dim <= 0:
            return []
        return sorted({int(part) % self.num_layers for part in self.ve_layers.split(",") if part.strip()})

    @property
    def loop_layer_range(self) -> tuple[int, int] | None:
        if not self.loop_layers.strip():
            return None
        first, _, last = self.loop_layers.partition("-")
        return int(first), int(last or first)

    @property
    def training_seconds(self) -> float:
        """The training loop's wall-clock cap: MAX_WALLCLOCK_SECONDS less the GPTQ calibration's
        reserve (calibration reads training data, so its time is training time); 0 = none."""
        if self.max_wallclock_seconds <= 0:
            return 0.0
        return self.max_wallclock_seconds - (self.gptq_reserve_seconds if self.quant == "gptq" else 0.0)

    def final_ema_enabled(self) -> bool:
        return self.final_ema == 1 or (self.final_ema == -1 and self.iterations >= 1000)


# The settings that take one of a few values: each value, with what it means (or "" where its name
# says it). Validation accepts exactly these (_require_choice, and PRESET when the settings load);
# the settings table prints them beside the field's comment. PRESETS and COMPRESSORS hold one entry
# per value of PRESET and COMPRESSOR, NEWTON_SCHULZ_KINDS one per MUON_NS (tests/test_trainer.py).
CHOICES: dict[str, dict[str | int, str]] = {
    "preset": {"tiny": "CPU demo and tests", "11L": "#549-class record stack", "frontier": "#1855-class",
               "20L": "deep and narrow"},
    "compile": {-1: "on with CUDA, off on the CPU", 0: "off", 1: "on"},
    "compute_dtype": {"auto": "bf16 on CUDA, fp32 on CPU", "bfloat16": "", "float32": ""},
    "model_dtype": {"auto": "the compute dtype", "bfloat16": "", "float32": ""},
    "muon_ns": {"quintic": "Muon's", "polar": "Polar Express, #1344"},
    "final_ema": {-1: "on when ITERATIONS >= 1000", 0: "off", 1: "on"},
    "jepa_mode": {"next": "#896", "span": "#1581, I-JEPA", "chunk": "#832", "nextlat": "arXiv 2511.05963",
                  "stp": "arXiv 2602.22617"},
    "jepa_loss": {"mse": "", "cosine": "#1277"},
    "nextlat_rollout": {1: "", 2: "also h_hat[t+2] from h_hat[t+1]"},
    "anti_collapse": {"vicreg": "", "sigreg": "", "none": ""},
    "vicreg_on": {"auto": "pred for span, target otherwise", "target": "", "pred": ""},
    "compressor": {"lzma": "", "brotli": "measured smallest", "zstd": ""},
    "quant": {"gptq": "Hessian-aware, #1019", "clip": "per-row clip search, what late QAT trains for"},
    "ttt_optimizer": {"sgd": "#549", "adam": "beta2 0.99, as the records' LoRA TTT"},
    "ttt_params": {"all": "every weight", "lora": "rank-TTT_LORA_RANK adapters on every block matrix"},
    "ttt_objective": {"ce": "", "ce+jepa": "adds the run's JEPA loss through the exported JEPA head"},
    "nan_policy": {"stop": "checkpoint and exit", "skip": "drop the step and log it"},
}


# Fields that fix the shape of the exported model: an artifact is rebuilt from these.
MODEL_SHAPE_FIELDS = (
    "vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "rope_dims",
    "rope_base", "qk_gain_init", "logit_softcap", "tied_embed_init_std", "bigram_vocab_size",
    "bigram_dim", "smear_gate", "bos_smear_fix", "bos_id", "xsa_last_n", "ln_scale", "rope_train_seq_len",
    "ve_dim", "ve_layers", "parallel_residual_start", "loop_layers", "loop_count", "skip_gates", "attn_output_gate",
)

PRESETS: dict[str, dict[str, Any]] = {
    # A model that trains in minutes on two CPU cores: for `make demo`, tests and smoke runs.
    "tiny": {
        "DATA_PATH": "./data/datasets/local_sp1024",
        "TOKENIZER_PATH": "./data/tokenizers/local_sp1024_bpe.model",
        "ITERATIONS": 2000, "MAX_WALLCLOCK_SECONDS": 120, "WARMDOWN_ITERS": 60, "WARMUP_STEPS": 0,
        "FINAL_EMA": 0, "TRAIN_BATCH_TOKENS": 8192, "TRAIN_SEQ_LEN": 256, "VAL_LOSS_EVERY": 50,
        "VAL_BATCH_SIZE": 32768, "VAL_MAX_TOKENS": 65536, "TRAIN_LOG_EVERY": 25, "EVAL_STRIDE": 64,
        "NUM_LAYERS": 4, "MODEL_DIM": 128, "NUM_HEADS": 4, "NUM_KV_HEADS": 2, "ROPE_DIMS": 16,
        "BIGRAM_VOCAB_SIZE": 512, "BIGRAM_DIM": 32, "XSA_LAST_N": 2, "D_LATENT": 64,
        "MUON_MOMENTUM_WARMUP_STEPS": 100, "JEPA_WARMUP_STEPS": 20, "TIED_EMBED_LR": 0.05,
        "MATRIX_LR": 0.04, "SCALAR_LR": 0.04, "TARGET_EMA_DECAY": 0.99, "VE_DIM": 32,
        # SWA off: in all 82 runs of the first campaign's stages 1-2 it cost 0.0056-0.0166 bpb here.
        "SWA_ENABLED": False, "SWA_EVERY": 5, "GPTQ_CALIBRATION_BATCHES": 16, "GPTQ_RESERVE_SECONDS": 2, "TTT_CHUNK_TOKENS": 8192,
    },
    # The #549-class record stack (1.1194 bpb, minus its test-time training): the class defaults.
    "11L": {},
    # The #1855-class architecture and optimiser (1.0611 bpb on SP8192 with CaseOps, LQER, GPTQ and
    # TTT, which are not here) on sp1024: MLP 4x, XSA everywhere, QK gain 5, parallel residuals
    # from block 8, blocks 3-5 looped twice from 35% of training, Polar-Express Muon, an LR floor,
    # gated skips and attention outputs, and #1855's learning rates, decays and EMA.
    "frontier": {
        "MLP_MULT": 4.0, "XSA_LAST_N": 11, "QK_GAIN_INIT": 5.0, "PARALLEL_RESIDUAL_START": 8,
        "LOOP_LAYERS": "3-5", "LOOP_COUNT": 2, "LOOP_START_FRACTION": 0.35, "MUON_NS": "polar", "MIN_LR": 0.1,
        "SKIP_GATES": True, "ATTN_OUTPUT_GATE": True, "ROPE_TRAIN_SEQ_LEN": 0, "MATRIX_LR": 0.026, "SCALAR_LR": 0.02,
        "TIED_EMBED_LR": 0.03, "MUON_MOMENTUM": 0.97, "MUON_WD": 0.095, "ADAM_WD": 0.085, "SCALAR_WD": 0.02,
        # #1855 warmed down over the last 85% of its ~6,200 steps (looping began at step 2178 = 35%).
        "BETA2": 0.99, "FINAL_EMA_DECAY": 0.9965, "WARMDOWN_ITERS": 5300,
        # It needs fewer than 6 bits per matrix to fit: below int6, GPTQ measured far better.
        "QUANT": "gptq",
    },
    # Twice the depth at three quarters of the width: about the 11L parameter count, so it also fits.
    "20L": {"NUM_LAYERS": 20, "MODEL_DIM": 384, "NUM_HEADS": 6, "NUM_KV_HEADS": 3, "XSA_LAST_N": 6},
}

# A record folder's train_gpt.py (scripts/make_record.py) carries its run's settings here, as
# {"VARIABLE": "value"}: they replace the preset's and the class's defaults, and a variable set
# in the environment still wins, so `SEED=N train_gpt.py` with nothing else set reproduces the run.
BAKED_SETTINGS: dict[str, str] = {}

# Environment variables of the launcher and libraries; never mistaken for typos of ours.
FOREIGN_ENV_PREFIXES = (
    "TORCH", "PYTORCH", "NCCL", "CUDA", "OMP_", "MKL_", "KMP_", "HF_", "PYTHON", "LC_", "XDG_", "GLOO_",
)
FOREIGN_ENV_NAMES = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
}
# Prefixes only this trainer uses: an unknown variable with one of them is certainly a typo.
OWN_ENV_PREFIXES = ("JEPA_", "VICREG_", "SIGREG_", "BIGRAM_", "MUON_", "XSA_", "ROPE_", "QK_", "TIED_EMBED", "VE_",
                    "LOOP_", "SWA_", "QAT_", "BOS_", "GPTQ_", "TTT_", "NEXTLAT_", "STP_")


def _parse_env_value(name: str, raw: str, kind: str) -> Any:
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(float(raw)) if raw.strip().lower().endswith(("e3", "e6")) else int(raw)
        if kind == "float":
            return float(raw)
        return raw
    except ValueError:
        expected = {"bool": "0 or 1", "int": "an integer", "float": "a number"}[kind]
        raise ConfigError(f"{name}={raw!r} is not {expected}") from None


def check_unknown_env(environ: Mapping[str, str]) -> None:
    """A set variable that looks like ours but is unknown (JEPA_WIEGHT) stops the run: a typo
    must never silently run the default experiment instead of the intended one."""
    known = {field.name.upper() for field in dataclasses.fields(Hyperparameters)}
    for name in sorted(environ):
        if name in known or name in FOREIGN_ENV_NAMES or name.startswith(FOREIGN_ENV_PREFIXES):
            continue
        if not name.replace("_", "").isalnum() or name.upper() != name:
            continue
        closest = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        ours_by_prefix = name.startswith(OWN_ENV_PREFIXES)
        close_enough = bool(difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8))
        if ours_by_prefix or close_enough:
            hint = f"; did you mean {closest[0]}?" if closest else ""
            raise ConfigError(f"unknown setting {name}={environ[name]!r}{hint} (unset it or fix the name)")


def load_hyperparameters(environ: Mapping[str, str] | None = None) -> Hyperparameters:
    """Resolve the configuration: class defaults, then PRESET, then a record's BAKED_SETTINGS,
    then explicit variables."""
    environ = os.environ if environ is None else environ
    check_unknown_env(environ)
    environ = {**BAKED_SETTINGS, **environ}
    preset_name = environ.get("PRESET", Hyperparameters.preset)
    if preset_name not in CHOICES["preset"]:
        raise ConfigError(f"PRESET={preset_name!r} is unknown: use one of {', '.join(CHOICES['preset'])}")
    preset = PRESETS[preset_name]
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Hyperparameters):
        env_name = field.name.upper()
        kind = field.type if isinstance(field.type, str) else field.type.__name__
        if env_name in environ:
            values[field.name] = _parse_env_value(env_name, environ[env_name], kind)
        elif env_name in preset:
            values[field.name] = preset[env_name]
    return Hyperparameters(**values)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _require_choice(hp: Hyperparameters, name: str) -> None:
    """A CHOICES setting holds one of its values; the message lists them."""
    allowed = list(CHOICES[name])
    value = getattr(hp, name)
    listed = f"{allowed[0]} or {allowed[1]}" if len(allowed) == 2 else "one of " + ", ".join(map(str, allowed))
    _require(value in allowed, f"{name.upper()}={value!r} must be {listed}")


def validate_hyperparameters(hp: Hyperparameters, world_size: int) -> int:
    """Reject impossible settings with one line naming the variable; return GRAD_ACCUM_STEPS.
    The checks run in this order, so a run with several bad settings names the first."""
    validate_model_and_run(hp, world_size)
    grad_accum_steps = validate_batch(hp, world_size)
    validate_jepa(hp)
    validate_record_stack(hp)
    validate_export_and_ttt(hp)
    validate_hidden_state_modes(hp)
    return grad_accum_steps


def validate_model_and_run(hp: Hyperparameters, world_size: int) -> None:
    """The model's shape, the device switches, the schedule and the run's files."""
    for name in ("iterations", "train_seq_len", "vocab_size", "num_layers", "model_dim", "num_heads",
                 "num_kv_heads", "val_batch_size", "d_latent"):
        _require(getattr(hp, name) > 0, f"{name.upper()}={getattr(hp, name)} must be positive")
    _require(hp.vocab_size <= 65536, f"VOCAB_SIZE={hp.vocab_size} does not fit the uint16 shards (max 65536)")
    _require(hp.model_dim % hp.num_heads == 0,
             f"MODEL_DIM={hp.model_dim} is not divisible by NUM_HEADS={hp.num_heads}")
    _require(hp.num_heads % hp.num_kv_heads == 0,
             f"NUM_HEADS={hp.num_heads} is not divisible by NUM_KV_HEADS={hp.num_kv_heads} (GQA groups)")
    _require(hp.rope_dims % 2 == 0 and 0 <= hp.rope_dims <= hp.head_dim,
             f"ROPE_DIMS={hp.rope_dims} must be even and between 0 and the head dim {hp.head_dim}")
    _require(hp.mlp_mult > 0, f"MLP_MULT={hp.mlp_mult} must be positive")
    _require(hp.logit_softcap > 0, f"LOGIT_SOFTCAP={hp.logit_softcap} must be positive")
    _require(hp.bigram_vocab_size == 0 or hp.bigram_vocab_size >= 2,
             f"BIGRAM_VOCAB_SIZE={hp.bigram_vocab_size} must be 0 (off) or at least 2")
    _require(hp.bigram_vocab_size == 0 or hp.bigram_dim > 0, f"BIGRAM_DIM={hp.bigram_dim} must be positive")
    _require(hp.num_layers >= 2 or world_size == 1,
             f"NUM_LAYERS={hp.num_layers} with {world_size} processes: use at least 2 layers (one layer has no U-Net "
             f"skip, an empty parameter DDP would wait for)")
    _require(0 <= hp.xsa_last_n <= hp.num_layers,
             f"XSA_LAST_N={hp.xsa_last_n} must be between 0 and NUM_LAYERS={hp.num_layers}")
    _require_choice(hp, "compile")
    _require_choice(hp, "compute_dtype")
    _require_choice(hp, "final_ema")
    _require(0 <= hp.final_ema_decay < 1, f"FINAL_EMA_DECAY={hp.final_ema_decay} must be in [0, 1)")
    _require(hp.max_wallclock_seconds >= 0, f"MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds} must be >= 0")
    _require(hp.warmdown_iters >= 0 and hp.lr_warmup_steps >= 0 and hp.warmup_steps >= 0,
             "WARMDOWN_ITERS, LR_WARMUP_STEPS and WARMUP_STEPS must be >= 0")
    _require(hp.eval_stride >= 0 and hp.eval_stride <= hp.train_seq_len,
             f"EVAL_STRIDE={hp.eval_stride} must be between 0 (off) and TRAIN_SEQ_LEN={hp.train_seq_len}")
    _require(1 <= hp.lzma_preset <= 9, f"LZMA_PRESET={hp.lzma_preset} must be between 1 and 9")
    _require_choice(hp, "nan_policy")
    _require(hp.artifact_budget_bytes > 0, f"ARTIFACT_BUDGET_BYTES={hp.artifact_budget_bytes} must be positive")
    _require(hp.checkpoint_every >= 0, f"CHECKPOINT_EVERY={hp.checkpoint_every} must be >= 0 (0 = only on signals)")
    _require(hp.resume != "auto" or bool(hp.run_id),
             "RESUME=auto needs RUN_ID: the checkpoints of a run live in CHECKPOINT_DIR/<RUN_ID>/")


def validate_batch(hp: Hyperparameters, world_size: int) -> int:
    """The batch must split evenly over ranks, micro-steps and sequences; returns GRAD_ACCUM_STEPS
    (0 resolves to 8 // WORLD_SIZE, as in parameter-golf)."""
    grad_accum_steps = hp.grad_accum_steps
    if grad_accum_steps == 0:
        _require(8 % world_size == 0,
                 f"WORLD_SIZE={world_size} does not divide 8: set GRAD_ACCUM_STEPS explicitly")
        grad_accum_steps = 8 // world_size
    _require(grad_accum_steps > 0, f"GRAD_ACCUM_STEPS={hp.grad_accum_steps} must be positive")
    per_micro_batch = world_size * grad_accum_steps * hp.train_seq_len
    _require(hp.train_batch_tokens % per_micro_batch == 0,
             f"TRAIN_BATCH_TOKENS={hp.train_batch_tokens} is not divisible by WORLD_SIZE*GRAD_ACCUM_STEPS*"
             f"TRAIN_SEQ_LEN={world_size}*{grad_accum_steps}*{hp.train_seq_len}={per_micro_batch}")
    step_tokens = hp.train_batch_tokens + world_size * grad_accum_steps  # each rank's slice reads one token more
    _require(hp.train_max_tokens == 0 or hp.train_max_tokens >= step_tokens,
             f"TRAIN_MAX_TOKENS={hp.train_max_tokens} must be 0 (all) or at least one global batch: TRAIN_BATCH_TOKENS"
             f" + WORLD_SIZE*GRAD_ACCUM_STEPS = {step_tokens}")
    _require(hp.val_batch_size >= world_size * hp.train_seq_len,
             f"VAL_BATCH_SIZE={hp.val_batch_size} must hold one sequence per rank "
             f"(>= {world_size * hp.train_seq_len})")
    return grad_accum_steps


def validate_jepa(hp: Hyperparameters) -> None:
    """The JEPA settings of every mode, checked whether or not the run uses them: a typo'd value
    must not wait for the day its mode is used."""
    _require_choice(hp, "jepa_mode")
    _require_choice(hp, "jepa_loss")
    _require_choice(hp, "anti_collapse")
    _require_choice(hp, "vicreg_on")
    _require(hp.jepa_weight >= 0, f"JEPA_WEIGHT={hp.jepa_weight} must be >= 0")
    _require(hp.jepa_grad_share >= 0 and math.isfinite(hp.jepa_grad_share),
             f"JEPA_GRAD_SHARE={hp.jepa_grad_share} must be >= 0 (0 = off, the fixed JEPA_WEIGHT)")
    # JEPA_WEIGHT stays the switch and the starting weight: with JEPA_WEIGHT=0 (the vanilla arm of
    # an A/B whose common settings steer the JEPA arms) JEPA_GRAD_SHARE is ignored like every JEPA setting.
    _require(hp.jepa_grad_share == 0 or not hp.jepa_enabled or hp.train_log_every > 0,
             f"JEPA_GRAD_SHARE={hp.jepa_grad_share} needs TRAIN_LOG_EVERY > 0 (got {hp.train_log_every}): the weight "
             f"is steered on log steps")
    _require(hp.jepa_head_lr >= 0, f"JEPA_HEAD_LR={hp.jepa_head_lr} must be >= 0 (0 = MATRIX_LR)")
    _require(0 <= hp.target_ema_decay < 1, f"TARGET_EMA_DECAY={hp.target_ema_decay} must be in [0, 1)")
    try:
        offsets = hp.jepa_offset_list
    except ValueError:
        raise ConfigError(f"JEPA_OFFSETS={hp.jepa_offsets!r} must be comma-separated integers") from None
    _require(len(offsets) > 0 and all(0 < k < hp.train_seq_len for k in offsets) and len(set(offsets)) == len(offsets),
             f"JEPA_OFFSETS={hp.jepa_offsets!r} must be distinct integers in [1, TRAIN_SEQ_LEN)")
    _require(hp.jepa_offset_decay > 0, f"JEPA_OFFSET_DECAY={hp.jepa_offset_decay} must be positive")
    _require(-hp.num_layers <= hp.jepa_layer < hp.num_layers,
             f"JEPA_LAYER={hp.jepa_layer} must index a block: between {-hp.num_layers} and {hp.num_layers - 1}")
    _require(0 <= hp.jepa_grad_layers <= hp.jepa_layer_index + 1,
             f"JEPA_GRAD_LAYERS={hp.jepa_grad_layers} must be between 0 (all) and {hp.jepa_layer_index + 1} "
             f"(the blocks up to JEPA_LAYER)")
    _require(0 <= hp.jepa_only_fraction < 1, f"JEPA_ONLY_FRACTION={hp.jepa_only_fraction} must be in [0, 1)")
    _require(0 < hp.jepa_target_fraction <= 1, f"JEPA_TARGET_FRACTION={hp.jepa_target_fraction} must be in (0, 1]")
    _require(1 <= hp.jepa_chunk < hp.train_seq_len,
             f"JEPA_CHUNK={hp.jepa_chunk} must be in [1, TRAIN_SEQ_LEN)")
    _require(hp.jepa_num_spans >= 1, f"JEPA_NUM_SPANS={hp.jepa_num_spans} must be >= 1")
    longest_span = hp.train_seq_len // (2 * hp.jepa_num_spans)
    _require(1 <= hp.jepa_span_min <= longest_span,
             f"JEPA_SPAN_MIN={hp.jepa_span_min} must be in [1, TRAIN_SEQ_LEN/(2*JEPA_NUM_SPANS)={longest_span}]")
    _require(hp.jepa_span_mean >= 1, f"JEPA_SPAN_MEAN={hp.jepa_span_mean} must be >= 1")
    _require(hp.jepa_pred_mult > 0, f"JEPA_PRED_MULT={hp.jepa_pred_mult} must be positive")
    _require(hp.sigreg_slices > 0, f"SIGREG_SLICES={hp.sigreg_slices} must be positive")
    _require(hp.sigreg_max_rows >= 0, f"SIGREG_MAX_ROWS={hp.sigreg_max_rows} must be 0 (all rows) or positive")


def validate_record_stack(hp: Hyperparameters) -> None:
    """The record-parity and frontier switches."""
    _require_choice(hp, "model_dtype")
    _require(0 <= hp.bos_id < hp.vocab_size, f"BOS_ID={hp.bos_id} must be a token id below VOCAB_SIZE={hp.vocab_size}")
    _require(hp.rope_train_seq_len >= 0, f"ROPE_TRAIN_SEQ_LEN={hp.rope_train_seq_len} must be >= 0 (0 = never rescale)")
    _require(hp.ve_dim >= 0, f"VE_DIM={hp.ve_dim} must be >= 0 (0 = off)")
    try:
        ve_layers = [int(part) for part in hp.ve_layers.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"VE_LAYERS={hp.ve_layers!r} must be comma-separated block indices such as 9,10") from None
    _require(all(-hp.num_layers <= index < hp.num_layers for index in ve_layers),
             f"VE_LAYERS={hp.ve_layers!r} must index blocks: between {-hp.num_layers} and {hp.num_layers - 1}")
    _require(-1 <= hp.parallel_residual_start < hp.num_layers,
             f"PARALLEL_RESIDUAL_START={hp.parallel_residual_start} must be -1 (off) or a block index below "
             f"NUM_LAYERS={hp.num_layers}")
    loop_message = (f"LOOP_LAYERS={hp.loop_layers!r} must be a block range first-last such as 3-5 with "
                    f"0 <= first <= last < NUM_LAYERS={hp.num_layers}, or empty (off)")
    try:
        loop_range = hp.loop_layer_range
    except ValueError:
        raise ConfigError(loop_message) from None
    _require(loop_range is None or 0 <= loop_range[0] <= loop_range[1] < hp.num_layers, loop_message)
    _require(hp.loop_count >= 0, f"LOOP_COUNT={hp.loop_count} must be >= 0")
    _require(loop_range is None or hp.loop_count > 0,
             f"LOOP_LAYERS={hp.loop_layers!r} with LOOP_COUNT=0 loops nothing: set LOOP_COUNT >= 1 or unset LOOP_LAYERS")
    _require(0 <= hp.loop_start_fraction < 1, f"LOOP_START_FRACTION={hp.loop_start_fraction} must be in [0, 1)")
    # The artifact is evaluated looping (training ends looping): a run must get there.
    last_progress = (hp.iterations - 1) / hp.iterations
    _require(loop_range is None or last_progress >= hp.loop_start_fraction - 1e-9,
             f"LOOP_START_FRACTION={hp.loop_start_fraction} is never reached in ITERATIONS={hp.iterations} steps "
             f"(the last step is at {last_progress:.3f} of training): lower it or raise ITERATIONS")
    _require_choice(hp, "muon_ns")
    for name in ("muon_wd", "adam_wd", "scalar_wd"):
        _require(getattr(hp, name) >= 0, f"{name.upper()}={getattr(hp, name)} must be >= 0")
    _require(0 <= hp.min_lr < 1, f"MIN_LR={hp.min_lr} must be in [0, 1)")
    _require(hp.swa_every > 0, f"SWA_EVERY={hp.swa_every} must be positive")
    _require(0 < hp.swa_start_lr <= 1, f"SWA_START_LR={hp.swa_start_lr} must be in (0, 1]")
    _require(0 <= hp.qat_start_fraction < 1, f"QAT_START_FRACTION={hp.qat_start_fraction} must be in [0, 1) (0 = off)")


def validate_hidden_state_modes(hp: Hyperparameters) -> None:
    """nextlat and stp act on the backbone's hidden states. Their own settings are checked always
    (a typo'd value must not wait for the day the mode is used); the latent modes' settings that
    would silently mean something else here are refused, the rest are ignored (describe_run says
    so): TARGET_EMA_DECAY (no target encoder), D_LATENT, JEPA_PRED_MULT, JEPA_LOSS, ANTI_COLLAPSE,
    VICREG_*, SIGREG_*, the span and chunk settings."""
    _require_choice(hp, "nextlat_rollout")
    for name in ("nextlat_smooth_l1_weight", "nextlat_kl_weight"):
        _require(getattr(hp, name) >= 0, f"{name.upper()}={getattr(hp, name)} must be >= 0")
    _require(hp.nextlat_hidden >= 0, f"NEXTLAT_HIDDEN={hp.nextlat_hidden} must be >= 0 (0 = MODEL_DIM)")
    _require(hp.stp_triples >= 1, f"STP_TRIPLES={hp.stp_triples} must be >= 1")
    if hp.jepa_mode not in ("nextlat", "stp") or not hp.jepa_enabled:
        return
    _require(hp.jepa_offset_list == [1],
             f"JEPA_OFFSETS={hp.jepa_offsets!r} is next mode's; JEPA_MODE={hp.jepa_mode} has no horizons"
             + (" (its rollout depth is NEXTLAT_ROLLOUT)" if hp.jepa_mode == "nextlat" else "") + ": unset it")
    if hp.jepa_mode == "nextlat":
        _require(hp.nextlat_smooth_l1_weight + hp.nextlat_kl_weight > 0,
                 "NEXTLAT_SMOOTH_L1_WEIGHT and NEXTLAT_KL_WEIGHT are both 0: nextlat would train nothing")
        _require(hp.jepa_layer_index == hp.num_layers - 1,
                 f"JEPA_LAYER={hp.jepa_layer} with JEPA_MODE=nextlat: NextLat predicts the final hidden state (its KL "
                 f"reads the output head), so JEPA_LAYER must be the last block (-1)")
        _require(hp.train_seq_len > hp.nextlat_rollout,
                 f"TRAIN_SEQ_LEN={hp.train_seq_len} has no pair {hp.nextlat_rollout} positions apart (NEXTLAT_ROLLOUT)")
    else:
        _require(hp.train_seq_len >= 3, f"TRAIN_SEQ_LEN={hp.train_seq_len} has no s < r < t triple for JEPA_MODE=stp")


def validate_export_and_ttt(hp: Hyperparameters) -> None:
    """Quantisation, compressor and test-time training: refused at start-up, never after training."""
    _require_choice(hp, "quant")
    _require(4 <= hp.matrix_bits <= 8, f"MATRIX_BITS={hp.matrix_bits} must be between 4 and 8")
    _require(4 <= hp.embed_bits <= 8, f"EMBED_BITS={hp.embed_bits} must be between 4 and 8")
    _require(hp.gptq_calibration_batches > 0, f"GPTQ_CALIBRATION_BATCHES={hp.gptq_calibration_batches} must be positive")
    _require(0 <= hp.gptq_reserve_seconds and (hp.max_wallclock_seconds == 0 or hp.quant != "gptq"
                                               or hp.gptq_reserve_seconds < hp.max_wallclock_seconds),
             f"GPTQ_RESERVE_SECONDS={hp.gptq_reserve_seconds} must be >= 0 and below "
             f"MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds}")
    _require(0 < hp.gptq_damp < 1, f"GPTQ_DAMP={hp.gptq_damp} must be in (0, 1)")
    _require(hp.gptq_block_size > 0, f"GPTQ_BLOCK_SIZE={hp.gptq_block_size} must be positive")
    _require_choice(hp, "compressor")
    compressor_module(hp.compressor)  # a missing package stops the run now, not after training
    _require(hp.ttt_chunk_tokens > 0, f"TTT_CHUNK_TOKENS={hp.ttt_chunk_tokens} must be positive")
    _require(hp.ttt_lr >= 0 and hp.ttt_epochs >= 0, "TTT_LR and TTT_EPOCHS must be >= 0")
    _require(0 <= hp.ttt_momentum < 1, f"TTT_MOMENTUM={hp.ttt_momentum} must be in [0, 1)")
    _require_choice(hp, "ttt_params")
    _require_choice(hp, "ttt_optimizer")
    _require(hp.ttt_lora_rank > 0, f"TTT_LORA_RANK={hp.ttt_lora_rank} must be positive")
    _require(hp.ttt_grad_clip >= 0, f"TTT_GRAD_CLIP={hp.ttt_grad_clip} must be >= 0 (0 = none)")
    _require_choice(hp, "ttt_objective")
    if hp.ttt_objective == "ce+jepa" and not hp.eval_only:
        _require(hp.jepa_enabled, "TTT_OBJECTIVE=ce+jepa needs a JEPA run (JEPA_WEIGHT > 0): its head is the objective")
        _require(hp.jepa_mode in ("next", "chunk"),
                 f"TTT_OBJECTIVE=ce+jepa supports JEPA_MODE next and chunk, not {hp.jepa_mode}: use TTT_OBJECTIVE=ce")


# =============================================================================
# RUNTIME: device, distributed set-up, logging
# =============================================================================


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    compile: bool
    model_dtype: torch.dtype = torch.float32  # of the embedding tables (apply_model_dtype)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def setup_runtime(hp: Hyperparameters) -> Runtime:
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # TF32 as the records set it: it speeds up the fp32 matmuls autocast leaves (Newton-Schulz
        # off the bf16 path, the JEPA losses' covariance and SIGReg projections, 10 mantissa bits).
        torch.backends.cuda.matmul.allow_tf32 = hp.tf32
        torch.backends.cudnn.allow_tf32 = hp.tf32
    else:
        device = torch.device("cpu")
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    autocast_dtype, use_compile = resolve_compute(hp, device)
    return Runtime(rank, world_size, local_rank, device, autocast_dtype, use_compile,
                   resolve_model_dtype(hp, autocast_dtype))


def shut_down_processes(runtime: Runtime) -> None:
    """The end of setup_runtime's process group, on every way out of main()."""
    if runtime.distributed and dist.is_initialized():
        # DDP's reducer holds the process group: free it while Python is fully alive, or
        # gloo's threads may abort the process during interpreter shutdown.
        gc.collect()
        dist.destroy_process_group()


def resolve_compute(hp: Hyperparameters, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """COMPUTE_DTYPE and COMPILE on this device: (autocast dtype or None, compile or not)."""
    if hp.compute_dtype == "bfloat16" or (hp.compute_dtype == "auto" and device.type == "cuda"):
        autocast_dtype: torch.dtype | None = torch.bfloat16
    else:
        autocast_dtype = None
    use_compile = hp.compile == 1 or (hp.compile == -1 and device.type == "cuda")
    if use_compile:
        # One graph per (module, call signature and phase): online, target, eval and roundtrip
        # models, with late QAT and depth recurrence each on and off.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return autocast_dtype, use_compile


def resolved_hyperparameters(hp: Hyperparameters, runtime: Runtime) -> Hyperparameters:
    """The settings as this run applied them: COMPUTE_DTYPE and COMPILE resolved on its device,
    so that EVAL_ONLY on another machine evaluates the way the run did."""
    compute_dtype = "bfloat16" if runtime.autocast_dtype == torch.bfloat16 else "float32"
    return dataclasses.replace(hp, compute_dtype=compute_dtype, compile=int(runtime.compile))


def resolve_model_dtype(hp: Hyperparameters, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """MODEL_DTYPE: auto follows the compute dtype (bf16 tables on CUDA, fp32 on the CPU)."""
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(hp.model_dtype, autocast_dtype or torch.float32)


class RunLogger:
    """Rank 0 writes every line to logs/<RUN_ID>.txt (flushed at once, so a crash loses nothing)
    and, unless console=False, to stdout."""

    def __init__(self, path: Path | None):
        self.path = path
        self.handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(path, "a", encoding="utf-8")

    def __call__(self, message: str, console: bool = True) -> None:
        if self.handle is None:
            return
        if console:
            print(message, flush=True)
        self.handle.write(message + "\n")
        self.handle.flush()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, remainder = divmod(seconds, 3600)
    minutes, seconds = divmod(remainder, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10, check=False)
        return result.stdout.strip() if result.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def running_code() -> tuple[str, int]:
    """The trainer's source as it runs, and the code bytes the challenge counts: the size of the
    file that ran. A record folder's train_gpt.py is a compressed wrapper that sets TRAINER_SOURCE
    to the decoded source and executes it in its own globals: the log shows that source, while
    the count is the wrapper's own bytes."""
    file_bytes = Path(__file__).read_bytes()
    source = globals().get("TRAINER_SOURCE")
    return (source if isinstance(source, str) else file_bytes.decode("utf-8")), len(file_bytes)


def device_name(runtime: Runtime) -> str:
    if runtime.device.type == "cuda":
        return torch.cuda.get_device_name(runtime.device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# =============================================================================
# DATA: challenge shard format, token loader, BPB lookup tables
# =============================================================================

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256  # little-endian int32: magic, version, token count, then zeros
DATA_FIX_HINT = ("download the official data (python3 data/cached_challenge_fineweb.py --variant sp1024, or "
                 "sp<N>/byte260) "
                 "or build a local corpus (python3 data/build_local_corpus.py) and point DATA_PATH at it")


def check_shard_header(path: Path) -> int:
    """Validate a shard's header and file size without reading its tokens; returns the count."""
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header.size != SHARD_HEADER_INTS:
        raise ConfigError(f"shard {path} is shorter than its 1024-byte header (truncated): rebuild or re-download it")
    if int(header[0]) != SHARD_MAGIC or int(header[1]) != SHARD_VERSION:
        raise ConfigError(f"shard {path} has magic {int(header[0])} version {int(header[1])}, expected "
                          f"{SHARD_MAGIC} version {SHARD_VERSION}: not a challenge shard; rebuild or re-download it")
    num_tokens = int(header[2])
    expected_bytes = 4 * SHARD_HEADER_INTS + 2 * num_tokens
    actual_bytes = path.stat().st_size
    if actual_bytes != expected_bytes:
        raise ConfigError(f"shard {path} has {actual_bytes} bytes but its header promises {num_tokens} tokens "
                          f"({expected_bytes} bytes): truncated or corrupt; rebuild or re-download it")
    return num_tokens


def load_data_shard(path: Path, vocab_size: int | None = None) -> Tensor:
    """Read one shard, checking its header, size and token range; returns its tokens as uint16."""
    num_tokens = check_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=4 * SHARD_HEADER_INTS)
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        raise ConfigError(f"shard {path} holds token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}: "
                          f"the shards and VOCAB_SIZE/TOKENIZER_PATH belong to different tokenizers")
    return torch.from_numpy(tokens.astype(np.uint16, copy=False))


def find_shards(data_path: str, split: str) -> list[Path]:
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    files = [Path(p) for p in sorted(glob.glob(pattern))]
    if not files:
        raise ConfigError(f"no {split} shards match {pattern}: {DATA_FIX_HINT}")
    return files


class TokenStream:
    """Reads the shards in order and wraps around forever: deterministic, no sampling, no
    workers. With max_tokens > 0 (TRAIN_MAX_TOKENS) it wraps after the first max_tokens tokens
    instead of reading further: data-limited training sees those tokens epoch after epoch. Its
    position (file index, offset, place in the window) is all a checkpoint needs to resume it."""

    def __init__(self, files: list[Path], vocab_size: int, max_tokens: int = 0):
        self.files = files
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens
        self.file_index = 0
        self.position = 0
        self.window_position = 0  # tokens taken since the window (the first max_tokens) last began
        self.tokens_taken = 0  # over the stream's life: epochs = tokens_taken / max_tokens
        self.tokens = load_data_shard(files[0], vocab_size)

    def _open(self, file_index: int) -> None:
        self.file_index = file_index % len(self.files)
        self.tokens = load_data_shard(self.files[self.file_index], self.vocab_size)
        self.position = 0

    def take(self, count: int) -> Tensor:
        pieces: list[Tensor] = []
        while count > 0:
            if 0 < self.max_tokens <= self.window_position:  # the window is done: back to its first token
                if self.file_index != 0:
                    self._open(0)
                self.position = self.window_position = 0
            available = self.tokens.numel() - self.position
            if self.max_tokens > 0:
                available = min(available, self.max_tokens - self.window_position)
            if available <= 0:
                self._open(self.file_index + 1)
                continue
            length = min(count, available)
            pieces.append(self.tokens[self.position:self.position + length])
            self.position += length
            self.window_position += length
            self.tokens_taken += length
            count -= length
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def state(self) -> dict[str, int]:
        return {"file_index": self.file_index, "position": self.position, "window_position": self.window_position,
                "tokens_taken": self.tokens_taken}

    def restore(self, state: dict[str, int]) -> None:
        self._open(state["file_index"])
        self.position = state["position"]
        # Checkpoints from before TRAIN_MAX_TOKENS hold neither: they read the shards without a window.
        self.window_position = state.get("window_position", 0)
        self.tokens_taken = state.get("tokens_taken", 0)


class DistributedTokenLoader:
    """Each micro-step takes one contiguous chunk of the stream and gives rank r the r-th slice
    (+1 token for the shifted targets). World size 2 with accumulation 1 therefore sees exactly
    the tokens of world size 1 with accumulation 2: the global batch never depends on the launch."""

    def __init__(self, files: list[Path], vocab_size: int, rank: int, world_size: int, device: torch.device,
                 max_tokens: int = 0):
        # Every rank reads the same stream (and wraps the TRAIN_MAX_TOKENS window at the same
        # token), so the window holds the same tokens whatever the launch.
        self.stream = TokenStream(files, vocab_size, max_tokens)
        self.rank = rank
        self.world_size = world_size
        self.device = device

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        local = chunk[self.rank * span:(self.rank + 1) * span].to(dtype=torch.int64)
        inputs = local[:-1].reshape(-1, seq_len)
        targets = local[1:].reshape(-1, seq_len)
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)


def load_validation_tokens(files: list[Path], seq_len: int, vocab_size: int, max_tokens: int) -> Tensor:
    tokens = torch.cat([load_data_shard(path, vocab_size) for path in files])
    if max_tokens > 0:
        tokens = tokens[:max_tokens + 1]
    usable = ((tokens.numel() - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ConfigError(f"the validation split has {tokens.numel()} tokens, fewer than one sequence of "
                          f"TRAIN_SEQ_LEN={seq_len} + 1: use more validation text or a shorter TRAIN_SEQ_LEN")
    return tokens[:usable + 1]


def build_sentencepiece_luts(
    sp: spm.SentencePieceProcessor, vocab_size: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """Lookup tables that turn token ids back into UTF-8 byte counts, for val_bpb.

    Returns (bytes_per_token int16, has_leading_space bool, is_boundary_token bool), each of
    length max(tokenizer vocab, vocab_size). The bytes of a token at position t are
    bytes_per_token[tok] + (has_leading_space[tok] and not is_boundary_token[previous token]):
    the "▁" of a piece stands for one space byte, except right after a boundary (control or
    unknown token, e.g. the BOS that opens a document) where the decoder drops it.
    """
    tokenizer_vocab = int(sp.vocab_size())
    table_size = max(tokenizer_vocab, vocab_size)
    bytes_per_token = np.zeros(table_size, dtype=np.int16)
    has_leading_space = np.zeros(table_size, dtype=np.bool_)
    # Ids beyond the tokenizer's vocab never occur; marking them boundary keeps them at 0 bytes.
    is_boundary_token = np.ones(table_size, dtype=np.bool_)
    for token_id in range(tokenizer_vocab):
        if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
            continue  # decodes to no text: 0 bytes, and a boundary for the next piece's space
        is_boundary_token[token_id] = False
        if sp.is_byte(token_id):
            bytes_per_token[token_id] = 1  # byte-fallback piece <0xAB> is exactly one byte
            continue
        piece = sp.id_to_piece(token_id)
        if piece.startswith("\u2581"):
            has_leading_space[token_id] = True
            piece = piece[1:]
        bytes_per_token[token_id] = len(piece.encode("utf-8"))
    return (
        torch.tensor(bytes_per_token, dtype=torch.int16, device=device),
        torch.tensor(has_leading_space, dtype=torch.bool, device=device),
        torch.tensor(is_boundary_token, dtype=torch.bool, device=device),
    )


@dataclass(frozen=True)
class ByteTokenizer:
    """The challenge's byte260 tokenizer (its data/tokenizers/fineweb_pure_byte_260.json): four
    special ids (pad 0, bos 1, eos 2, unk 3), then byte b of the UTF-8 text at id byte_offset + b."""
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3
    byte_offset: int = 4
    byte_count: int = 256

    @property
    def vocab_size(self) -> int:
        return self.byte_offset + self.byte_count


Tokenizer = spm.SentencePieceProcessor | ByteTokenizer


def build_byte_luts(tokenizer: ByteTokenizer, vocab_size: int,
                    device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """The same three tables as build_sentencepiece_luts for a byte tokenizer: one byte per byte
    id, none for the special ids (BOS decodes to no text), no leading-space rule."""
    table_size = max(tokenizer.vocab_size, vocab_size)
    is_byte = torch.zeros(table_size, dtype=torch.bool)
    is_byte[tokenizer.byte_offset:tokenizer.byte_offset + tokenizer.byte_count] = True
    return (is_byte.to(torch.int16).to(device), torch.zeros(table_size, dtype=torch.bool, device=device),
            (~is_byte).to(device))


def build_bpb_luts(tokenizer: Tokenizer, vocab_size: int,
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """val_bpb's byte-count tables for either kind of tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return build_byte_luts(tokenizer, vocab_size, device)
    return build_sentencepiece_luts(tokenizer, vocab_size, device)


def load_byte_tokenizer(path: Path) -> ByteTokenizer:
    """Read a byte tokenizer descriptor: {"tokenizer_type": "pure_byte", "config": {...}}."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"tokenizer {path} is not a readable JSON descriptor ({error}): rebuild it with "
                          f"python3 data/build_local_corpus.py --tokenizer byte260") from None
    if not isinstance(payload, dict) or payload.get("tokenizer_type") != "pure_byte":
        kind = payload.get("tokenizer_type") if isinstance(payload, dict) else None
        raise ConfigError(f"tokenizer {path} has tokenizer_type {kind!r}; this trainer reads SentencePiece .model "
                          f"files and pure_byte .json descriptors (the challenge's byte260)")
    config = payload.get("config", {})
    names = [field.name for field in dataclasses.fields(ByteTokenizer)]
    try:
        tokenizer = ByteTokenizer(**{name: int(config[name]) for name in names if name in config})
    except (TypeError, ValueError):
        raise ConfigError(f"tokenizer {path}: its config {config!r} must hold integer {', '.join(names)}") from None
    if tokenizer.byte_count != 256 or tokenizer.byte_offset < 0:
        raise ConfigError(f"tokenizer {path} maps {tokenizer.byte_count} bytes from id {tokenizer.byte_offset}: "
                          f"a byte tokenizer needs all 256 byte values")
    return tokenizer


def load_tokenizer(hp: Hyperparameters) -> Tokenizer:
    """TOKENIZER_PATH: a SentencePiece .model, or a byte tokenizer's .json descriptor."""
    path = Path(hp.tokenizer_path)
    if not path.is_file():
        raise ConfigError(f"tokenizer {path} not found: {DATA_FIX_HINT}, and set TOKENIZER_PATH to its .model "
                          f"(or its .json descriptor for byte260)")
    if path.suffix == ".json":
        tokenizer: Tokenizer = load_byte_tokenizer(path)
        if tokenizer.bos_id != hp.bos_id:
            raise ConfigError(f"tokenizer {path} starts documents with id {tokenizer.bos_id} but BOS_ID={hp.bos_id}: "
                              f"set BOS_ID={tokenizer.bos_id}")
        vocab_size = tokenizer.vocab_size
    else:
        tokenizer = spm.SentencePieceProcessor(model_file=str(path))
        vocab_size = int(tokenizer.vocab_size())
    if vocab_size != hp.vocab_size:
        raise ConfigError(f"tokenizer {path} has {vocab_size} ids but VOCAB_SIZE={hp.vocab_size}: "
                          f"set VOCAB_SIZE={vocab_size} or use the tokenizer the shards were built with")
    return tokenizer


# =============================================================================
# MODEL: the GPT backbone
# =============================================================================


class CastedLinear(nn.Linear):
    """A bias-free linear layer whose fp32 weight is cast to the activation dtype at matmul time:
    the optimizer keeps full-precision weights while the matmuls run in bf16 on GPUs. With late
    QAT on (qat_bits > 0, training mode only) the forward sees the weight exactly as the exporter
    will store it, and the gradient passes straight through to the fp32 weight."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.qat_bits = 0
        if zero_init:
            # Output projections into the residual stream start at zero: every block begins as
            # the identity, which keeps deep stacks stable in the first steps.
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self.qat_bits and self.training:
            codes, scales, _ = quantize_rows(weight, self.qat_bits)
            # Adding the exact zero (w - w.detach()) keeps the dequantised values bit for bit and
            # gives the straight-through gradient: d(loss)/dw as if the weight were unquantised.
            weight = dequantize_rows(codes, scales).view_as(weight) + (weight - weight.detach())
        return F.linear(x, weight.to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class PartialRotary(nn.Module):
    """RoPE on the first `rotary_dims` dims of each head; the rest carry position-free content.
    A sequence longer than ROPE_TRAIN_SEQ_LEN gets an NTK-rescaled base, base * s^(d/(d-2)) with
    s = length / ROPE_TRAIN_SEQ_LEN, as the 1.1233 and #549 records did (1024, so 2048-token
    sequences run at base ~22,080): the slowest frequency still turns less than once per window."""

    def __init__(self, rotary_dims: int, base: float, rope_train_seq_len: int = 0):
        super().__init__()
        self.rotary_dims = rotary_dims
        self.base = base
        self.rope_train_seq_len = rope_train_seq_len

    def forward(self, x: Tensor) -> Tensor:  # x: (B, heads, T, head_dim)
        if self.rotary_dims == 0:
            return x
        length = x.size(-2)
        base = self.base
        if self.rotary_dims > 2 and 0 < self.rope_train_seq_len < length:
            base = base * (length / self.rope_train_seq_len) ** (self.rotary_dims / (self.rotary_dims - 2))
        # Recomputed per call rather than cached in a buffer: a few hundred flops that compile
        # folds away, and a model without buffers has nothing for DDP to broadcast.
        exponents = torch.arange(0, self.rotary_dims, 2, device=x.device, dtype=torch.float32) / self.rotary_dims
        positions = torch.arange(length, device=x.device, dtype=torch.float32)
        angles = torch.outer(positions, 1.0 / base ** exponents)  # (T, rotary_dims / 2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        rotated, passthrough = x[..., :self.rotary_dims], x[..., self.rotary_dims:]
        half = self.rotary_dims // 2
        x1, x2 = rotated[..., :half], rotated[..., half:]
        rotated = torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
        return torch.cat((rotated, passthrough), dim=-1)


ATTN_GATE_INPUTS = 12  # the sparse attention output gate reads the first 12 channels (#1787)


class CausalSelfAttention(nn.Module):
    """GQA attention with q/k RMSNorm, partial RoPE, a learned per-head query gain and optional
    XSA (exclusive self-attention: each output has its own value direction projected out, so a
    head must bring information from other positions instead of copying the token itself).
    Optional: value embeddings added to v (VE_LAYERS) and a per-head output gate (ATTN_OUTPUT_GATE)."""

    def __init__(self, hp: Hyperparameters, use_xsa: bool, use_value_embedding: bool):
        super().__init__()
        self.num_heads = hp.num_heads
        self.num_kv_heads = hp.num_kv_heads
        self.head_dim = hp.head_dim
        self.use_xsa = use_xsa
        kv_dim = hp.num_kv_heads * hp.head_dim
        self.query = CastedLinear(hp.model_dim, hp.model_dim)
        self.key = CastedLinear(hp.model_dim, kv_dim)
        self.value = CastedLinear(hp.model_dim, kv_dim)
        self.output = CastedLinear(hp.model_dim, hp.model_dim, zero_init=True)
        self.query_gain = nn.Parameter(torch.full((hp.num_heads,), hp.qk_gain_init))
        self.rotary = PartialRotary(hp.rope_dims, hp.rope_base, hp.rope_train_seq_len)
        # This layer's own weight on the shared value embedding (#549: VE on layers 9 and 10).
        self.value_embedding_scale = nn.Parameter(torch.ones(())) if use_value_embedding else None
        # Sparse output gate: sigmoid(0.5 * W x[:12]) per head, 0.5 at init (W = 0).
        self.output_gate = (nn.Parameter(torch.zeros(hp.num_heads, min(ATTN_GATE_INPUTS, hp.model_dim)))
                            if hp.attn_output_gate else None)

    def forward(self, x: Tensor, value_embedding: Tensor | None = None) -> Tensor:
        batch, length, width = x.shape
        q = self.query(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.key(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.value(x)  # (B, T, kv_dim)
        if self.value_embedding_scale is not None and value_embedding is not None:
            v = v + self.value_embedding_scale.to(v.dtype) * value_embedding.to(v.dtype)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = self.rotary(rms_norm(q)) * self.query_gain.to(q.dtype)[None, :, None, None]
        k = self.rotary(rms_norm(k))
        y = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, is_causal=True,
                                           enable_gqa=self.num_kv_heads != self.num_heads)  # (B, H, T, hd)
        if self.use_xsa:
            group = self.num_heads // self.num_kv_heads
            y = y.view(batch, self.num_kv_heads, group, length, self.head_dim)
            # Normalised in fp32 but kept in v's dtype (F.normalize would return fp32 under autocast).
            own_value = F.normalize(v.float(), dim=-1).to(v.dtype).unsqueeze(2)  # (B, Hkv, 1, T, hd)
            # CUDA autocast runs sum in fp32 unless its dtype is given: without it the projection,
            # and then y and the output projection's input, would silently become fp32.
            y = y - (y * own_value).sum(dim=-1, keepdim=True, dtype=y.dtype) * own_value
            y = y.view(batch, self.num_heads, length, self.head_dim)
        if self.output_gate is not None:
            gate_logits = F.linear(x[..., :self.output_gate.size(1)], self.output_gate.to(x.dtype))  # (B, T, H)
            y = y * torch.sigmoid(0.5 * gate_logits).transpose(1, 2).unsqueeze(-1).to(y.dtype)
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.output(y)


class MLP(nn.Module):
    """LeakyReLU(0.5)^2: the squared ReLU of modded-nanogpt with a leak so no unit dies."""

    def __init__(self, hp: Hyperparameters):
        super().__init__()
        hidden = int(hp.mlp_mult * hp.model_dim)
        self.expand = CastedLinear(hp.model_dim, hidden)
        self.contract = CastedLinear(hidden, hp.model_dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.contract(F.leaky_relu(self.expand(x), negative_slope=0.5).square())


class Block(nn.Module):
    """One transformer block. Sequential (x + attn, then + mlp of the result) or, from
    PARALLEL_RESIDUAL_START on, parallel: attention and MLP both read the block's input and
    their outputs are added together (#1493's single-lane form)."""

    def __init__(self, hp: Hyperparameters, layer_index: int):
        super().__init__()
        self.attention = CausalSelfAttention(hp, use_xsa=layer_index >= hp.num_layers - hp.xsa_last_n,
                                             use_value_embedding=layer_index in hp.value_embedding_layers)
        self.mlp = MLP(hp)
        self.parallel = 0 <= hp.parallel_residual_start <= layer_index
        self.attention_scale = nn.Parameter(torch.ones(hp.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(hp.model_dim))
        # resid_mix: learned blend of the running stream x and the block-0 input x0 (per channel).
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(hp.model_dim), torch.zeros(hp.model_dim))))
        # LN scale: deeper blocks read a damped copy of the stream, which tames its growth with depth.
        self.input_scale = 1.0 / math.sqrt(layer_index + 1) if hp.ln_scale else 1.0

    def forward(self, x: Tensor, x0: Tensor, value_embedding: Tensor | None = None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        normed = rms_norm(x) * self.input_scale
        attention_out = self.attention_scale.to(x.dtype) * self.attention(normed, value_embedding)
        if self.parallel:
            return x + attention_out + self.mlp_scale.to(x.dtype) * self.mlp(normed)
        x = x + attention_out
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.input_scale)


class BigramHash(nn.Module):
    """A hashed embedding of (previous token, current token): cheap bigram statistics that a
    1024-token vocabulary cannot hold in its pieces. The table starts at zero and its output is
    scaled by a small learned factor, so it enters the model gradually."""

    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.num_buckets = hp.bigram_vocab_size
        self.bos_id = hp.bos_id if hp.bos_smear_fix else -1
        self.table = nn.Embedding(hp.bigram_vocab_size, hp.bigram_dim)
        nn.init.zeros_(self.table.weight)
        self.projection = CastedLinear(hp.bigram_dim, hp.model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket_ids(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T)
        current = tokens.to(torch.int64)
        previous = F.pad(current[:, :-1], (1, 0))
        # Odd multipliers before the xor spread (previous, current) pairs over the buckets; the
        # last bucket is reserved for positions without a previous token: position 0 and, with
        # BOS_SMEAR_FIX, every document's BOS (its predecessor belongs to another document).
        hashed = torch.bitwise_xor(current * 92821, previous * 68917) % (self.num_buckets - 1)
        hashed[:, 0] = self.num_buckets - 1
        if self.bos_id >= 0:
            hashed = torch.where(current == self.bos_id, self.num_buckets - 1, hashed)
        return hashed

    def forward(self, tokens: Tensor) -> Tensor:
        return self.scale.to(torch.float32) * self.projection(self.table(self.bucket_ids(tokens)))


class ValueEmbedding(nn.Module):
    """#549's value embeddings: one table of VE_DIM per token, projected to the key/value width
    and added to v in the VE_LAYERS blocks (each with its own scale): token identity reaches the
    late layers' values directly instead of through ten layers of residual stream."""

    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.table = nn.Embedding(hp.vocab_size, hp.ve_dim)
        nn.init.normal_(self.table.weight, std=0.01)
        self.projection = CastedLinear(hp.ve_dim, hp.num_kv_heads * hp.head_dim, zero_init=True)
        self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, kv_dim)
        return self.scale.to(torch.float32) * self.projection(self.table(tokens))


class SmearGate(nn.Module):
    """x_t <- (1 - g) * x_t + g * x_{t-1} with a learned per-channel gate g = sigmoid(w): the
    cheapest way to let every position see its predecessor before the first attention layer.
    With BOS_SMEAR_FIX a document's BOS takes nothing from the previous document's last token
    (#1855 found that leak in packed streams)."""

    def __init__(self, model_dim: int, bos_id: int = -1):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(model_dim))
        self.bos_id = bos_id

    def forward(self, x: Tensor, tokens: Tensor, token_mask: Tensor | None = None) -> Tensor:
        g = torch.sigmoid(self.gate).to(x.dtype)  # (D,)
        previous = F.pad(x[:, :-1], (0, 0, 1, 0))
        if self.bos_id >= 0:
            starts = tokens == self.bos_id  # (B, T)
            if token_mask is not None:
                # A masked BOS must look like any masked token, or the gate would reveal it.
                starts = starts & ~token_mask
            g = g * (~starts).unsqueeze(-1).to(x.dtype)  # (B, T, D)
        return (1 - g) * x + g * previous


class GPT(nn.Module):
    """The backbone: embeddings, U-Net-connected blocks, tied output head. forward() returns the
    cross-entropy of the rows that have targets and, when asked, the output of one block (the
    features the JEPA projections read).

    Depth recurrence (LOOP_LAYERS): once `looping` is switched on, the blocks of LOOP_LAYERS run
    LOOP_COUNT more times in a row, with the same weights. U-Net skips pair blocks, not passes:
    decoder block num_layers - 1 - i adds the latest output of encoder block i, so loops add
    compute but no parameter."""

    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.logit_softcap = hp.logit_softcap
        self.token_embedding = nn.Embedding(hp.vocab_size, hp.model_dim)
        nn.init.normal_(self.token_embedding.weight, std=hp.tied_embed_init_std)
        self.bigram = BigramHash(hp) if hp.bigram_vocab_size > 0 else None
        self.smear = SmearGate(hp.model_dim, hp.bos_id if hp.bos_smear_fix else -1) if hp.smear_gate else None
        self.value_embedding = ValueEmbedding(hp) if hp.value_embedding_layers else None
        self.blocks = nn.ModuleList([Block(hp, index) for index in range(hp.num_layers)])
        # U-Net: the outputs of the first half are added into the second half in reverse order.
        self.num_encoder_blocks = hp.num_layers // 2
        num_skips = min(self.num_encoder_blocks, hp.num_layers - self.num_encoder_blocks)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, hp.model_dim))
        # Gated skips (#1855): x <- g * x + (1 - g) * w * skip, g = sigmoid(gate) = 0.5 at init.
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, hp.model_dim)) if hp.skip_gates else None
        self.loop_layers = hp.loop_layer_range
        self.loop_count = hp.loop_count
        self.looping = False  # switched on at LOOP_START_FRACTION of training (and for evaluation)
        if hp.ortho_init:
            self._orthogonal_init(hp.num_layers)

    def _orthogonal_init(self, num_layers: int) -> None:
        """The records' init: every linear layer that does not start at zero and has both sides
        of at least 64 gets an orthogonal matrix (gain 1), which keeps every direction of its
        input at the same scale; the projections of the side embeddings (BigramHash, VE) are
        then scaled by 1 / sqrt(2 * num_layers), as the 1.1233 record did, so they enter softly."""
        side_projections = {id(module.projection) for module in (self.bigram, self.value_embedding) if module}
        for module in self.modules():
            if isinstance(module, CastedLinear) and min(module.weight.shape) >= 64:
                if module.zero_init and id(module) not in side_projections:
                    continue
                with torch.no_grad():
                    nn.init.orthogonal_(module.weight, gain=1.0)
                    if id(module) in side_projections:
                        module.weight.mul_(1.0 / math.sqrt(2 * num_layers))

    def layer_order(self) -> list[int]:
        """The blocks in the order they run: 0..L-1, with LOOP_LAYERS repeated when looping."""
        order = list(range(len(self.blocks)))
        if self.looping and self.loop_layers is not None and self.loop_count > 0:
            first, last = self.loop_layers
            order = order[:last + 1] + list(range(first, last + 1)) * self.loop_count + order[last + 1:]
        return order

    def embed(self, input_ids: Tensor, token_mask: Tensor | None = None,
              mask_embedding: Tensor | None = None) -> Tensor:
        """x0 of the blocks. With token_mask (span JEPA), masked positions get mask_embedding
        and no BigramHash, and the position after each span no BigramHash either: its hash
        would reveal the masked token before it."""
        x = self.token_embedding(input_ids)
        if token_mask is not None:
            x = torch.where(token_mask.unsqueeze(-1), mask_embedding.to(x.dtype), x)
        if self.bigram is not None:
            bigram = self.bigram(input_ids)
            if token_mask is not None:
                revealed = token_mask | F.pad(token_mask[:, :-1], (1, 0))
                bigram = bigram.masked_fill(revealed.unsqueeze(-1), 0.0)
            x = x + bigram.to(x.dtype)
        x = rms_norm(x)
        if self.smear is not None:
            x = self.smear(x, input_ids, token_mask)
        return x

    def _run_block(self, index: int, x: Tensor, x0: Tensor, skips: dict[int, Tensor],
                   value_embedding: Tensor | None) -> Tensor:
        decoder_index = index - self.num_encoder_blocks
        partner = self.num_encoder_blocks - 1 - decoder_index
        if 0 <= decoder_index < self.skip_weights.size(0) and partner in skips:
            skip = self.skip_weights[decoder_index].to(x.dtype) * skips[partner]
            if self.skip_gates is not None:
                gate = torch.sigmoid(self.skip_gates[decoder_index]).to(x.dtype)
                x = gate * x + (1 - gate) * skip
            else:
                x = x + skip
        x = self.blocks[index](x, x0, value_embedding)
        if index < self.num_encoder_blocks:
            skips[index] = x
        return x

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        target_ids: Tensor | None = None,  # (B_ce, T): CE over the first B_ce rows of input_ids
        feature_layer: int | None = None,  # return the output of this block (its last pass) as well
        token_mask: Tensor | None = None,  # (B, T) bool: span-JEPA context rows
        mask_embedding: Tensor | None = None,
        grad_blocks: int | None = None,  # features carry gradient only into the last this-many block passes
        reduction: str = "mean",  # "none": per-token losses (B_ce, T) for evaluation
        last_layer: int | None = None,  # stop after this block's last pass (target encoders need no more)
    ) -> tuple[Tensor | None, Tensor | None]:
        x0 = self.embed(input_ids, token_mask, mask_embedding)
        value_embedding = None
        if self.value_embedding is not None:
            value_embedding = self.value_embedding(input_ids)
            if token_mask is not None:  # a masked token's value embedding would reveal it
                value_embedding = value_embedding.masked_fill(token_mask.unsqueeze(-1), 0.0)
        order = self.layer_order()
        feature_position = None if feature_layer is None else max(p for p, i in enumerate(order) if i == feature_layer)
        final_position = len(order) - 1 if last_layer is None else max(p for p, i in enumerate(order) if i == last_layer)
        cut_position = None
        if grad_blocks is not None and feature_position is not None:
            cut_position = max(feature_position - grad_blocks + 1, 0)
        x, skips = x0, {}
        features: Tensor | None = None
        saved: tuple[Tensor, Tensor, dict[int, Tensor]] | None = None
        for position in range(final_position + 1):
            if position == cut_position:
                saved = (x.detach(), x0.detach(), {key: skip.detach() for key, skip in skips.items()})
            x = self._run_block(order[position], x, x0, skips, value_embedding)
            if position == feature_position:
                features = x
        if saved is not None:
            # JEPA_GRAD_LAYERS: recompute the last block passes up to the features from detached
            # inputs, so the JEPA loss trains only those blocks while CE still trains all of them.
            x_cut, x0_cut, skips_cut = saved
            ve_cut = value_embedding.detach() if value_embedding is not None else None
            for position in range(cut_position, feature_position + 1):
                x_cut = self._run_block(order[position], x_cut, x0_cut, skips_cut, ve_cut)
            features = x_cut
        if target_ids is None:
            return None, features
        logits = self.output_logits(x[: target_ids.size(0)])
        losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction=reduction)
        if reduction == "none":
            losses = losses.view_as(target_ids)
        return losses, features

    def output_logits(self, hidden: Tensor) -> Tensor:
        """Final RMSNorm, the tied output head, then the soft cap: cap * tanh(logits / cap)."""
        logits = F.linear(rms_norm(hidden), self.token_embedding.weight.to(hidden.dtype))
        return self.logit_softcap * torch.tanh(logits.float() / self.logit_softcap)

    def logits(self, input_ids: Tensor) -> Tensor:  # (B, T) -> (B, T, vocab)
        _, hidden = self(input_ids, feature_layer=len(self.blocks) - 1)
        return self.output_logits(hidden)


def set_late_qat(model: nn.Module, bits: int) -> None:
    """Late QAT on (bits = MATRIX_BITS) or off (0) for every matrix the exporter quantises."""
    for module in model.modules():
        if isinstance(module, CastedLinear):
            module.qat_bits = bits


def set_looping(models: list[nn.Module | None], on: bool) -> None:
    """Depth recurrence on or off, for the online model and its target encoder alike."""
    for model in models:
        if model is not None:
            model.looping = on


def apply_model_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """The records' bf16 model: embedding tables in bf16 (so the residual stream is bf16 from its
    first add), every linear weight and control tensor kept in fp32 for the optimizer."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.to(dtype)


# =============================================================================
# JEPA: projections, predictors, target encoder, losses, anti-collapse
# =============================================================================
# h: block output (B, T, D); z = projection(rmsnorm(h)): latents (B, T, D_LATENT).
# The predictor maps context latents to the target latents the mode asks for; the target side
# is computed from the EMA target encoder (or the online encoder under stop-gradient) and passed
# through a trained target projection, which the regulariser keeps from collapsing.
# nextlat and stp skip the latents and work on the normalised hidden states themselves: nextlat
# (NextLatTransition) predicts h[t+1] from h[t] and the next token, stp keeps h's trajectory
# locally straight (sample_tube_triples, tube_cosines); neither has a target encoder.
# Evaluation is plain next-token prediction: none of these modules is exported, except the head
# (projections and predictors, never the target encoder) for TTT_OBJECTIVE=ce+jepa, which
# only test-time training reads.


class LatentPredictor(nn.Module):
    """Residual MLP in latent space; it starts as the identity (zero-initialised output)."""

    def __init__(self, latent_dim: int, hidden_dim: int):
        super().__init__()
        self.expand = CastedLinear(latent_dim, hidden_dim)
        self.contract = CastedLinear(hidden_dim, latent_dim, zero_init=True)

    def forward(self, z: Tensor) -> Tensor:
        return z + self.contract(F.leaky_relu(self.expand(rms_norm(z)), negative_slope=0.5).square())


class NextLatTransition(nn.Module):
    """NextLat's latent transition model (arXiv 2511.05963): from the current final hidden state
    and the next token's embedding, the next final hidden state,
        h_hat[t+1] = h[t] + MLP(LN([h[t]; e(x[t+1])])),
    a 3-layer GELU MLP whose last layer starts at zero, so the model starts as "the state does
    not move" and the first gradients say how it should. Training-only: never exported."""

    def __init__(self, model_dim: int, hidden_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(2 * model_dim)
        self.fc_in = CastedLinear(2 * model_dim, hidden_dim)
        self.fc_hidden = CastedLinear(hidden_dim, hidden_dim)
        self.fc_out = CastedLinear(hidden_dim, model_dim, zero_init=True)

    def forward(self, hidden: Tensor, next_embedding: Tensor) -> Tensor:  # (B, T', D), (B, T', D) -> (B, T', D)
        x = self.norm(torch.cat([hidden, next_embedding.to(hidden.dtype)], dim=-1))  # (B, T', 2D)
        return hidden + self.fc_out(F.gelu(self.fc_hidden(F.gelu(self.fc_in(x)))))


def frozen_head_logits(hidden: Tensor, embedding_weight: Tensor, softcap: float) -> Tensor:
    """The output head after the final RMSNorm, as GPT.output_logits applies it (tied table, then
    cap * tanh(logits / cap)), with its weights detached: a loss through it trains what produced
    `hidden`, never the head. (B, T', D) -> (B, T', V) fp32."""
    logits = F.linear(hidden, embedding_weight.detach().to(hidden.dtype))
    return softcap * torch.tanh(logits.float() / softcap)


def row_moments(z: Tensor, row_weights: Tensor | None) -> tuple[Tensor, Tensor | float]:
    """Rows centred on their (weighted) mean, and the unbiased divisor (rows - 1). row_weights
    (N,) of 0/1 select rows without indexing: shapes stay fixed, so a compiled graph needs no
    data-dependent size and the GPU no sync. Excluded rows come back as zeros."""
    if row_weights is None:
        return z - z.mean(dim=0), max(z.size(0) - 1, 1)
    weights = row_weights.unsqueeze(-1)
    count = row_weights.sum()
    mean = (z * weights).sum(dim=0) / count.clamp_min(1.0)
    return (z - mean) * weights, (count - 1.0).clamp_min(1.0)


def weighted_row_mean(values: Tensor, row_weights: Tensor | None) -> Tensor:
    """Mean over dim 0 of values (N, ...), counting only rows of weight 1 when weights are given."""
    if row_weights is None:
        return values.mean(dim=0)
    weights = row_weights.reshape(-1, *([1] * (values.dim() - 1)))
    return (values * weights).sum(dim=0) / row_weights.sum().clamp_min(1.0)


def vicreg_terms(z: Tensor, row_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """VICReg's variance hinge (each dim's std >= 1) and off-diagonal covariance penalty."""
    centred, divisor = row_moments(z.float().reshape(-1, z.size(-1)), row_weights)
    std = torch.sqrt(centred.square().sum(dim=0) / divisor + 1e-4)
    variance_loss = F.relu(1.0 - std).mean()
    covariance = (centred.T @ centred) / divisor
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    covariance_loss = off_diagonal.square().sum() / z.size(-1)
    return variance_loss, covariance_loss


def sigreg_loss(z: Tensor, directions: Tensor, row_weights: Tensor | None = None, max_rows: int = 0) -> Tensor:
    """SIGReg (LeJEPA): project the latents on random unit directions and measure, with the
    Epps-Pulley statistic, how far each 1-D distribution is from N(0, 1): the mean over
    directions of the integral of |empirical characteristic function - exp(-t^2/2)|^2 weighted
    by exp(-t^2/2). Zero exactly for isotropic standard-normal latents.

    Its (rows, slices, knots) tensors grow with the rows: at 11L with three JEPA offsets a rank's
    ~300k rows would need ~7 GB. With max_rows > 0 it reads every k-th row (k = ceil(rows /
    max_rows)): a statistic of a distribution needs a sample, not every token, and a fixed
    stride keeps the shape static for the compiled graph (spread over the batch, unlike a prefix)."""
    rows = z.float().reshape(-1, z.size(-1))
    if 0 < max_rows < rows.size(0):
        stride = -(-rows.size(0) // max_rows)
        rows = rows[::stride]
        row_weights = None if row_weights is None else row_weights[::stride]
    projected = rows @ directions  # (N, slices)
    t = torch.linspace(0.0, 4.0, 17, device=z.device)  # even integrand: integrate on [0, 4], double
    angles = projected.unsqueeze(-1) * t  # (N, slices, knots)
    real = weighted_row_mean(torch.cos(angles), row_weights)
    imaginary = weighted_row_mean(torch.sin(angles), row_weights)
    gaussian = torch.exp(-0.5 * t.square())
    integrand = ((real - gaussian).square() + imaginary.square()) * gaussian
    return 2.0 * torch.trapezoid(integrand, t, dim=-1).mean()


def draw_sigreg_directions(hp: Hyperparameters, generator: torch.Generator, device: torch.device) -> Tensor:
    """SIGREG_SLICES random unit directions in the latent space (columns)."""
    directions = torch.randn(hp.d_latent, hp.sigreg_slices, generator=generator)
    return F.normalize(directions, dim=0).to(device, non_blocking=True)


def effective_rank(z: Tensor, max_rows: int = 4096) -> Tensor:
    """exp(entropy of the normalised singular values): 1 for a collapsed latent, D for a full one."""
    z = z.detach().float().reshape(-1, z.size(-1))[:max_rows]
    singular_values = torch.linalg.svdvals(z - z.mean(dim=0))
    p = singular_values / singular_values.sum().clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


# Order of the JEPA loss sums accumulated on the device every step (read only on log steps).
JEPA_LOSS_NAMES = ("jepa_loss", "reg_loss")
# Diagnostics computed on log steps only, from the last micro-batch, with the training clock paused.
JEPA_DIAGNOSTIC_NAMES = ("reg_other", "pred_std_mean", "pred_std_min", "tgt_std_mean", "tgt_std_min", "tgt_rank")
NEXTLAT_DIAGNOSTIC_NAMES = ("nextlat_smooth_l1", "nextlat_kl")  # nextlat's diagnostics instead (no latents)
STP_DIAGNOSTIC_NAMES = ("stp_cos", "stp_valid")  # stp's: mean cos of the valid triples, share of valid triples


class JepaHead(nn.Module):
    """ctx_proj, tgt_proj, one predictor per horizon (next mode) and the span mask embedding; in
    nextlat mode the transition model instead, in stp mode nothing at all (its loss has no
    parameter). forward() turns context and target features into the two losses backward needs,
    nothing more: a JEPA step pays only for JEPA. diagnostics() computes what the log line shows
    besides."""

    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.mode = hp.jepa_mode
        self.loss_kind = hp.jepa_loss
        self.offsets = hp.jepa_offset_list if hp.jepa_mode == "next" else [0]
        weights = [hp.jepa_offset_decay ** i for i in range(len(self.offsets))]
        self.offset_weights = [w / sum(weights) for w in weights]
        self.chunk = hp.jepa_chunk
        self.anti_collapse = hp.anti_collapse
        self.regularised_side = hp.regularised_side
        self.var_weight, self.cov_weight = hp.vicreg_var_weight, hp.vicreg_cov_weight
        self.sigreg_weight = hp.sigreg_weight
        self.sigreg_max_rows = hp.sigreg_max_rows
        if hp.jepa_uses_latents:
            self.context_projection = CastedLinear(hp.model_dim, hp.d_latent)
            self.target_projection = CastedLinear(hp.model_dim, hp.d_latent)
            hidden = int(hp.jepa_pred_mult * hp.d_latent)
            self.predictors = nn.ModuleList([LatentPredictor(hp.d_latent, hidden) for _ in self.offsets])
        # nextlat and stp read the final hidden state (and the tokens, for teacher forcing and
        # document boundaries); only nextlat has a trained part.
        self.transition = (NextLatTransition(hp.model_dim, hp.nextlat_hidden or hp.model_dim)
                           if hp.jepa_mode == "nextlat" else None)
        self.nextlat_weights = (hp.nextlat_smooth_l1_weight, hp.nextlat_kl_weight)
        self.rollout = hp.nextlat_rollout
        self.logit_softcap = hp.logit_softcap
        self.bos_id = hp.bos_id
        # The learned embedding that replaces masked tokens in span mode (I-JEPA's mask token).
        self.mask_embedding = nn.Parameter(torch.zeros(hp.model_dim)) if hp.jepa_mode == "span" else None

    def _prediction_loss(self, prediction: Tensor, target: Tensor, row_weights: Tensor | None) -> Tensor:
        prediction = prediction.float().reshape(-1, prediction.size(-1))
        target = target.float().reshape(-1, target.size(-1))
        if self.loss_kind == "cosine":
            per_row = 1.0 - F.cosine_similarity(prediction, target, dim=-1)
        else:
            per_row = (prediction - target).square().mean(dim=-1)
        return weighted_row_mean(per_row, row_weights)

    def _regulariser(self, z: Tensor, sigreg_directions: Tensor | None, row_weights: Tensor | None) -> Tensor:
        if self.anti_collapse == "vicreg":
            variance_loss, covariance_loss = vicreg_terms(z, row_weights)
            return self.var_weight * variance_loss + self.cov_weight * covariance_loss
        if self.anti_collapse == "sigreg":
            return self.sigreg_weight * sigreg_loss(z, sigreg_directions, row_weights, self.sigreg_max_rows)
        return z.new_zeros(())

    @staticmethod
    def _latent_std(z: Tensor, row_weights: Tensor | None) -> Tensor:  # (N, L) -> (L,) unbiased std
        centred, divisor = row_moments(z, row_weights)
        return torch.sqrt(centred.square().sum(dim=0) / divisor)

    @staticmethod
    def _rows(latents: list[Tensor]) -> Tensor:  # [(B, T', L), ...] -> (rows, L) fp32
        """One side's latents as the matrix a regulariser or a statistic reads."""
        return torch.cat([z.reshape(-1, z.size(-1)) for z in latents]).float()

    def _latents(
        self, context_features: Tensor, target_features: Tensor, span_mask: Tensor | None,
    ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor | None]:
        """Per horizon, the predictions and the targets they regress; the target latents z_tgt
        (B, T, L); and the 0/1 row weights of span mode (None elsewhere)."""
        z_context = self.context_projection(rms_norm(context_features))
        z_target = self.target_projection(rms_norm(target_features))
        predictions: list[Tensor] = []
        targets: list[Tensor] = []
        # Span mode scores only masked positions: as 0/1 row weights over every position rather
        # than by boolean indexing, whose data-dependent size would stall the GPU every step.
        row_weights: Tensor | None = None
        if self.mode == "next":  # predictor_k(z_ctx[t]) -> z_tgt[t + k]
            length = z_context.size(1)
            for offset, predictor in zip(self.offsets, self.predictors):
                predictions.append(predictor(z_context[:, :length - offset]))
                targets.append(z_target[:, offset:])
        elif self.mode == "chunk":  # predictor(z_ctx[t]) -> mean(z_tgt[t+1 .. t+C])
            c = self.chunk
            cumulative = F.pad(z_target.float().cumsum(dim=1), (0, 0, 1, 0))  # (B, T+1, L)
            chunk_means = (cumulative[:, c + 1:] - cumulative[:, 1:-c]) / c  # t = 0 .. T-C-1
            predictions.append(self.predictors[0](z_context[:, :chunk_means.size(1)]))
            targets.append(chunk_means)
        else:  # span: predictor(z_ctx[t]) -> z_tgt[t] at masked positions t
            predictions.append(self.predictors[0](z_context))
            targets.append(z_target)
            row_weights = span_mask.reshape(-1).float()
        return predictions, targets, z_target, row_weights

    def nextlat_rollout(self, hidden: Tensor, input_ids: Tensor, table: Tensor) -> list[tuple[Tensor, Tensor]]:
        """NextLat's teacher-forced rollout over every position at once: for depth k = 1 ..
        NEXTLAT_ROLLOUT, h_hat[t+k] = transition(h_hat[t+k-1], e(x[t+k])) with h_hat[t] = h[t],
        for t = 0 .. T-1-k. Returns per depth the predictions (B, T-k, D) and the pairs' 0/1
        validity (B, T-k): a pair is void when any of x[t+1..t+k] is a BOS (a new document
        starts there: its state is not a transition of the previous one).

        e(x) is the tied table's row, detached: that table is also the output head, which the
        KL below keeps frozen, and a NextLat gradient through e would move the head by the back
        door. It enters RMS-normalised, as the backbone normalises its own input embedding: the
        raw rows (init std TIED_EMBED_INIT_STD) are ~100x smaller than h, and the LayerNorm over
        [h; e] would barely see them."""
        next_embedding = rms_norm(F.embedding(input_ids, table.detach()))  # (B, T, D): e(x[t]) at t
        starts_no_document = input_ids != self.bos_id  # (B, T)
        prediction, valid = hidden, torch.ones_like(starts_no_document)
        steps = []
        for depth in range(1, self.rollout + 1):
            prediction = self.transition(prediction[:, :-1], next_embedding[:, depth:])  # (B, T-depth, D)
            valid = valid[:, :-1] & starts_no_document[:, depth:]
            steps.append((prediction, valid))
        return steps

    def _nextlat_terms(self, context_features: Tensor, target_features: Tensor, input_ids: Tensor,
                       embedding_weight: Tensor) -> tuple[Tensor, Tensor]:
        """NextLat's two terms (arXiv 2511.05963), each averaged over the valid pairs and then over
        the rollout depths k:
            SmoothL1(h_hat[t+k], sg h[t+k])  and  KL(softmax(head(sg h[t+k])) || softmax(head(h_hat[t+k]))),
        the head being the frozen output head (logit softcap included). The KL trains the
        transition model and, through h[t], the backbone; the head never."""
        hidden = rms_norm(context_features)  # (B, T, D): h, the state the output head reads
        target = rms_norm(target_features).detach()  # sg h: the online model's own states
        # The target distributions of every depth: one (B, T-1, V) pass over sg h[1..T-1].
        target_logits = frozen_head_logits(target[:, 1:], embedding_weight, self.logit_softcap)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            target_log_probs = F.log_softmax(target_logits, dim=-1)
        smooth_l1_terms, kl_terms = [], []
        for depth, (prediction, valid) in enumerate(self.nextlat_rollout(hidden, input_ids, embedding_weight), 1):
            predicted_logits = frozen_head_logits(prediction, embedding_weight, self.logit_softcap)  # (B, T-depth, V)
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                pair_weights = valid.reshape(-1).float()
                smooth_l1 = F.smooth_l1_loss(prediction.float(), target[:, depth:].float(), reduction="none").mean(-1)
                kl = F.kl_div(F.log_softmax(predicted_logits, dim=-1), target_log_probs[:, depth - 1:],
                              log_target=True, reduction="none").sum(-1)  # (B, T-depth): KL(target || prediction)
                smooth_l1_terms.append(weighted_row_mean(smooth_l1.reshape(-1), pair_weights))
                kl_terms.append(weighted_row_mean(kl.reshape(-1), pair_weights))
        return sum(smooth_l1_terms) / self.rollout, sum(kl_terms) / self.rollout

    def _tube_cosines(self, context_features: Tensor, input_ids: Tensor, tube_draws: Tensor) -> tuple[Tensor, Tensor]:
        """STP's cos(h[t] - h[r], h[r] - h[s]) (B, K) on the normalised states of JEPA_LAYER (the
        last block by default: the paper's last hidden state, after the final norm), and the
        triples' 0/1 weights (B, K)."""
        triples, weights = sample_tube_triples(input_ids, tube_draws, self.bos_id)
        with torch.autocast(device_type=context_features.device.type, enabled=False):
            return tube_cosines(rms_norm(context_features.float()), triples), weights

    def forward(
        self,
        context_features: Tensor,  # (B, T, D) online block output (span mode: the masked pass)
        target_features: Tensor,  # (B, T, D) target encoder output, already without gradient
        span_mask: Tensor | None = None,  # (B, T) bool, span mode only
        sigreg_directions: Tensor | None = None,  # (D_LATENT, slices) unit columns, sigreg only
        input_ids: Tensor | None = None,  # (B, T) nextlat and stp: the rows' tokens
        embedding_weight: Tensor | None = None,  # (V, D) nextlat: the tied table (read detached)
        tube_draws: Tensor | None = None,  # (B, STP_TRIPLES, 4) stp: uniforms of the run's generator
    ) -> tuple[Tensor, Tensor]:
        """The prediction loss and the anti-collapse loss of the regularised side (nextlat and
        stp have no regulariser: 0)."""
        if self.mode == "nextlat":
            # NextLat (arXiv 2511.05963): L = L_CE + lambda_h * SmoothL1(h_hat[t+1], sg h[t+1])
            #   + lambda_KL * KL(p(. | sg h[t+1]) || p(. | h_hat[t+1])), both lambdas 1 in the paper; the
            # trainer adds JEPA_WEIGHT * (this) to CE, as for every mode.
            smooth_l1, kl = self._nextlat_terms(context_features, target_features, input_ids, embedding_weight)
            loss = self.nextlat_weights[0] * smooth_l1 + self.nextlat_weights[1] * kl
            return loss, loss.new_zeros(())
        if self.mode == "stp":
            # Semantic Tube Prediction (arXiv 2602.22617): L_STP = 1 - cos(h[t] - h[r], h[r] - h[s])
            # for s < r < t in one document: the trajectory kept locally straight, no predictor.
            cosines, weights = self._tube_cosines(context_features, input_ids, tube_draws)
            loss = weighted_row_mean((1.0 - cosines).reshape(-1), weights.reshape(-1))
            return loss, loss.new_zeros(())
        predictions, targets, z_target, row_weights = self._latents(context_features, target_features, span_mask)
        # Losses and regularisers in fp32 with autocast off: a covariance summed over many rows
        # and SIGReg's characteristic function need more than bf16's 8 bits of mantissa.
        with torch.autocast(device_type=context_features.device.type, enabled=False):
            prediction_loss = sum(w * self._prediction_loss(p, t, row_weights)
                                  for w, p, t in zip(self.offset_weights, predictions, targets))
            if self.anti_collapse == "none":
                return prediction_loss, prediction_loss.new_zeros(())
            # Only the regularised side is assembled here; the other is diagnostics' business.
            regularised = self._rows([z_target] if self.regularised_side == "target" else predictions)
            regulariser_loss = self._regulariser(regularised, sigreg_directions, row_weights)
        return prediction_loss, regulariser_loss

    @torch.no_grad()
    def diagnostics(
        self, context_features: Tensor, target_features: Tensor, span_mask: Tensor | None = None,
        sigreg_directions: Tensor | None = None, input_ids: Tensor | None = None,
        embedding_weight: Tensor | None = None, tube_draws: Tensor | None = None,
    ) -> dict[str, float]:
        """The other side's regulariser (what it would be if it were the regularised one), the
        latent std (mean and min over dims) of both sides and the effective rank of z_tgt: the
        signs of collapse. nextlat has no latents: its two terms, unweighted; stp: the mean
        cosine of its valid triples and the share of triples that found a document of 3+
        positions. Log steps only; one host sync for the whole set."""
        if self.mode == "nextlat":
            terms = torch.stack(self._nextlat_terms(context_features, target_features, input_ids, embedding_weight))
            return dict(zip(NEXTLAT_DIAGNOSTIC_NAMES, terms.tolist()))
        if self.mode == "stp":
            cosines, weights = self._tube_cosines(context_features, input_ids, tube_draws)
            values = torch.stack([weighted_row_mean(cosines.reshape(-1), weights.reshape(-1)), weights.mean()])
            return dict(zip(STP_DIAGNOSTIC_NAMES, values.tolist()))
        predictions, _, z_target, row_weights = self._latents(context_features, target_features, span_mask)
        with torch.autocast(device_type=context_features.device.type, enabled=False):
            prediction_latents, target_latents = self._rows(predictions), self._rows([z_target])
            other = prediction_latents if self.regularised_side == "target" else target_latents
            prediction_std = self._latent_std(prediction_latents, row_weights)
            target_std = self._latent_std(target_latents, row_weights)
            values = torch.stack([
                self._regulariser(other, sigreg_directions, row_weights),
                prediction_std.mean(), prediction_std.min(), target_std.mean(), target_std.min(),
                effective_rank(target_latents),
            ])
        return dict(zip(JEPA_DIAGNOSTIC_NAMES, values.tolist()))


def sample_spans(batch: int, length: int, hp: Hyperparameters, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """JEPA_NUM_SPANS non-overlapping spans per row: lengths ~ Geometric(mean JEPA_SPAN_MEAN)
    clamped to [JEPA_SPAN_MIN, T / (2 * spans)]; the free space before each span is a sorted
    uniform draw in [0, T - total length], and the spans are laid out in order after it, so
    they may touch but never overlap and always end inside the row. Returns (starts, lengths),
    each (batch, spans) int64 on the CPU."""
    spans = hp.jepa_num_spans
    longest = length // (2 * spans)
    success = 1.0 / hp.jepa_span_mean
    uniform = torch.rand(batch, spans, generator=generator).clamp_min(1e-12)
    if success >= 1.0:
        lengths = torch.ones(batch, spans, dtype=torch.int64)
    else:  # inverse CDF of the geometric distribution on {1, 2, ...}
        lengths = (torch.floor(torch.log(uniform) / math.log(1.0 - success)) + 1).to(torch.int64)
    lengths = lengths.clamp(hp.jepa_span_min, longest)
    free = length - lengths.sum(dim=1, keepdim=True)  # >= T / 2 thanks to the clamp
    gaps = torch.sort((torch.rand(batch, spans, generator=generator) * (free + 1)).floor().to(torch.int64), dim=1).values
    starts = gaps + F.pad(lengths.cumsum(dim=1)[:, :-1], (1, 0))
    return starts, lengths


def spans_to_mask(starts: Tensor, lengths: Tensor, length: int) -> Tensor:  # -> (batch, T) bool
    positions = torch.arange(length)
    inside = (positions >= starts.unsqueeze(-1)) & (positions < (starts + lengths).unsqueeze(-1))
    return inside.any(dim=1)


def draw_tube_uniforms(rows: int, hp: Hyperparameters, generator: torch.Generator) -> Tensor:  # (rows, K, 4) CPU
    """stp's random numbers for one micro-batch, from the run's seeded generator (the one span
    masks use): arms with the same SEED draw the same triples. Four uniforms per triple: the
    anchor position and the three offsets sample_tube_triples turns them into on the device."""
    return torch.rand(rows, hp.stp_triples, 4, generator=generator)


def sample_tube_triples(input_ids: Tensor, draws: Tensor, bos_id: int) -> tuple[Tensor, Tensor]:
    """STP's triples: positions s < r < t inside one document (no BOS in s+1..t), uniform over
    the 3-subsets of the document of a uniformly drawn anchor position, so a document gets
    triples in proportion to its length, as its tokens get CE. All on the device with fixed
    shapes (no host sync): a document with fewer than 3 positions in the row gives a triple of
    weight 0. input_ids (B, T), draws (B, K, 4) in [0, 1). Returns the triples (B, K, 3), sorted,
    and their 0/1 weights (B, K)."""
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    starts_document = input_ids == bos_id  # (B, T)
    # The document of position p runs from the last BOS at or before p (or the row's start) to
    # just before the first BOS after p (or the row's end).
    document_start = torch.where(starts_document, positions, 0).cummax(dim=1).values
    next_start = torch.where(starts_document, positions, length).flip(1).cummin(dim=1).values.flip(1)  # first BOS >= p
    document_end = F.pad(next_start[:, 1:], (0, 1), value=length)  # first BOS > p: one past the document
    anchor = (draws[..., 0] * length).long().clamp_max(length - 1)  # (B, K)
    start = document_start.gather(1, anchor)
    size = document_end.gather(1, anchor) - start  # (B, K): positions in the anchor's document
    weights = (size >= 3).float()
    size = size.clamp_min(3)

    def uniform_below(uniform: Tensor, bound: Tensor) -> Tensor:  # an integer in [0, bound)
        return (uniform * bound).long().minimum(bound - 1)

    # Three distinct offsets: each drawn from the positions not yet taken (a range one smaller
    # each time), then stepped over the offsets already taken, in increasing order.
    first = uniform_below(draws[..., 1], size)
    second = uniform_below(draws[..., 2], size - 1)
    second = second + (second >= first).long()
    low, high = torch.minimum(first, second), torch.maximum(first, second)
    third = uniform_below(draws[..., 3], size - 2)
    third = third + (third >= low).long()
    third = third + (third >= high).long()
    offsets = torch.sort(torch.stack([first, second, third], dim=-1), dim=-1).values  # (B, K, 3)
    return (start.unsqueeze(-1) + offsets).clamp_max(length - 1), weights


def tube_cosines(hidden: Tensor, triples: Tensor) -> Tensor:  # (B, T, D), (B, K, 3) -> (B, K)
    """cos(h[t] - h[r], h[r] - h[s]) of each triple (s, r, t): 1 when the three states lie on a
    straight line in order, the semantic tube's local linearity."""
    batch, count, _ = triples.shape
    picked = hidden.gather(1, triples.reshape(batch, count * 3, 1).expand(-1, -1, hidden.size(-1)))
    h_s, h_r, h_t = picked.view(batch, count, 3, hidden.size(-1)).unbind(dim=2)  # (B, K, D) each
    return F.cosine_similarity(h_t - h_r, h_r - h_s, dim=-1)


@torch.no_grad()
def ema_update(ema_tensors: list[Tensor], online_tensors: list[Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * online, as one foreach kernel over all tensors, in each
    average's own dtype (an fp32 average of bf16 embedding tables reads them as fp32)."""
    online_tensors = [online if online.dtype == ema.dtype else online.to(ema.dtype)
                      for ema, online in zip(ema_tensors, online_tensors)]
    torch._foreach_lerp_(ema_tensors, online_tensors, 1.0 - decay)


# =============================================================================
# OPTIMIZERS: Muon for matrices, AdamW for the rest, the schedule
# =============================================================================
# Muon (github.com/KellerJordan/Muon) replaces each matrix's momentum by the nearest
# orthogonal matrix, computed with a few Newton-Schulz iterations: every direction of the
# update gets the same size, which trains transformers' matrices faster than Adam.


# Muon's quintic: one (a, b, c) for every iteration; it pushes all singular values into
# ~[0.7, 1.2] in 5 steps.
QUINTIC_COEFFICIENTS = ((3.4445, -4.7750, 2.0315),)
# Polar Express (Amsel et al. 2025; records #1344, #1787): a different optimal quintic per
# iteration, which lands closer to 1 in the same 5 steps. Longer runs repeat the last one.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NEWTON_SCHULZ_KINDS = {"quintic": QUINTIC_COEFFICIENTS, "polar": POLAR_EXPRESS_COEFFICIENTS}


def newton_schulz_orthogonalize(matrix: Tensor, steps: int, kind: str = "quintic", eps: float = 1e-7) -> Tensor:
    """Approximate U @ V^T of matrix = U S V^T with a quintic Newton-Schulz iteration."""
    coefficients = NEWTON_SCHULZ_KINDS[kind]
    x = matrix.to(torch.bfloat16 if matrix.is_cuda else torch.float32)
    # The Frobenius norm bounds the spectral norm: every singular value starts at most 1.
    x = x / (x.norm() + eps)
    transposed = x.size(0) > x.size(1)
    if transposed:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    for iteration in range(steps):
        a, b, c = coefficients[min(iteration, len(coefficients) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Momentum + orthogonalisation for 2-D parameters, with the work split across ranks:
    rank r orthogonalises parameters r, r+W, r+2W, ... and one all-reduce shares the updates."""

    def __init__(self, params: list[Tensor], lr: float, momentum: float, backend_steps: int,
                 weight_decay: float, rank: int = 0, world_size: int = 1, kind: str = "quintic",
                 compiled: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay))
        self.rank = rank
        self.world_size = world_size
        self.kind = kind
        # Compiled on CUDA, as the records do: the iteration's matmuls fuse with their
        # elementwise parts (graphs per matrix shape, made during compile priming). The CPU
        # skips it: inductor's compile time there outweighs any gain at the CPU's model sizes.
        self.orthogonalize = torch.compile(newton_schulz_orthogonalize) if compiled else newton_schulz_orthogonalize

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        for group in self.param_groups:
            params: list[Tensor] = group["params"]
            if not params:
                continue
            device = params[0].device
            update_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            updates = torch.zeros(sum(p.numel() for p in params), device=device, dtype=update_dtype)
            offset = 0
            for index, param in enumerate(params):
                if index % self.world_size == self.rank and param.grad is not None:
                    state = self.state[param]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(param.grad)
                    buffer = state["momentum_buffer"]
                    buffer.mul_(group["momentum"]).add_(param.grad)
                    nesterov_gradient = param.grad.add(buffer, alpha=group["momentum"])
                    update = self.orthogonalize(nesterov_gradient, group["backend_steps"], self.kind)
                    # Orthogonal updates of tall matrices are scaled up to keep their RMS comparable.
                    update = update * max(1.0, param.size(0) / param.size(1)) ** 0.5
                    updates[offset:offset + param.numel()] = update.flatten()
                offset += param.numel()
            if self.world_size > 1:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            offset = 0
            for param in params:
                if group["weight_decay"] > 0:
                    param.mul_(1.0 - group["lr"] * group["weight_decay"])
                param.add_(updates[offset:offset + param.numel()].view_as(param).to(param.dtype),
                           alpha=-group["lr"])
                offset += param.numel()


def build_optimizers(hp: Hyperparameters, runtime: Runtime, modules: list[nn.Module]) -> list[torch.optim.Optimizer]:
    """Muon for every matrix of a linear layer (backbone and JEPA alike), AdamW for embeddings,
    AdamW with SCALAR_WD for everything else (gains, scales, mixes, gates). Groups follow module types, not parameter names,
    and every trainable parameter must land in exactly one group (asserted). modules[0] is the
    backbone, the others are JEPA parts: with JEPA_HEAD_LR > 0 their matrices form a second Muon
    group at that learning rate (without it they share the backbone's group and MATRIX_LR)."""
    matrices, head_matrices, embeddings, scalars = [], [], [], []
    for root_index, root in enumerate(modules):
        own_head_group = root_index > 0 and hp.jepa_head_lr > 0
        for module in root.modules():
            for param in module.parameters(recurse=False):
                if not param.requires_grad:
                    continue
                if isinstance(module, nn.Embedding):
                    embeddings.append(param)
                elif isinstance(module, nn.Linear) and param.ndim == 2:
                    (head_matrices if own_head_group else matrices).append(param)
                else:
                    scalars.append(param)
    fused = runtime.device.type == "cuda"
    muon = Muon(matrices, lr=hp.matrix_lr, momentum=hp.muon_momentum, backend_steps=hp.muon_backend_steps,
                weight_decay=hp.muon_wd, rank=runtime.rank, world_size=runtime.world_size, kind=hp.muon_ns,
                compiled=runtime.compile and runtime.device.type == "cuda")
    if head_matrices:
        muon.add_param_group({"params": head_matrices, "lr": hp.jepa_head_lr})
    optimizers: list[torch.optim.Optimizer] = [
        muon,
        torch.optim.AdamW(embeddings, lr=hp.tied_embed_lr, betas=(hp.beta1, hp.beta2), eps=hp.adam_eps,
                          weight_decay=hp.adam_wd, fused=fused),
        torch.optim.AdamW(scalars, lr=hp.scalar_lr, betas=(hp.beta1, hp.beta2), eps=hp.adam_eps,
                          weight_decay=hp.scalar_wd, fused=fused),
    ]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["base_lr"] = group["lr"]
    grouped = [id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
    trainable = [id(p) for root in modules for p in root.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)), "a parameter is in two optimizer groups"
    assert set(grouped) == set(trainable), "a trainable parameter is in no optimizer group"
    return optimizers


@dataclass
class Schedule:
    """Learning-rate, JEPA-weight and curriculum multipliers as functions of progress."""

    hp: Hyperparameters
    jepa_active: bool
    # The JEPA weight that the ramp and the anneal multiply: JEPA_WEIGHT, or with JEPA_GRAD_SHARE
    # the weight its controller set on the last log step (the same on every rank).
    base_jepa_weight: float | None = None

    def __post_init__(self) -> None:
        if self.base_jepa_weight is None:
            self.base_jepa_weight = self.hp.jepa_weight

    def warmdown(self, step: int, elapsed_ms: float) -> float:
        """1 until the warmdown, then linear to 0 at the last step (or the wall-clock cap, using
        the measured time per step to place the warmdown's start)."""
        hp = self.hp
        if hp.warmdown_iters <= 0:
            return 1.0
        by_steps = min(1.0, max(hp.iterations - step, 0) / hp.warmdown_iters)
        if hp.training_seconds <= 0 or step == 0:
            return by_steps
        warmdown_ms = hp.warmdown_iters * elapsed_ms / step
        remaining_ms = max(1000.0 * hp.training_seconds - elapsed_ms, 0.0)
        return min(by_steps, remaining_ms / max(warmdown_ms, 1e-9))

    def lr_multiplier(self, step: int, elapsed_ms: float) -> float:
        """Warmup times warmdown, the warmdown floored at MIN_LR."""
        warmup = min(1.0, (step + 1) / self.hp.lr_warmup_steps) if self.hp.lr_warmup_steps > 0 else 1.0
        return warmup * max(self.warmdown(step, elapsed_ms), self.hp.min_lr)

    def progress(self, step: int, elapsed_ms: float) -> float:
        by_time = elapsed_ms / (1000.0 * self.hp.training_seconds) if self.hp.training_seconds > 0 else 0.0
        return max(step / self.hp.iterations, by_time)

    def phase(self, step: int, elapsed_ms: float) -> tuple[bool, bool]:
        """(late QAT on, depth recurrence on) at this point of training."""
        return self.phase_at(self.progress(step, elapsed_ms))

    def phase_at(self, progress: float) -> tuple[bool, bool]:
        hp = self.hp
        tolerance = 1e-9  # 1 - 0.15 is a hair above 0.85 in binary: step 85 of 100 is in the last 15%
        qat = hp.qat_start_fraction > 0 and 1.0 - progress <= hp.qat_start_fraction + tolerance
        looping = (hp.loop_layer_range is not None and hp.loop_count > 0
                   and progress >= hp.loop_start_fraction - tolerance)
        return qat, looping

    def reachable_phases(self) -> list[tuple[bool, bool]]:
        """Every (QAT, looping) pair a run passes through: compile priming runs each of them."""
        starts = {0.0, 1.0 - self.hp.qat_start_fraction, self.hp.loop_start_fraction}
        phases = [self.phase_at(progress) for progress in sorted(starts) if progress < 1.0]
        return list(dict.fromkeys(phases))

    def ce_weight(self, step: int, elapsed_ms: float) -> float:
        """Curriculum: CE weight 0 during the first JEPA_ONLY_FRACTION of training."""
        if not self.jepa_active or self.hp.jepa_only_fraction <= 0:
            return 1.0
        return 0.0 if self.progress(step, elapsed_ms) < self.hp.jepa_only_fraction else 1.0

    def jepa_weight(self, step: int, elapsed_ms: float) -> float:
        hp = self.hp
        if not self.jepa_active:
            return 0.0
        ramp = min(1.0, step / hp.jepa_warmup_steps) if hp.jepa_warmup_steps > 0 else 1.0
        anneal = self.warmdown(step, elapsed_ms) if hp.jepa_anneal else 1.0
        return self.base_jepa_weight * ramp * anneal


# =============================================================================
# QUANTISATION AND EXPORT: clip search and GPTQ, compression, size accounting, artifact format
# =============================================================================
# Matrices (the weights of linear layers) are stored as per-row symmetric integers in
# [-(2^(b-1)-1), 2^(b-1)-1] with one fp16 scale per row, b = MATRIX_BITS (6); embedding tables the
# same at EMBED_BITS (8); every other tensor (gains, scales, mixes, gates) as fp16. Classes follow
# the module type, never the parameter's name. The int codes are stored one per byte: the
# compressor squeezes the unused high bits better than a bit-packed layout would let it find
# repeats. QUANT=gptq chooses a matrix's codes with GPTQ on Hessians of training activations;
# QUANT=clip (and every table) rounds each row at its best clip. The compressed artifact must fit
# ARTIFACT_BUDGET_BYTES together with the code; export_artifact lowers precision until it does.

# Bytes 0-5 name the format, byte 6 the body's compressor (LZMA = 0, so an LZMA artifact has the
# magic every earlier version wrote), byte 7 the layout version.
ARTIFACT_MAGIC_PREFIX = b"TGJEPA"
COMPRESSORS = {"lzma": 0, "brotli": 1, "zstd": 2}
COMPRESSOR_PACKAGES = {"brotli": "brotli", "zstd": "zstandard"}
ARTIFACT_HEADER = struct.Struct("<8s32sQ")  # magic, sha256 of the compressed body, body length
CLIP_RATIOS = (1.0, 0.97, 0.94, 0.9, 0.86, 0.82, 0.78, 0.74, 0.7, 0.65, 0.6)  # per-row clip search, x row max |w|
# Top-level names of every training-only part; no backbone key may start with one of them.
JEPA_MODULE_NAMES = ("context_projection", "target_projection", "predictors", "mask_embedding", "target_encoder",
                     "transition")
# The optional JEPA head of an artifact (TTT_OBJECTIVE=ce+jepa) is stored under this prefix;
# evaluation never reads it, test-time training does.
HEAD_PREFIX = "jepa_head."


# ---- per-row quantisation: the clip search, and GPTQ with its calibration ----


def quantize_rows(weight: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row symmetric quantisation with a clip search: each row keeps the clip (fraction of
    its max |w|) with the least squared error (the first such clip on a tie). Returns (codes
    int8, scales fp16, error per row). All clips are tried at once, without data-dependent
    shapes: late QAT runs this inside the compiled forward (one small graph rather than one
    per clip), and its fake-quantised weights must be exactly the exporter's."""
    max_level = 2 ** (bits - 1) - 1
    w = weight.detach().float().reshape(weight.size(0), -1)  # (rows, cols)
    scales = clip_scales(w, max_level)  # (clips, rows)
    codes = torch.clamp(torch.round(w[None] / scales.float()[:, :, None]), -max_level, max_level)  # (clips, rows, cols)
    errors = (codes * scales.float()[:, :, None] - w[None]).square().sum(dim=2)  # (clips, rows)
    best = errors.argmin(dim=0)  # (rows,)
    rows = torch.arange(w.size(0), device=w.device)
    return codes[best, rows].to(torch.int8), scales[best, rows], errors[best, rows]


def clip_scales(w: Tensor, max_level: int) -> Tensor:
    """(clips, rows) fp16 scales, one per clip ratio and row. Rounded to fp16 before any code is
    chosen, so the error measured is the error stored."""
    row_max = w.abs().amax(dim=1).clamp_min(1e-8)
    ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float32, device=w.device)
    scales = (row_max[None, :] * ratios[:, None] / max_level).to(torch.float16)
    return scales.clamp_min(torch.finfo(torch.float16).tiny)


def dequantize_rows(codes: Tensor, scales: Tensor) -> Tensor:
    """The weights an artifact stores: codes times their row's fp16 scale, in fp32."""
    return codes.float() * scales.float()[:, None]


def hessian_row_errors(weight: Tensor, approximation: Tensor, hessian: Tensor) -> Tensor:
    """Per row, the output error an approximation causes on the calibration inputs:
    (W - W_q) H (W - W_q)^T on the diagonal, H = E[x x^T] of the layer's inputs."""
    delta = approximation.float() - weight.float()
    return ((delta @ hessian.float()) * delta).sum(dim=-1)


def gptq_quantize(weight: Tensor, hessian: Tensor, bits: int, block_size: int = 128,
                  damp: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ (Frantar et al. 2022) with per-row scales: columns are quantised one at a time, in
    order of decreasing input energy, and each one's rounding error is pushed onto the columns
    not yet quantised through the Cholesky factor of the inverse Hessian, so what the layer
    outputs on the calibration inputs moves as little as possible. Rows are independent given
    H, so every clip ratio runs at once (rows stacked) and each row keeps the clip with the least
    output error. Returns (codes int8, scales fp16, output error per row on the undamped H)."""
    max_level = 2 ** (bits - 1) - 1
    w = weight.detach().float().reshape(weight.size(0), -1)  # (rows, cols)
    rows, cols = w.shape
    hessian = hessian.detach().float().to(w.device)
    damped = hessian.clone()
    dead = torch.diagonal(damped) <= 0  # inputs that never fire: nothing to compensate there
    damped[dead, dead] = 1.0
    damped += damp * torch.diagonal(damped).mean() * torch.eye(cols, device=w.device)
    order = torch.argsort(torch.diagonal(damped), descending=True)
    inverse_factor = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(damped[order][:, order])), upper=True)
    scales = clip_scales(w, max_level)  # (clips, rows)
    clips = scales.size(0)
    step = scales.float().reshape(-1)  # (clips * rows,)
    work = w.masked_fill(dead[None, :], 0.0)[:, order].repeat(clips, 1)  # (clips * rows, cols)
    codes = torch.zeros_like(work)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = work[:, start:end]  # a view: updates land in work
        block_errors = torch.zeros_like(block)
        for column in range(end - start):
            values = block[:, column]
            code = torch.clamp(torch.round(values / step), -max_level, max_level)
            codes[:, start + column] = code
            error = (values - code * step) / inverse_factor[start + column, start + column]
            block[:, column:] -= error[:, None] * inverse_factor[start + column, start + column:end][None, :]
            block_errors[:, column] = error
        work[:, end:] -= block_errors @ inverse_factor[start:end, end:]
    codes = codes[:, torch.argsort(order)].reshape(clips, rows, cols)
    errors = hessian_row_errors(w.expand(clips, rows, cols), codes * scales.float()[:, :, None], hessian)
    best = errors.argmin(dim=0)
    index = torch.arange(rows, device=w.device)
    return codes[best, index].to(torch.int8), scales[best, index], errors[best, index]


# GPTQ's calibration reads training data only (the trainer's own loader, after its last step):
# the rules allow training data inside the 600 s, never validation data. Its time counts as
# training time, as the records count it; GPTQ_RESERVE_SECONDS stops the loop early enough for it.
def collect_hessians(model: nn.Module, batches: Iterable[Tensor], runtime: "Runtime") -> dict[str, Tensor]:
    """E[x x^T] of the inputs of every linear layer of `model` (every pass of a looped block) over
    the given input batches and all ranks, keyed by the weight's state-dict name."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    handles = []
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        name = f"{module_name}.weight"
        sums[name] = torch.zeros(module.in_features, module.in_features, device=runtime.device)
        counts[name] = torch.zeros((), device=runtime.device)

        def accumulate(_module: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
            x = args[0].detach().reshape(-1, args[0].size(-1)).float()
            sums[name].addmm_(x.T, x)
            counts[name] += x.size(0)
        handles.append(module.register_forward_pre_hook(accumulate))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), runtime.autocast():
            for inputs in batches:
                model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if runtime.distributed:
        for name in sums:
            dist.all_reduce(sums[name])
            dist.all_reduce(counts[name])
    return {name: (sums[name] / counts[name].clamp_min(1.0)).cpu() for name in sums}


def calibrate_gptq(trainer: "Trainer") -> tuple[dict[str, Tensor], float]:
    """Hessians of the final weights on GPTQ_CALIBRATION_BATCHES fresh training micro-batches per
    rank (the batches training would have read next). Returns (Hessians, milliseconds)."""
    hp, runtime = trainer.hp, trainer.runtime
    runtime.synchronize()
    started = time.perf_counter()
    batches = (trainer.loader.next_batch(trainer.local_batch_tokens, hp.train_seq_len)[0]
               for _ in range(hp.gptq_calibration_batches))
    hessians = collect_hessians(trainer.model, batches, runtime)
    runtime.synchronize()
    return hessians, 1000.0 * (time.perf_counter() - started)


# ---- the artifact: compression, storage classes, format, writing it and reading it back ----


def artifact_magic(compressor: str) -> bytes:
    return ARTIFACT_MAGIC_PREFIX + bytes([COMPRESSORS[compressor], 1])


def compressor_module(name: str) -> Any:
    """The module behind a compressor; a missing package is one line that says how to get it."""
    if name == "lzma":
        return lzma
    package = COMPRESSOR_PACKAGES[name]
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"COMPRESSOR={name} needs the {package} package: pip install {package} "
                          f"(or use COMPRESSOR=lzma)") from None


def compress_bytes(data: bytes, compressor: str, lzma_preset: int = 9) -> bytes:
    """Each compressor at its strongest setting (brotli 11 with a 16 MiB window, zstd 22)."""
    if compressor == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_XZ, preset=lzma_preset)
    if compressor == "brotli":
        return compressor_module("brotli").compress(data, quality=11, lgwin=24)
    return compressor_module("zstd").ZstdCompressor(level=22).compress(data)


def decompress_bytes(data: bytes, compressor: str) -> bytes:
    if compressor == "lzma":
        return lzma.decompress(data)
    if compressor == "brotli":
        return compressor_module("brotli").decompress(data)
    return compressor_module("zstd").ZstdDecompressor().decompress(data)


def artifact_label(matrix_bits: int, compressor: str) -> str:
    """How the size and score lines name the export that ran (int6+brotli), as the records name
    theirs; the matrices' bit width is the one the run asked for (the budget fallback logs any
    matrix it lowers)."""
    return f"int{matrix_bits}+{compressor}"


def tensor_storage_classes(model: nn.Module, matrix_bits: int = 6, embed_bits: int = 8) -> dict[str, str]:
    """Decide each state-dict tensor's class from the module that owns it."""
    classes: dict[str, str] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.Embedding):
                classes[name] = f"int{embed_bits}"
            elif isinstance(module, nn.Linear) and param.ndim == 2:
                classes[name] = f"int{matrix_bits}"
            else:
                classes[name] = "float16"
    return classes


def _encode_tensor(tensor: Tensor, storage: str, hessian: Tensor | None = None, block_size: int = 128,
                   damp: float = 0.01, device: torch.device | None = None) -> tuple[dict[str, Any], list[bytes], float]:
    """(metadata, byte blobs, error) of one tensor at one storage class. The error is the squared
    error, or the output error on the calibration inputs when a Hessian is given (GPTQ, run on
    `device`: its column loop is thousands of small steps, quick on a GPU)."""
    if storage == "float16":
        stored = tensor.detach().to(torch.float16)
        error = (stored.float() - tensor.detach().float()).square().sum().item()
        return {"storage": storage}, [stored.cpu().numpy().tobytes()], error
    bits = int(storage.removeprefix("int"))
    if hessian is None:
        codes, scales, row_errors = quantize_rows(tensor.cpu(), bits)
        method = "clip"
    else:
        device = device or tensor.device
        codes, scales, row_errors = gptq_quantize(tensor.to(device), hessian.to(device), bits, block_size, damp)
        codes, scales, method = codes.cpu(), scales.cpu(), "gptq"
    return ({"storage": storage, "method": method}, [codes.numpy().tobytes(), scales.numpy().tobytes()],
            row_errors.sum().item())


ARTIFACT_UNSTORED_FIELDS = ("run_id", "log_dir", "artifact_path", "checkpoint_dir", "resume", "float_weights_path")


def _serialize(entries: list[dict[str, Any]], blobs: list[list[bytes]], hp: Hyperparameters) -> bytes:
    offset = 0
    for entry, parts in zip(entries, blobs):
        entry["offset"], entry["lengths"] = offset, [len(part) for part in parts]
        offset += sum(entry["lengths"])
    # Where the run wrote its files is not part of the model: left out, so that the same training
    # gives the same artifact bytes whatever its RUN_ID or paths (a record's train_gpt.py included).
    stored = {name: value for name, value in dataclasses.asdict(hp).items() if name not in ARTIFACT_UNSTORED_FIELDS}
    metadata = json.dumps({"format": 1, "hyperparameters": stored, "tensors": entries},
                          sort_keys=True).encode("utf-8")
    return struct.pack("<I", len(metadata)) + metadata + b"".join(part for parts in blobs for part in parts)


def compress_artifact(raw: bytes, compressor: str = "lzma", lzma_preset: int = 9) -> bytes:
    body = compress_bytes(raw, compressor, lzma_preset)
    return ARTIFACT_HEADER.pack(artifact_magic(compressor), hashlib.sha256(body).digest(), len(body)) + body


def export_artifact(model: GPT, hp: Hyperparameters, code_bytes: int, log: Callable[[str], None],
                    hessians: dict[str, Tensor] | None = None, head: nn.Module | None = None) -> bytes:
    """Quantise the backbone (and the JEPA head, when given) and compress it so that artifact +
    code fit ARTIFACT_BUDGET_BYTES. Matrices with a Hessian are quantised by GPTQ, the rest by
    the clip search. Over budget, matrices move down one bit at a time to int4, cheapest first:
    the move with the least growth of relative error (output error on the calibration inputs
    relative to the layer's output energy under GPTQ, ||W - W_q||^2 / ||W||^2 otherwise) per byte
    saved, bytes measured by the compressor on the tensor alone. Each choice is logged."""
    hessians = hessians or {}
    compute_device = next(model.parameters()).device
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    leaked = [name for name in state if name.split(".")[0] in JEPA_MODULE_NAMES]
    assert not leaked, f"JEPA tensors must never reach the artifact's backbone: {leaked}"
    classes = tensor_storage_classes(model, hp.matrix_bits, hp.embed_bits)
    matrices = {name for module_name, module in model.named_modules() if isinstance(module, nn.Linear)
                for name in [f"{module_name}.weight"]}
    if head is not None:
        for name, tensor in head.state_dict().items():
            state[HEAD_PREFIX + name] = tensor.detach().cpu()
        for name, kind in tensor_storage_classes(head, hp.matrix_bits, hp.embed_bits).items():
            classes[HEAD_PREFIX + name] = kind
            if kind != "float16":
                matrices.add(HEAD_PREFIX + name)
    names = sorted(state)
    storage = {name: classes.get(name, "float16") for name in names}
    encodings: dict[tuple[str, str], tuple[dict[str, Any], list[bytes], float]] = {}
    compressed_sizes: dict[tuple[str, str], int] = {}

    def encoding(name: str, kind: str) -> tuple[dict[str, Any], list[bytes], float]:
        if (name, kind) not in encodings:
            hessian = hessians.get(name) if name in matrices else None
            encodings[name, kind] = _encode_tensor(state[name], kind, hessian, hp.gptq_block_size, hp.gptq_damp,
                                                   compute_device)
        return encodings[name, kind]

    def compressed_size(name: str, kind: str) -> int:
        if (name, kind) not in compressed_sizes:
            compressed_sizes[name, kind] = len(compress_bytes(b"".join(encoding(name, kind)[1]), hp.compressor,
                                                              hp.lzma_preset))
        return compressed_sizes[name, kind]

    def energy(name: str) -> float:
        weight = state[name].float()
        if name in hessians and name in matrices:
            return hessian_row_errors(weight, torch.zeros_like(weight), hessians[name].cpu()).sum().item()
        return weight.square().sum().item()

    def build() -> bytes:
        entries = [{"name": n, "shape": list(state[n].shape), **encoding(n, storage[n])[0]} for n in names]
        return compress_artifact(_serialize(entries, [encoding(n, storage[n])[1] for n in names], hp),
                                 hp.compressor, hp.lzma_preset)

    artifact = build()
    budget_for_weights = hp.artifact_budget_bytes - code_bytes
    while len(artifact) > budget_for_weights:
        moves = []
        for name in sorted(matrices):
            bits = int(storage[name].removeprefix("int"))
            if bits <= 4:
                continue
            lower = f"int{bits - 1}"
            saved = compressed_size(name, storage[name]) - compressed_size(name, lower)
            error_growth = (encoding(name, lower)[2] - encoding(name, storage[name])[2]) / (energy(name) + 1e-12)
            moves.append((error_growth / max(saved, 1), name, lower, saved, error_growth))
        if not moves:
            raise ConfigError(
                f"the artifact does not fit: {len(artifact):,} bytes + code {code_bytes:,} bytes = "
                f"{len(artifact) + code_bytes:,} > ARTIFACT_BUDGET_BYTES={hp.artifact_budget_bytes:,} even with every "
                f"matrix at int4: shrink the model (NUM_LAYERS, MODEL_DIM, MLP_MULT, BIGRAM_VOCAB_SIZE)")
        overshoot = len(artifact) - budget_for_weights
        expected_saving = 0
        for _, name, lower, saved, error_growth in sorted(moves):
            trained_at = f" (late QAT trained it at int{hp.matrix_bits})" if hp.qat_start_fraction > 0 else ""
            log(f"export: {name} {storage[name]} -> {lower} (relative error +{error_growth:.2e}, saves "
                f"~{saved:,} bytes){trained_at}")
            storage[name] = lower
            expected_saving += saved
            if expected_saving >= overshoot * 1.02:  # estimates are per tensor: aim a little past the cap
                break
        artifact = build()
    return artifact


def read_artifact(path: Path, blob: bytes | None = None) -> dict[str, Any]:
    """Parse and verify an artifact (the file at path, or its bytes when given): returns its
    hyperparameters, the dequantised backbone state dict and the JEPA head's (empty unless it was
    exported for TTT_OBJECTIVE=ce+jepa)."""
    if blob is None:
        if not path.is_file():
            raise ConfigError(f"artifact {path} not found: train first or set ARTIFACT_PATH")
        blob = path.read_bytes()
    compressor_ids = {artifact_magic(name): name for name in COMPRESSORS}
    if len(blob) < ARTIFACT_HEADER.size or blob[:len(ARTIFACT_MAGIC_PREFIX) + 2] not in compressor_ids:
        raise ConfigError(f"{path} is not a train_gpt_jepa artifact (bad magic): point ARTIFACT_PATH at a .ptz it wrote")
    magic, digest, body_length = ARTIFACT_HEADER.unpack_from(blob)
    body = blob[ARTIFACT_HEADER.size:]
    if len(body) != body_length or hashlib.sha256(body).digest() != digest:
        raise ConfigError(f"artifact {path} is truncated or corrupt ({len(body)} of {body_length} body bytes, "
                          f"checksum mismatch): copy it again or re-export it")
    compressor = compressor_ids[magic]
    raw = decompress_bytes(body, compressor)
    (metadata_length,) = struct.unpack_from("<I", raw)
    metadata = json.loads(raw[4:4 + metadata_length])
    payload = memoryview(raw)[4 + metadata_length:]
    state: dict[str, Tensor] = {}
    head_state: dict[str, Tensor] = {}
    for entry in metadata["tensors"]:
        shape, offset = entry["shape"], entry["offset"]
        parts = []
        for length in entry["lengths"]:
            parts.append(payload[offset:offset + length])
            offset += length
        if entry["storage"] == "float16":
            tensor = torch.frombuffer(bytearray(parts[0]), dtype=torch.float16).float()
        else:
            codes = torch.frombuffer(bytearray(parts[0]), dtype=torch.int8).view(shape[0], -1)
            scales = torch.frombuffer(bytearray(parts[1]), dtype=torch.float16)
            tensor = dequantize_rows(codes, scales)
        name = entry["name"]
        if name.startswith(HEAD_PREFIX):
            head_state[name.removeprefix(HEAD_PREFIX)] = tensor.reshape(shape)
        else:
            state[name] = tensor.reshape(shape)
    return {"hyperparameters": metadata["hyperparameters"], "state_dict": state, "head_state_dict": head_state,
            "tensors": metadata["tensors"], "compressor": compressor}


@contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """The trainer's one way to write a file (artifact, checkpoint, summary, float weights): the
    handle writes a temporary file beside `path`, which is flushed to disk and renamed over `path`
    when the block ends, so readers (and a crash) never see half a file; if the block fails, the
    previous file stays and the temporary goes. scripts/atomic_write.py is the tools' copy: a
    record folder ships this file alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes) -> None:
    """Write bytes through atomic_output."""
    with atomic_output(path) as handle:
        handle.write(data)


def shared_artifact_bytes(path: Path, runtime: "Runtime") -> bytes:
    """The artifact's bytes on every rank, read by rank 0 only: on several nodes the file exists
    only where rank 0 wrote (or was given) it, since nodes need not share a disk."""
    payload: list[Any] = [None]
    if runtime.master:
        try:
            payload[0] = path.read_bytes()
        except OSError as error:
            payload[0] = f"artifact {path} cannot be read on rank 0 ({error.strerror or error}): train first or set ARTIFACT_PATH"
    if runtime.distributed:
        dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise ConfigError(payload[0])
    return payload[0]


def save_float_weights(path: Path, model: GPT, head: nn.Module | None, hessians: dict[str, Tensor] | None,
                       hp: Hyperparameters) -> None:
    """FLOAT_WEIGHTS_PATH: what scripts/export_study.py re-exports with other settings."""
    payload = {"hyperparameters": dataclasses.asdict(hp),
               "state_dict": {name: t.detach().cpu() for name, t in model.state_dict().items()},
               "head_state_dict": {name: t.detach().cpu() for name, t in head.state_dict().items()} if head else {},
               "hessians": hessians or {}}
    with atomic_output(path) as handle:
        torch.save(payload, handle)


def export_on_rank_zero(model: GPT, hp: Hyperparameters, runtime: Runtime, code_bytes: int, log: RunLogger,
                        hessians: dict[str, Tensor] | None = None,
                        head: nn.Module | None = None) -> ConfigError | RunFailure | None:
    """Rank 0 quantises, compresses and writes the artifact (and FLOAT_WEIGHTS_PATH when set);
    every rank returns the same outcome: None, or the one-line error that stops the run
    (ConfigError for what the user can fix, RunFailure for anything else)."""
    artifact_path = Path(hp.artifact_path)
    export_error: ConfigError | RunFailure | None = None
    if runtime.master:
        try:
            if hp.float_weights_path:
                save_float_weights(Path(hp.float_weights_path), model, head, hessians, hp)
                log(f"float weights: {hp.float_weights_path}")
            started = time.perf_counter()
            artifact = export_artifact(model, resolved_hyperparameters(hp, runtime), code_bytes, log, hessians, head)
            write_atomically(artifact_path, artifact)
            log(f"export: quant:{hp.quant if hessians else 'clip'} matrix_bits:{hp.matrix_bits} "
                f"embed_bits:{hp.embed_bits} compressor:{hp.compressor} jepa_head:{int(head is not None)} "
                f"time:{1000 * (time.perf_counter() - started):.0f}ms")
            label = artifact_label(hp.matrix_bits, hp.compressor)
            log(f"Serialized model {label}: {len(artifact)} bytes")
            log(f"Code size: {code_bytes} bytes")
            log(f"Total submission size {label}: {len(artifact) + code_bytes} bytes "
                f"(budget {hp.artifact_budget_bytes}, headroom {hp.artifact_budget_bytes - len(artifact) - code_bytes})")
        except ConfigError as error:
            export_error = error
        except OSError as error:  # caught, not raised here: the other ranks wait for this outcome
            export_error = ConfigError(f"could not write the artifact to ARTIFACT_PATH={artifact_path}: {error}; "
                                       f"point ARTIFACT_PATH at a writable location with free space")
        except Exception as error:  # any other failure too: raised here, it would leave the other
            # ranks in the broadcast below until the collective timeout (NCCL: 10 minutes)
            log("".join(traceback.format_exception(error)).rstrip(), console=False)
            export_error = RunFailure(f"export failed on rank 0 with {type(error).__name__}: {error} "
                                      f"(traceback in the run's log); nothing was written to ARTIFACT_PATH")
    if runtime.distributed:  # every rank learns whether rank 0's export worked (and waits for the file)
        shared = [None if export_error is None else (type(export_error).__name__, str(export_error))]
        dist.broadcast_object_list(shared, src=0)  # a (kind, message) pair: plain data pickles anywhere
        if shared[0] is not None:
            kind, message = shared[0]
            export_error = ConfigError(message) if kind == "ConfigError" else RunFailure(message)
    return export_error


# =============================================================================
# EVALUATION AND TEST-TIME TRAINING: val_bpb, sliding windows, the roundtrip, score-first TTT
# =============================================================================


def evaluation_windows(usable: int, seq_len: int, stride: int = 0) -> list[tuple[int, int, int]]:
    """The windows an evaluation scores, as (start, skip, end): window tokens [start, end] (inputs
    start..end-1, targets start+1..end), of which targets from start + skip + 1 on are scored.

    stride = 0 (or = seq_len): disjoint windows of seq_len, every token scored once. A smaller
    stride: windows of seq_len ending every `stride` tokens, each scoring only its last `stride`
    tokens, so every token but the first window's is predicted with seq_len - stride tokens of
    context. Both modes score exactly the same tokens, so their numbers are comparable."""
    stride = seq_len if stride <= 0 else stride
    window_ends = list(range(seq_len, usable + 1, stride))
    if window_ends[-1] != usable:
        window_ends.append(usable)
    # Window i scores target positions [previous end, end): the first window scores all of its own.
    return [(end - seq_len, prev_end - (end - seq_len), end) for prev_end, end in zip([0] + window_ends[:-1], window_ends)]


class ScoreSums(NamedTuple):
    loss: Tensor  # summed token losses, nats (float64, on the device)
    tokens: Tensor
    bytes: Tensor


def score_windows(model: nn.Module, device_tokens: Tensor, windows: list[tuple[int, int, int]], seq_len: int,
                  batch_windows: int, luts: tuple[Tensor, Tensor, Tensor], runtime: "Runtime",
                  token_losses_out: list[Tensor] | None = None) -> ScoreSums:
    """Loss, token and byte sums of this rank's windows, under inference mode (nothing scored
    here can train anything). The windows are padded to whole batches with windows that score
    nothing: one batch shape, so a compiled model compiles once; and the scoring masks are built
    on the device, so the loop never waits for the GPU (no boolean indexing, no host-to-device
    copies per batch). token_losses_out (tests): receives each batch's scored token losses, in
    window order."""
    bytes_per_token, has_leading_space, is_boundary = luts
    windows = windows + [(0, seq_len, seq_len)] * (-len(windows) % batch_windows)
    window_starts = torch.tensor([start for start, _, _ in windows], dtype=torch.int64).to(runtime.device)
    window_skips = torch.tensor([skip for _, skip, _ in windows], dtype=torch.int64).to(runtime.device)
    offsets = torch.arange(seq_len + 1, device=runtime.device)
    sums = ScoreSums(*(torch.zeros((), device=runtime.device, dtype=torch.float64) for _ in range(3)))
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for first in range(0, len(windows), batch_windows):
            # Every window spans seq_len + 1 tokens from its start (the last one ends at `usable`).
            rows = device_tokens[window_starts[first:first + batch_windows, None] + offsets]
            inputs, targets = rows[:, :-1], rows[:, 1:]
            scored = offsets[None, :-1] >= window_skips[first:first + batch_windows, None]
            with runtime.autocast():
                token_losses, _ = model(inputs, targets, reduction="none")
            sums.loss.add_(torch.where(scored, token_losses.double(), 0.0).sum())
            if token_losses_out is not None:
                token_losses_out.append(token_losses[scored].float().cpu())
            sums.tokens.add_(scored.sum())
            token_bytes = bytes_per_token[targets].to(torch.int32)
            token_bytes += (has_leading_space[targets] & ~is_boundary[inputs]).to(torch.int32)
            sums.bytes.add_(torch.where(scored, token_bytes, 0).sum())
    model.train(was_training)
    return sums


def bpb_from_sums(sums: ScoreSums, runtime: "Runtime") -> tuple[float, float]:
    """All ranks' sums together: (val_loss in nats per token, val_bpb)."""
    if runtime.distributed:
        for total in sums:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
    val_loss = (sums.loss / sums.tokens).item()
    return val_loss, val_loss / math.log(2.0) * sums.tokens.item() / sums.bytes.item()


def evaluate_bpb(
    model: nn.Module,
    val_tokens: Tensor,
    seq_len: int,
    batch_tokens: int,
    luts: tuple[Tensor, Tensor, Tensor],
    runtime: "Runtime",
    stride: int = 0,
) -> tuple[float, float]:
    """Cross-entropy (nats/token) and bits per byte over the validation tokens, windows as
    evaluation_windows lays them out, shared round-robin between the ranks."""
    windows = evaluation_windows(val_tokens.numel() - 1, seq_len, stride)
    batch_windows = max(1, batch_tokens // (seq_len * runtime.world_size))
    device_tokens = val_tokens.to(runtime.device, torch.int64)
    sums = score_windows(model, device_tokens, windows[runtime.rank::runtime.world_size], seq_len, batch_windows,
                         luts, runtime)
    return bpb_from_sums(sums, runtime)


def build_eval_model(hp: Hyperparameters, runtime: Runtime, state_dict: dict[str, Tensor],
                     compiled: bool = True) -> nn.Module:
    """A fresh backbone (no JEPA part) holding the given weights, in training's dtypes and final
    phase (looping on when configured: training always ends past LOOP_START_FRACTION), compiled
    like training's unless compiled=False."""
    model = GPT(hp).to(runtime.device)
    apply_model_dtype(model, runtime.model_dtype)
    model.looping = Schedule(hp, jepa_active=False).phase_at(1.0)[1]
    model.load_state_dict({name: tensor.to(runtime.device) for name, tensor in state_dict.items()}, strict=True)
    return torch.compile(model, dynamic=False, fullgraph=True) if runtime.compile and compiled else model


# ---- score-first test-time training ----
# Test-time training is the records' legal score-first TTT (#549): the validation windows are
# grouped into chunks of about TTT_CHUNK_TOKENS scored tokens, in order; each chunk is scored
# under inference mode, and only then trained on (TTT_EPOCHS full-batch SGD steps over sequences
# whose every target was already scored). No token is ever scored by a model that has seen it.


class LoraLinear(nn.Module):
    """TTT_PARAMS=lora: a frozen linear layer plus a trainable low-rank update up @ down. `up`
    starts at zero, so the adapted model starts exactly as the artifact's."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        down = torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features)
        self.down = nn.Parameter(down.to(base.weight.device))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))


def attach_lora(model: GPT, rank: int, seed: int) -> list[nn.Parameter]:
    """Freeze the model and wrap every matrix of its blocks in a LoraLinear (the same adapters on
    every rank: they are drawn from SEED). Returns the adapters' parameters."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    adapters: list[nn.Parameter] = []
    for block in model.blocks:
        for parent in list(block.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, CastedLinear):
                    adapter = LoraLinear(child, rank, generator)
                    setattr(parent, child_name, adapter)
                    adapters += [adapter.down, adapter.up]
    return adapters


def ttt_chunks(windows: list[tuple[int, int, int]], chunk_tokens: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive evaluation windows grouped into chunks of at least chunk_tokens scored tokens
    (the last may hold fewer). Whole windows, so TTT scores exactly the tokens evaluation scores."""
    chunks: list[list[tuple[int, int, int]]] = [[]]
    scored = 0
    for window in windows:
        if scored >= chunk_tokens:
            chunks.append([])
            scored = 0
        chunks[-1].append(window)
        scored += window[2] - window[0] - window[1]
    return chunks


def ttt_sequence_ends(chunk: list[tuple[int, int, int]], seq_len: int) -> list[int]:
    """Last target positions of the training sequences of a scored chunk: sequences of seq_len
    targets ending at the chunk's last scored target and every seq_len before it, so they cover
    the chunk's targets and read nothing after them (a sequence near the start may reach back
    into earlier, already scored chunks)."""
    first_target = chunk[0][0] + chunk[0][1] + 1
    last_target = chunk[-1][2]
    return sorted({max(end, seq_len) for end in range(last_target, first_target - 1, -seq_len)})


class ScoreFirstTrainer:
    """A fresh copy of the artifact's model (and JEPA head for TTT_OBJECTIVE=ce+jepa), its SGD or
    Adam optimizer over TTT_PARAMS, and the two halves of a chunk: score it, then train on it."""

    def __init__(self, hp: Hyperparameters, runtime: "Runtime", state_dict: dict[str, Tensor],
                 head_state_dict: dict[str, Tensor]):
        self.hp, self.runtime = hp, runtime
        self.model = build_eval_model(hp, runtime, state_dict, compiled=False)
        self.head: JepaHead | None = None
        if hp.ttt_objective == "ce+jepa":
            if not head_state_dict:
                raise ConfigError("TTT_OBJECTIVE=ce+jepa needs the JEPA head in the artifact: train the run with "
                                  "TTT_OBJECTIVE=ce+jepa (it exports the head), or use TTT_OBJECTIVE=ce")
            if hp.jepa_mode not in ("next", "chunk"):
                raise ConfigError(f"TTT_OBJECTIVE=ce+jepa supports JEPA_MODE next and chunk, not {hp.jepa_mode}")
            self.head = JepaHead(hp).to(runtime.device)
            self.head.load_state_dict({name: t.to(runtime.device) for name, t in head_state_dict.items()}, strict=True)
        if hp.ttt_params == "lora":
            self.parameters = attach_lora(self.model, hp.ttt_lora_rank, hp.seed)
        else:
            self.parameters = [p for p in self.model.parameters()]
        if self.head is not None:
            self.parameters += list(self.head.parameters())
        if hp.ttt_optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(self.parameters, lr=hp.ttt_lr,
                                                                     betas=(hp.ttt_momentum, 0.99))
        else:
            self.optimizer = torch.optim.SGD(self.parameters, lr=hp.ttt_lr, momentum=hp.ttt_momentum)
        compile_module = (lambda module: torch.compile(module, dynamic=False, fullgraph=True)) if runtime.compile else (
            lambda module: module)
        self.compiled_model = compile_module(self.model)
        self.compiled_head = compile_module(self.head) if self.head is not None else None
        self.sigreg_generator = torch.Generator().manual_seed(hp.seed * 1000 + 999)
        self.offsets = torch.arange(hp.train_seq_len + 1, device=runtime.device)

    def score(self, device_tokens: Tensor, chunk: list[tuple[int, int, int]], batch_windows: int,
              luts: tuple[Tensor, Tensor, Tensor], token_losses_out: list[Tensor] | None = None) -> ScoreSums:
        return score_windows(self.compiled_model, device_tokens, chunk[self.runtime.rank::self.runtime.world_size],
                             self.hp.train_seq_len, batch_windows, luts, self.runtime, token_losses_out)

    def _loss(self, inputs: Tensor, targets: Tensor, total_targets: int) -> Tensor:
        """This micro-batch's share of the chunk's mean loss (summed over ranks and micro-batches)."""
        hp = self.hp
        if self.head is None:
            token_losses, _ = self.compiled_model(inputs, targets, reduction="none")
            return token_losses.float().sum() / total_targets
        token_losses, features = self.compiled_model(inputs, targets, feature_layer=hp.jepa_layer_index,
                                                     reduction="none")
        directions = (draw_sigreg_directions(hp, self.sigreg_generator, self.runtime.device)
                      if hp.anti_collapse == "sigreg" else None)
        # The target is the online model's own features under stop-gradient (the EMA target
        # encoder of training is not exported).
        prediction_loss, regulariser_loss = self.compiled_head(features, features.detach(), None, directions)
        jepa_sum = hp.jepa_weight * (prediction_loss + regulariser_loss) * targets.numel()
        return (token_losses.float().sum() + jepa_sum) / total_targets

    def train_on(self, device_tokens: Tensor, chunk: list[tuple[int, int, int]], lr: float,
                 batch_sequences: int) -> None:
        """TTT_EPOCHS optimizer steps on the already scored chunk, each over all of its sequences (shared
        between the ranks, gradients summed)."""
        hp, runtime = self.hp, self.runtime
        ends = ttt_sequence_ends(chunk, hp.train_seq_len)
        mine = ends[runtime.rank::runtime.world_size]
        total_targets = len(ends) * hp.train_seq_len
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        for _ in range(hp.ttt_epochs):
            self.optimizer.zero_grad(set_to_none=False)
            for first in range(0, len(mine), batch_sequences):
                starts = torch.tensor(mine[first:first + batch_sequences], device=runtime.device) - hp.train_seq_len
                rows = device_tokens[starts[:, None] + self.offsets]
                with runtime.autocast():
                    loss = self._loss(rows[:, :-1], rows[:, 1:], total_targets)
                loss.backward()
            if runtime.distributed:
                for param in self.parameters:
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                    dist.all_reduce(param.grad)
            if hp.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.parameters, hp.ttt_grad_clip)
            self.optimizer.step()
        self.model.eval()


def run_test_time_training(hp: Hyperparameters, runtime: "Runtime", state_dict: dict[str, Tensor],
                    head_state_dict: dict[str, Tensor], val_tokens: Tensor, luts: tuple[Tensor, Tensor, Tensor],
                    chunk_token_losses: list[Tensor] | None = None) -> dict[str, float]:
    """Score-first TTT over the whole validation split, windows as the final evaluation lays them
    out (EVAL_STRIDE). Returns val_loss, val_bpb, the chunk count and the scoring and training
    milliseconds. chunk_token_losses (tests): receives the loss of every token scored, per chunk."""
    started = time.perf_counter()
    ttt = ScoreFirstTrainer(hp, runtime, state_dict, head_state_dict)
    seq_len = hp.train_seq_len
    chunks = ttt_chunks(evaluation_windows(val_tokens.numel() - 1, seq_len, hp.eval_stride), hp.ttt_chunk_tokens)
    batch_windows = max(1, hp.val_batch_size // (seq_len * runtime.world_size))
    device_tokens = val_tokens.to(runtime.device, torch.int64)
    totals = ScoreSums(*(torch.zeros((), device=runtime.device, dtype=torch.float64) for _ in range(3)))
    score_ms = train_ms = 0.0
    for index, chunk in enumerate(chunks):
        runtime.synchronize()
        scoring_started = time.perf_counter()
        scored_losses: list[Tensor] | None = [] if chunk_token_losses is not None else None
        for total, part in zip(totals, ttt.score(device_tokens, chunk, batch_windows, luts, scored_losses)):
            total.add_(part)
        if chunk_token_losses is not None:
            chunk_token_losses.append(torch.cat(scored_losses))
        runtime.synchronize()
        score_ms += 1000.0 * (time.perf_counter() - scoring_started)
        if index == len(chunks) - 1 or hp.ttt_epochs == 0 or hp.ttt_lr == 0:
            continue  # nothing is scored after the last chunk: training on it would change nothing
        training_started = time.perf_counter()
        lr = hp.ttt_lr * 0.5 * (1.0 + math.cos(math.pi * index / max(len(chunks) - 1, 1)))
        ttt.train_on(device_tokens, chunk, lr, batch_windows)
        runtime.synchronize()
        train_ms += 1000.0 * (time.perf_counter() - training_started)
    val_loss, val_bpb = bpb_from_sums(totals, runtime)
    return {"val_loss": val_loss, "val_bpb": val_bpb, "chunks": len(chunks), "score_ms": score_ms,
            "train_ms": train_ms, "total_ms": 1000.0 * (time.perf_counter() - started),
            "parameters": sum(p.numel() for p in ttt.parameters)}


# ---- the roundtrip: an artifact evaluated on its own, in training's process or with EVAL_ONLY=1 ----


def evaluate_artifact(hp: Hyperparameters, runtime: Runtime, artifact_path: Path, val_tokens: Tensor,
                      luts: tuple[Tensor, Tensor, Tensor], log: RunLogger, blob: bytes) -> dict[str, Any]:
    """Roundtrip: rebuild the model from the artifact alone (its bytes, on every rank), evaluate,
    log the result lines; then, with TTT=1, score-first test-time training from the same artifact."""
    artifact = read_artifact(artifact_path, blob)
    model = build_eval_model(hp, runtime, artifact["state_dict"])
    # The line names the export that ran (final_int6_brotli_roundtrip_exact): the challenge's
    # parsers read final_*_roundtrip_exact, whatever the quantiser and compressor.
    label = artifact_label(artifact["hyperparameters"].get("matrix_bits", 6), artifact["compressor"])
    line_name = "final_" + label.replace("+", "_") + "_roundtrip"
    started = time.perf_counter()
    val_loss, val_bpb = evaluate_bpb(model, val_tokens, hp.train_seq_len, hp.val_batch_size, luts, runtime)
    log(f"{line_name} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
        f"eval_time:{1000 * (time.perf_counter() - started):.0f}ms")
    log(f"{line_name}_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
    result: dict[str, Any] = {"roundtrip_val_loss": val_loss, "roundtrip_val_bpb": val_bpb,
                              "sliding_val_loss": None, "sliding_val_bpb": None, "export_label": label,
                              "roundtrip_line": f"{line_name}_exact"}
    if hp.eval_stride > 0:
        started = time.perf_counter()
        sliding_loss, sliding_bpb = evaluate_bpb(model, val_tokens, hp.train_seq_len, hp.val_batch_size, luts,
                                                 runtime, stride=hp.eval_stride)
        log(f"final_sliding val_loss:{sliding_loss:.8f} val_bpb:{sliding_bpb:.8f} stride:{hp.eval_stride} "
            f"eval_time:{1000 * (time.perf_counter() - started):.0f}ms")
        result.update(sliding_val_loss=sliding_loss, sliding_val_bpb=sliding_bpb)
    if hp.ttt:
        del model  # TTT builds its own copy of the weights, which it trains
        ttt = run_test_time_training(hp, runtime, artifact["state_dict"], artifact["head_state_dict"], val_tokens, luts)
        baseline_name, baseline = (("final_sliding", result["sliding_val_bpb"]) if hp.eval_stride > 0
                                   else ("roundtrip", val_bpb))
        log(f"ttt: {ttt['chunks']} chunks of ~{hp.ttt_chunk_tokens} tokens, epochs:{hp.ttt_epochs} lr:{hp.ttt_lr} "
            f"{hp.ttt_optimizer} momentum:{hp.ttt_momentum} params:{hp.ttt_params} ({ttt['parameters']} trained) "
            f"objective:{hp.ttt_objective} scoring:{ttt['score_ms']:.0f}ms training:{ttt['train_ms']:.0f}ms")
        log(f"final_ttt val_loss:{ttt['val_loss']:.4f} val_bpb:{ttt['val_bpb']:.4f} eval_time:{ttt['total_ms']:.0f}ms")
        log(f"final_ttt_exact val_loss:{ttt['val_loss']:.8f} val_bpb:{ttt['val_bpb']:.8f}")
        log(f"ttt_gain val_bpb:{ttt['val_bpb'] - baseline:+.5f} (against {baseline_name}, the same windows)")
        result.update(ttt_val_loss=ttt["val_loss"], ttt_val_bpb=ttt["val_bpb"], ttt_eval_time_ms=round(ttt["total_ms"], 1),
                      ttt_train_time_ms=round(ttt["train_ms"], 1), ttt_objective=hp.ttt_objective,
                      ttt_params=hp.ttt_params)
    return result


def run_eval_only(hp: Hyperparameters, runtime: Runtime) -> None:
    """EVAL_ONLY=1: the artifact and this file are all that is needed. Shape settings come from
    the artifact; evaluation settings and paths from the environment when set, else the run's."""
    artifact_path = Path(hp.artifact_path)
    blob = shared_artifact_bytes(artifact_path, runtime)
    stored = read_artifact(artifact_path, blob)["hyperparameters"]
    overrides = {}
    for name, value in stored.items():
        if name.upper() in os.environ and name in MODEL_SHAPE_FIELDS and getattr(hp, name) != value:
            raise ConfigError(f"{name.upper()}={getattr(hp, name)} contradicts the artifact's {name}={value}: "
                              f"unset it (the artifact fixes the model's shape)")
        if name.upper() not in os.environ and name in {f.name for f in dataclasses.fields(Hyperparameters)}:
            overrides[name] = value
    hp = dataclasses.replace(hp, **overrides, eval_only=True)
    # The compute dtype, compilation and tables' dtype of the run that wrote the artifact (its
    # COMPUTE_DTYPE and COMPILE as resolved on its device), unless the environment sets them.
    autocast_dtype, use_compile = resolve_compute(hp, runtime.device)
    runtime = dataclasses.replace(runtime, autocast_dtype=autocast_dtype, compile=use_compile,
                                  model_dtype=resolve_model_dtype(hp, autocast_dtype))
    log = RunLogger(Path(hp.log_dir) / f"{hp.run_id or 'eval'}_eval.txt") if runtime.master else RunLogger(None)
    luts = build_bpb_luts(load_tokenizer(hp), hp.vocab_size, runtime.device)
    val_tokens = load_validation_tokens(find_shards(hp.data_path, "val"), hp.train_seq_len, hp.vocab_size,
                                        hp.val_max_tokens)
    _, code_bytes = running_code()
    artifact_bytes = len(blob)
    log(f"eval_only artifact:{artifact_path} bytes:{artifact_bytes} val_tokens:{val_tokens.numel() - 1} "
        f"autocast:{runtime.autocast_dtype} compile:{runtime.compile} model_dtype:{runtime.model_dtype}")
    log(f"Code size: {code_bytes} bytes")
    log(f"Total submission size {artifact_label(hp.matrix_bits, read_artifact(artifact_path, blob)['compressor'])}: "
        f"{artifact_bytes + code_bytes} bytes")
    evaluate_artifact(hp, runtime, artifact_path, val_tokens, luts, log, blob)


# =============================================================================
# TRAINING LOOP: the Trainer (one optimizer step), checkpoints, the run from set-up to summary
# =============================================================================


# ---- one optimizer step: the Trainer ----


class LossTerms(NamedTuple):
    total: Tensor  # what backward runs on: ce_weight * ce + jepa_weight * (prediction + regulariser)
    ce: Tensor
    prediction: Tensor | None  # None on vanilla and zero-JEPA-weight steps
    regulariser: Tensor | None


@dataclass(frozen=True)
class StepOutcome:
    """What Trainer.step reports: the schedule's values it stepped with, and how it ended."""

    ce_weight: float  # the curriculum's CE weight (0 during JEPA_ONLY_FRACTION)
    jepa_weight: float  # the JEPA weight the step used: the schedule's, or the one priming forced (0: vanilla)
    lr_multiplier: float  # warmup x warmdown, the warmdown floored at MIN_LR
    stop: bool  # some rank was asked to stop (SIGTERM/SIGINT): the loop checkpoints and exits
    skipped: bool = False  # a non-finite loss under NAN_POLICY=skip: no update was applied
    terms: dict[str, float] | None = None  # a skipped step's loss terms, for its log line


class NonFiniteLoss(Exception):
    """A step's loss was NaN or infinite and NAN_POLICY=stop (or the weights themselves broke)."""

    def __init__(self, step: int, terms: dict[str, float], weights_finite: bool):
        super().__init__(step, terms, weights_finite)
        self.step, self.terms, self.weights_finite = step, terms, weights_finite


MAX_CONSECUTIVE_SKIPS = 20  # NAN_POLICY=skip gives up after this many non-finite steps in a row
# JEPA_GRAD_SHARE's controller: each log step moves log(weight) this fraction of the way to the
# weight the measured share asks for. 0.5 halves one micro-batch's noise (its share scatters by
# about 15% at the tiny preset's 4 sequences) and still closes 97% of a gap within 5 log steps.
JEPA_GRAD_SHARE_SMOOTHING = 0.5
JEPA_GRAD_SHARE_WEIGHT_RANGE = (1e-4, 1e3)  # the controlled weight's bounds: a stray measurement cannot run away


class Trainer:
    """The online model (DDP-wrapped, compiled), the JEPA head and target encoder, optimizers,
    the final-weights EMA and one optimizer step's logic."""

    def __init__(self, hp: Hyperparameters, runtime: Runtime, grad_accum_steps: int, train_files: list[Path],
                 log: RunLogger):
        self.hp, self.runtime, self.log = hp, runtime, log
        self.train_files = train_files
        self.grad_accum_steps = grad_accum_steps
        self.local_batch_tokens = hp.train_batch_tokens // (runtime.world_size * grad_accum_steps)
        # The backbone is built first so its initial weights do not depend on JEPA settings:
        # JEPA_WEIGHT=0 and any JEPA run with the same SEED start from the same backbone.
        torch.manual_seed(hp.seed)
        self.model = GPT(hp).to(runtime.device)
        apply_model_dtype(self.model, runtime.model_dtype)
        self.head: JepaHead | None = JepaHead(hp).to(runtime.device) if hp.jepa_enabled else None
        self.target_encoder: GPT | None = None
        # nextlat and stp have no target encoder: nextlat's target is sg of the online model's
        # own states (the paper's), stp has no target; TARGET_EMA_DECAY is ignored there.
        if self.head is not None and hp.target_ema_decay > 0 and hp.jepa_uses_latents:
            self.target_encoder = copy.deepcopy(self.model).requires_grad_(False)
            # Its tables stay fp32 whatever MODEL_DTYPE says: an EMA step of 1 - 0.9995 is far
            # below bf16's resolution, and a bf16 target would barely follow the online tables.
            apply_model_dtype(self.target_encoder, torch.float32)
        # The same compilation for every path: the vanilla run compiles exactly what a JEPA run
        # compiles for its backbone (the unfair A/B of public attempts compiled one side only).
        self.compiled_model = torch.compile(self.model, dynamic=False, fullgraph=True) if runtime.compile else self.model
        self.online = (DistributedDataParallel(self.compiled_model,
                                               device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None)
                       if runtime.distributed else self.compiled_model)
        self.compiled_head = (torch.compile(self.head, dynamic=False, fullgraph=True)
                              if runtime.compile and self.head is not None else self.head)
        self.compiled_target = (torch.compile(self.target_encoder, dynamic=False, fullgraph=True)
                                if runtime.compile and self.target_encoder is not None else self.target_encoder)
        trainable = [self.model] + ([self.head] if self.head is not None else [])
        self.optimizers = build_optimizers(hp, runtime, trainable)
        self.parameters = [p for module in trainable for p in module.parameters()]
        self.schedule = Schedule(hp, jepa_active=self.head is not None)
        self.final_ema: list[Tensor] | None = None
        if hp.final_ema_enabled():
            self.final_ema = [p.detach().clone().float() for p in self.model.parameters()]
        # SWA: the sum of the snapshots taken so far (fp32) and their count.
        self.swa_sum: list[Tensor] | None = None
        self.swa_count = 0
        self.phase = (False, False)  # (late QAT, depth recurrence), switched by set_phase
        if hp.train_max_tokens > 0:
            available = sum(check_shard_header(path) for path in train_files)
            _require(hp.train_max_tokens <= available,
                     f"TRAIN_MAX_TOKENS={hp.train_max_tokens} exceeds the {available} tokens of the training shards: "
                     f"use at most {available}, or 0 for all of them")
        self.loader = DistributedTokenLoader(train_files, hp.vocab_size, runtime.rank, runtime.world_size, runtime.device,
                                             hp.train_max_tokens)
        # The JEPA mode's random draws (span masks, stp triples): seeded, so arms with one SEED pair up.
        self.span_generator = torch.Generator().manual_seed(hp.seed * 1000 + runtime.rank)
        self.sigreg_generator = torch.Generator().manual_seed(hp.seed * 1000 + 999)
        # Sums since the last log line, kept on the device: [total, ce, jepa_loss, reg_loss].
        self.metric_sums = torch.zeros(2 + len(JEPA_LOSS_NAMES), device=runtime.device)
        # The last JEPA micro-batch (inputs, span mask, SIGReg directions): log-step diagnostics
        # are computed from it after the step, so the step itself computes nothing beyond its losses.
        self.last_jepa_batch: tuple[Tensor, Tensor | None, Tensor | None] | None = None
        # The step's first micro-batch (inputs, targets, and its last_jepa_batch entry when it had a
        # JEPA term): rank 0's first micro-batch is the global batch's first whatever the launch, so
        # the pull measured on it, and JEPA_GRAD_SHARE's weight, do not depend on WORLD_SIZE.
        self.pull_batch: tuple[Tensor, Tensor, tuple[Tensor, Tensor | None, Tensor | None] | None] | None = None
        self.last_tube_draws: Tensor | None = None  # stp: that JEPA micro-batch's draws (span_generator's)
        # Micro-steps and JEPA micro-steps in those sums, per rank: host integers, the same on
        # every rank, so counting costs no device copy.
        self.metric_counts = [0, 0]
        self.agreed_elapsed_ms = 0.0  # training time every rank agreed on at the last step
        self.stop_requested = False  # set by the SIGTERM/SIGINT handler
        self.skipped_steps = 0
        self.consecutive_skips = 0

    # ---- one micro-step ----
    def _jepa_features(self, online: nn.Module, target_encoder: nn.Module | None, inputs: Tensor,
                       targets: Tensor | None, span_mask: Tensor | None) -> tuple[Tensor | None, Tensor, Tensor]:
        """CE loss (None without targets), context features and target features of a micro-batch.
        The JEPA rows are the first JEPA_TARGET_FRACTION of its sequences; span mode adds their
        masked copies to the same online pass. Training passes the compiled modules; log-step
        diagnostics pass the plain ones under no_grad (no extra compilation)."""
        hp = self.hp
        jepa_rows = span_mask.size(0) if span_mask is not None else self.jepa_rows(inputs)
        online_inputs, token_mask = inputs, None
        if span_mask is not None:
            # One forward over [unmasked rows for CE; masked copies for the JEPA context].
            online_inputs = torch.cat([inputs, inputs[:jepa_rows]])
            token_mask = torch.cat([torch.zeros_like(inputs, dtype=torch.bool), span_mask])
        ce_loss, features = online(online_inputs, targets, feature_layer=hp.jepa_layer_index, token_mask=token_mask,
                                   mask_embedding=self.head.mask_embedding,
                                   grad_blocks=hp.jepa_grad_layers if hp.jepa_grad_layers > 0 else None)
        context = features[inputs.size(0):] if span_mask is not None else features[:jepa_rows]
        if target_encoder is None:
            # TARGET_EMA_DECAY=0: the target encoder is the online one, and it sees the same
            # unmasked input, so its output is exactly the online features under stop-gradient.
            return ce_loss, context, features[:jepa_rows].detach()
        with torch.no_grad():
            _, target_features = target_encoder(inputs[:jepa_rows], feature_layer=hp.jepa_layer_index,
                                                last_layer=hp.jepa_layer_index)
        return ce_loss, context, target_features

    def jepa_rows(self, inputs: Tensor) -> int:
        return max(1, round(inputs.size(0) * self.hp.jepa_target_fraction))

    def micro_step_losses(self, inputs: Tensor, targets: Tensor, ce_weight: float, jepa_weight: float,
                          sigreg_directions: Tensor | None = None) -> LossTerms:
        """Forward passes of one micro-batch; the caller runs backward on .total."""
        if self.head is None or jepa_weight <= 0:
            # Vanilla path (and JEPA runs' zero-weight steps): no features, no target forward.
            with self.runtime.autocast():
                ce_loss, _ = self.online(inputs, targets)
            return LossTerms(ce_weight * ce_loss, ce_loss, None, None)
        span_mask = None
        if self.hp.jepa_mode == "span":
            starts, lengths = sample_spans(self.jepa_rows(inputs), inputs.size(1), self.hp, self.span_generator)
            span_mask = spans_to_mask(starts, lengths, inputs.size(1)).to(self.runtime.device, non_blocking=True)
        self.last_tube_draws = None
        if self.hp.jepa_mode == "stp":
            self.last_tube_draws = draw_tube_uniforms(self.jepa_rows(inputs), self.hp, self.span_generator).to(
                self.runtime.device, non_blocking=True)
        self.last_jepa_batch = (inputs, span_mask, sigreg_directions)
        with self.runtime.autocast():
            ce_loss, context, target_features = self._jepa_features(self.online, self.compiled_target, inputs,
                                                                    targets, span_mask)
            prediction_loss, regulariser_loss = self.compiled_head(context, target_features, span_mask,
                                                                   sigreg_directions,
                                                                   **self.head_side_inputs(inputs, context))
        total = ce_weight * ce_loss + jepa_weight * (prediction_loss + regulariser_loss)
        return LossTerms(total, ce_loss, prediction_loss, regulariser_loss)

    @torch.no_grad()
    def jepa_diagnostics(self) -> dict[str, float]:
        """JepaHead.diagnostics on the last JEPA micro-batch with the current weights: called on log
        steps, with the training clock paused, by rank 0 only (plain modules, no collective)."""
        inputs, span_mask, sigreg_directions = self.last_jepa_batch
        with self.runtime.autocast():
            _, context, target_features = self._jepa_features(self.model, self.target_encoder, inputs, None, span_mask)
            return self.head.diagnostics(context, target_features, span_mask, sigreg_directions,
                                         **self.head_side_inputs(inputs, context))

    def head_side_inputs(self, inputs: Tensor, context: Tensor) -> dict[str, Tensor | None]:
        """What nextlat and stp read besides the features, for every call of the head (training,
        diagnostics, the pull measurement): the JEPA rows' tokens (teacher forcing and document
        boundaries), the tied table (nextlat's e(x) and frozen head; the head detaches it) and
        the micro-batch's stp draws (drawn in micro_step_losses). Nothing for the latent modes."""
        if self.hp.jepa_uses_latents:
            return {}
        return {"input_ids": inputs[:context.size(0)], "embedding_weight": self.model.token_embedding.weight,
                "tube_draws": self.last_tube_draws}

    # ---- log steps: the JEPA term's pull on the backbone, and the weight that holds a given pull ----
    def measure_pull(self, ce_weight: float, jepa_weight: float) -> dict[str, float] | None:
        """How hard the JEPA term pulls on the backbone, from a fresh forward of the step's first
        micro-batch (pull_batch) with the current weights (rank 0, log steps, clock paused; the
        plain modules, so nothing compiles and DDP is not involved). Over the backbone matrices Muon updates:
        jepa_grad_share = ||g_JEPA|| / ||g_CE||, g_JEPA the gradient of jepa_weight * (prediction +
        regulariser) as it enters the loss, g_CE that of the CE loss at weight 1 (finite during a
        JEPA_ONLY_FRACTION phase too); jepa_update_cos = cosine of Muon's directions for the CE
        gradient with and without g_JEPA (_muon_update_cosine). torch.autograd.grad leaves .grad,
        the optimizer states, the generators and the data position alone. jepa_unit_share is the
        share per unit of weight (the controller's input). None when that micro-batch had no
        JEPA term (a zero-weight step)."""
        if self.head is None or self.pull_batch is None or self.pull_batch[2] is None:
            return None
        _, targets, (inputs, span_mask, sigreg_directions) = self.pull_batch
        backbone = [p for p in self.model.parameters() if p.requires_grad]
        with self.runtime.autocast():
            ce_loss, context, target_features = self._jepa_features(self.model, self.target_encoder, inputs, targets,
                                                                    span_mask)
            prediction_loss, regulariser_loss = self.head(context, target_features, span_mask, sigreg_directions,
                                                          **self.head_side_inputs(inputs, context))
        ce_grads = torch.autograd.grad(ce_loss, backbone, retain_graph=True, allow_unused=True)
        jepa_grads = torch.autograd.grad(prediction_loss + regulariser_loss, backbone, allow_unused=True)
        ce_grads = [torch.zeros_like(p) if g is None else g for g, p in zip(ce_grads, backbone)]
        jepa_grads = [torch.zeros_like(p) if g is None else g for g, p in zip(jepa_grads, backbone)]
        muon_ids = {id(p) for group in self.optimizers[0].param_groups for p in group["params"]}
        matrices = [index for index, param in enumerate(backbone) if id(param) in muon_ids]

        def matrices_norm(grads: list[Tensor]) -> float:
            return torch.linalg.vector_norm(torch.stack([grads[i].double().norm() for i in matrices])).item()

        unit_share = matrices_norm(jepa_grads) / max(matrices_norm(ce_grads), 1e-30)
        without = [ce_weight * g for g in ce_grads]
        with_jepa = [ce_weight * g + jepa_weight * j for g, j in zip(ce_grads, jepa_grads)]
        return {"jepa_grad_share": jepa_weight * unit_share,
                "jepa_update_cos": self._muon_update_cosine(backbone, without, with_jepa),
                "jepa_unit_share": unit_share}

    @torch.no_grad()
    def _muon_update_cosine(self, params: list[Tensor], without: list[Tensor], with_jepa: list[Tensor]) -> float:
        """Cosine of the concatenated Muon directions of the backbone matrices for two candidate
        gradients of the backbone (params): each clipped as clip_gradients clips the backbone,
        folded into a copy of the momentum buffer and orthogonalised as Muon.step does (Nesterov,
        Newton-Schulz, the tall-matrix scale). One micro-batch's gradient stands in for the step's
        mean (the same scale: training divides each micro-step's loss by GRAD_ACCUM_STEPS); with several ranks only rank 0's Muon shard has buffers, so the cosine is
        over that shard. 1.0 when no matrix has a buffer yet."""
        muon = self.optimizers[0]
        group_of = {id(p): group for group in muon.param_groups for p in group["params"]}

        def clip_scale(grads: list[Tensor]) -> float:
            if self.hp.grad_clip_norm <= 0:
                return 1.0
            total = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item()
            return min(1.0, self.hp.grad_clip_norm / (total + 1e-6))  # clip_grad_norm_'s coefficient

        scales = (clip_scale(without), clip_scale(with_jepa))
        dot = norm_without = norm_with = 0.0
        for param, gradient_without, gradient_with in zip(params, without, with_jepa):
            group, state = group_of.get(id(param)), muon.state.get(param, {})
            if group is None or "momentum_buffer" not in state:
                continue
            directions = []
            for gradient, scale in ((gradient_without, scales[0]), (gradient_with, scales[1])):
                gradient = gradient * scale
                buffer = state["momentum_buffer"] * group["momentum"] + gradient
                update = newton_schulz_orthogonalize(gradient + group["momentum"] * buffer, group["backend_steps"],
                                                     muon.kind)
                directions.append(update.double().flatten() * max(1.0, param.size(0) / param.size(1)) ** 0.5)
            dot += float(directions[0] @ directions[1])
            norm_without += float(directions[0] @ directions[0])
            norm_with += float(directions[1] @ directions[1])
        if norm_without == 0.0 or norm_with == 0.0:
            return 1.0
        return dot / math.sqrt(norm_without * norm_with)

    def log_step_pull(self, outcome: StepOutcome) -> dict[str, float]:
        """On a log step, on every rank (it may broadcast): rank 0 measures the pull of the step
        just taken (measure_pull); with JEPA_GRAD_SHARE the base JEPA weight then moves towards the
        one that holds the share (_steer_jepa_weight). Returns what the train line shows."""
        if self.head is None:
            return {}
        metrics: dict[str, float] = {}
        if self.runtime.master:
            metrics = self.measure_pull(outcome.ce_weight, outcome.jepa_weight) or {}
        unit_share = metrics.pop("jepa_unit_share", float("nan"))
        if self.hp.jepa_grad_share > 0:
            self._steer_jepa_weight(unit_share)
            metrics["jepa_base_weight"] = self.schedule.base_jepa_weight
        return metrics

    def _steer_jepa_weight(self, unit_share: float) -> None:
        """JEPA_GRAD_SHARE's controller. The share is linear in the weight (g_JEPA = weight *
        gradient of the JEPA losses), so the weight that holds share s is s / unit_share; the base
        weight moves that way by a geometric EMA of factor JEPA_GRAD_SHARE_SMOOTHING (one
        micro-batch's share is noisy), clamped to JEPA_GRAD_SHARE_WEIGHT_RANGE, and rank 0's value
        is broadcast: every rank steps with the same weight. No measurement (a zero-weight step):
        the weight stays."""
        weight = self.schedule.base_jepa_weight
        if self.runtime.master and math.isfinite(unit_share) and unit_share > 0:
            wanted = self.hp.jepa_grad_share / unit_share
            weight *= math.exp(JEPA_GRAD_SHARE_SMOOTHING * (math.log(wanted) - math.log(weight)))
            weight = min(max(weight, JEPA_GRAD_SHARE_WEIGHT_RANGE[0]), JEPA_GRAD_SHARE_WEIGHT_RANGE[1])
        if self.runtime.distributed:
            shared = torch.full((1,), weight, dtype=torch.float64, device=self.runtime.device)
            dist.broadcast(shared, src=0)
            weight = float(shared.item())
        self.schedule.base_jepa_weight = weight

    def _sync_head_gradients(self) -> None:
        """DDP averages the backbone's gradients during backward; the JEPA head lives outside
        DDP (it is idle on zero-weight steps, which DDP would reject), so it gets one flat
        all-reduce here. Which parameters have a gradient depends only on the step's agreed
        path, so the set is the same on every rank; parameters without one keep None, as in a
        single-process run (AdamW then does not count a step for them)."""
        if not self.runtime.distributed or self.head is None:
            return
        params = [p for p in self.head.parameters() if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.runtime.world_size
        offset = 0
        for param in params:
            param.grad = flat[offset:offset + param.numel()].view_as(param).clone()
            offset += param.numel()

    def _agree(self, loss_sum: Tensor, elapsed_ms: Callable[[], float]) -> tuple[bool, bool]:
        """The step's one host sync: every rank learns whether any rank's loss is non-finite or
        any rank was asked to stop, and all adopt the largest elapsed training time, so that
        schedules and stop decisions never differ between ranks. Called after the last
        micro-step's forward and before its backward: the GPU waits only for one kernel launch."""
        # torch.full passes host values as kernel arguments: no blocking host-to-device copy.
        options = dict(dtype=torch.float64, device=self.runtime.device)
        status = torch.stack([(~torch.isfinite(loss_sum)).to(torch.float64),
                              torch.full((), float(self.stop_requested), **options),
                              torch.full((), elapsed_ms(), **options)])
        if self.runtime.distributed:
            dist.all_reduce(status, op=dist.ReduceOp.MAX)
        nonfinite, stop, agreed_ms = status.tolist()
        self.agreed_elapsed_ms = agreed_ms
        return nonfinite > 0, stop > 0

    def _sigreg_directions(self) -> Tensor | None:
        if self.head is None or self.hp.anti_collapse != "sigreg" or not self.hp.jepa_uses_latents:
            return None
        return draw_sigreg_directions(self.hp, self.sigreg_generator, self.runtime.device)

    def set_phase(self, phase: tuple[bool, bool], step: int | None = None) -> None:
        """Late QAT and depth recurrence on or off; logged when a training step switches them."""
        if phase == self.phase:
            return
        qat, looping = phase
        set_late_qat(self.model, self.hp.matrix_bits if qat else 0)
        set_looping([self.model, self.target_encoder], looping)
        if step is not None:
            for name, before, after in zip(("late_qat", "looping"), self.phase, phase):
                if before != after:
                    self.log(f"{name}: {'on' if after else 'off'} from step {step} "
                             f"(progress {self.schedule.progress(step, self.agreed_elapsed_ms):.3f})")
        self.phase = phase

    def step(self, step: int, elapsed_ms: Callable[[], float], jepa_weight: float | None = None,
             phase: tuple[bool, bool] | None = None) -> StepOutcome:
        """One optimizer step over GRAD_ACCUM_STEPS micro-batches. Returns the schedule values
        and whether the step was skipped (non-finite loss, NAN_POLICY=skip) or a stop was asked.
        jepa_weight and phase override the schedule's (compile priming forces each path once)."""
        hp = self.hp
        if phase is None:
            self.set_phase(self.schedule.phase(step, self.agreed_elapsed_ms), step)
        else:
            self.set_phase(phase)
        ce_weight = self.schedule.ce_weight(step, self.agreed_elapsed_ms)
        if jepa_weight is None:
            jepa_weight = self.schedule.jepa_weight(step, self.agreed_elapsed_ms)
        sigreg_directions = self._sigreg_directions()
        sums = torch.zeros_like(self.metric_sums)  # this step's [total, ce, jepa, reg] over micro-steps
        jepa_micro_steps = 0
        nonfinite = stop = False
        for micro_step in range(self.grad_accum_steps):
            last = micro_step == self.grad_accum_steps - 1
            if self.runtime.distributed:
                # Gradients are all-reduced only on the last micro-step; earlier ones accumulate locally.
                self.online.require_backward_grad_sync = last
            inputs, targets = self.loader.next_batch(self.local_batch_tokens, hp.train_seq_len)
            terms = self.micro_step_losses(inputs, targets, ce_weight, jepa_weight, sigreg_directions)
            if micro_step == 0:  # what a log step's measure_pull re-reads (a reference, no copy)
                self.pull_batch = (inputs, targets, self.last_jepa_batch if terms.prediction is not None else None)
            total = terms.total * float("nan") if step == hp.debug_nan_step else terms.total
            sums[0] += total.detach()
            sums[1] += terms.ce.detach()
            if terms.prediction is not None:
                sums[2] += terms.prediction.detach()
                sums[3] += terms.regulariser.detach()
                jepa_micro_steps += 1
            if last:
                nonfinite, stop = self._agree(sums[0], elapsed_ms)
            # Even a non-finite last micro-step runs its backward: DDP has prepared its reduction
            # in the forward and must complete it, or the next step's gradients would be wrong.
            (total / self.grad_accum_steps).backward()
        outcome = StepOutcome(ce_weight=ce_weight, jepa_weight=jepa_weight, stop=stop,
                              lr_multiplier=self.schedule.lr_multiplier(step, self.agreed_elapsed_ms))
        if nonfinite:
            return self._skip_or_raise(step, sums, jepa_micro_steps, outcome)
        self.consecutive_skips = 0
        self._sync_head_gradients()
        momentum_fraction = min(step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps > 0 else 1.0
        muon_momentum = (1 - momentum_fraction) * hp.muon_momentum_warmup_start + momentum_fraction * hp.muon_momentum
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * outcome.lr_multiplier
                if isinstance(optimizer, Muon):
                    group["momentum"] = muon_momentum
        self.clip_gradients()
        for optimizer in self.optimizers:
            optimizer.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.update_averages(step, self.schedule.warmdown(step, self.agreed_elapsed_ms))
        self.metric_sums += sums
        self.metric_counts[0] += self.grad_accum_steps
        self.metric_counts[1] += jepa_micro_steps
        return outcome

    def clip_gradients(self) -> None:
        """GRAD_CLIP_NORM on the backbone's gradients by their own norm, exactly as in the vanilla
        run, and on the JEPA head's separately: one global norm would let the head's gradients
        change how far the backbone is scaled, and the backbone would not train as its control."""
        if self.hp.grad_clip_norm <= 0:
            return
        torch.nn.utils.clip_grad_norm_(list(self.model.parameters()), self.hp.grad_clip_norm)
        if self.head is not None:
            torch.nn.utils.clip_grad_norm_(list(self.head.parameters()), self.hp.grad_clip_norm)

    def _skip_or_raise(self, step: int, sums: Tensor, jepa_micro_steps: int, outcome: StepOutcome) -> StepOutcome:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        values = sums.tolist()
        terms = {"total_loss": values[0] / self.grad_accum_steps, "ce_loss": values[1] / self.grad_accum_steps}
        if jepa_micro_steps:
            terms.update(jepa_loss=values[2] / jepa_micro_steps, reg_loss=values[3] / jepa_micro_steps)
        weights_finite = self.weights_finite()
        self.consecutive_skips += 1
        if self.hp.nan_policy == "skip" and weights_finite and self.consecutive_skips <= MAX_CONSECUTIVE_SKIPS:
            self.skipped_steps += 1
            return dataclasses.replace(outcome, skipped=True, terms=terms)
        raise NonFiniteLoss(step, terms, weights_finite)

    def weights_finite(self) -> bool:
        flags = torch.stack([torch.isfinite(p).all() for p in self.parameters])
        if self.runtime.distributed:
            flags = flags.all().to(torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return bool(flags.all().item())

    @torch.no_grad()
    def update_averages(self, step: int, warmdown: float) -> None:
        """The EMA target encoder and the final-weights EMA follow the online weights after every
        optimizer step; SWA takes a snapshot every SWA_EVERY steps once the warmdown (before any
        LR warmup and MIN_LR floor) is below SWA_START_LR. Every rank holds identical online
        weights, so every rank's averages agree."""
        online = list(self.model.parameters())
        if self.target_encoder is not None:
            ema_update(list(self.target_encoder.parameters()), online, self.hp.target_ema_decay)
        if self.final_ema is not None:
            ema_update(self.final_ema, [p.detach().float() for p in online], self.hp.final_ema_decay)
        if self.hp.swa_enabled and (step + 1) % self.hp.swa_every == 0 and warmdown < self.hp.swa_start_lr:
            # Snapshots of the EMA when there is one: SWA then averages the smoothed trajectory.
            snapshot = self.final_ema if self.final_ema is not None else [p.detach().float() for p in online]
            if self.swa_sum is None:
                self.swa_sum = [tensor.clone() for tensor in snapshot]
            else:
                torch._foreach_add_(self.swa_sum, snapshot)
            self.swa_count += 1

    def final_weights(self) -> tuple[str, list[Tensor]] | None:
        """The averaged weights training ends with: the SWA mean when it took any snapshot, else
        the final EMA when it is on; None when the last weights are the final ones."""
        if self.swa_count > 0:
            source = "ema" if self.final_ema is not None else "raw"
            return f"swa of {self.swa_count} {source} snapshots", [t / self.swa_count for t in self.swa_sum]
        if self.final_ema is not None:
            return "ema", self.final_ema
        return None

    def read_metrics(self) -> dict[str, float]:
        """Averages since the last call (a host sync, on log steps only)."""
        sums = self.metric_sums.clone()
        if self.runtime.distributed:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        sums = sums.tolist()
        counts = [count * self.runtime.world_size for count in self.metric_counts]
        self.metric_sums.zero_()
        self.metric_counts = [0, 0]
        metrics = {"train_loss": sums[1] / max(counts[0], 1), "total_loss": sums[0] / max(counts[0], 1)}
        if counts[1] > 0:
            metrics.update({name: value / counts[1] for name, value in zip(JEPA_LOSS_NAMES, sums[2:])})
        return metrics

    def reset_stream_state(self) -> None:
        """Data position, random generators and metric sums as at step 0."""
        self.loader = DistributedTokenLoader(self.train_files, self.hp.vocab_size, self.runtime.rank,
                                             self.runtime.world_size, self.runtime.device, self.hp.train_max_tokens)
        self.span_generator.manual_seed(self.hp.seed * 1000 + self.runtime.rank)
        self.sigreg_generator.manual_seed(self.hp.seed * 1000 + 999)
        self.metric_sums.zero_()
        self.metric_counts = [0, 0]
        self.last_jepa_batch = None
        self.pull_batch = None
        self.last_tube_draws = None

    def modules_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "head": self.head.state_dict() if self.head is not None else None,
            "target_encoder": self.target_encoder.state_dict() if self.target_encoder is not None else None,
            "final_ema": self.final_ema,
            "swa": (self.swa_sum, self.swa_count),
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
        }

    def load_modules_state(self, state: dict[str, Any]) -> None:
        device = self.runtime.device
        self.model.load_state_dict(state["model"])
        if self.head is not None:
            self.head.load_state_dict(state["head"])
        if self.target_encoder is not None:
            self.target_encoder.load_state_dict(state["target_encoder"])
        if self.final_ema is not None:
            self.final_ema = [tensor.to(device=device, dtype=torch.float32).clone() for tensor in state["final_ema"]]
        swa_sum, self.swa_count = state.get("swa", (None, 0))
        self.swa_sum = None if swa_sum is None else [tensor.to(device=device).clone() for tensor in swa_sum]
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(optimizer_state)


def prime_and_undo(trainer: Trainer) -> int:
    """WARMUP_STEPS: prime compilation and the allocator on the real step function, then undo every
    effect (weights, optimizer states, averages, data position, generators). The steps cycle
    through every path a run takes, at least once each, whatever its schedule says at those steps:
    a JEPA run's JEPA and zero-weight steps, each in every (late QAT, looping) phase the run
    reaches. Nothing compiles once the training clock runs. Returns the count."""
    weights: list[float | None] = [None] if trainer.head is None else [trainer.hp.jepa_weight, 0.0]
    paths = [(weight, phase) for phase in trainer.schedule.reachable_phases() for weight in weights]
    count = max(trainer.hp.warmup_steps, len(paths))
    saved = copy.deepcopy(trainer.modules_state())
    swa_sum, swa_count = trainer.swa_sum, trainer.swa_count
    for warmup_step in range(count):
        weight, phase = paths[warmup_step % len(paths)]
        trainer.step(warmup_step, lambda: 0.0, jepa_weight=weight, phase=phase)
    trainer.load_modules_state(saved)
    trainer.swa_sum, trainer.swa_count = swa_sum, swa_count
    trainer.set_phase((False, False))
    trainer.reset_stream_state()
    return count


# ---- checkpoints: resumable state, written atomically by rank 0 ----
# A checkpoint holds everything a bit-exact continuation needs: weights, head, target encoder,
# final-weights EMA, every optimizer state (Muon's momentum is sharded across ranks and gathered
# here), the step, the training time so far, the data position, the random generators, the
# metric sums of the unfinished log interval and the histories of the summary.

# Settings that may change between a run and its resumption; any other difference is refused.
RESUME_MAY_DIFFER = {"resume", "run_id", "checkpoint_every", "checkpoint_dir", "log_dir", "train_log_every",
                     "val_loss_every", "artifact_path", "nan_policy", "data_path", "tokenizer_path",
                     "debug_nan_step", "eval_stride"}


def checkpoint_folder(hp: Hyperparameters) -> Path:
    return Path(hp.checkpoint_dir) / hp.run_id


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def save_checkpoint(trainer: Trainer, step: int, train_ms: float, extra: dict[str, Any], log: RunLogger) -> Path:
    """Collective: every rank calls it (ranks hold different Muon shards and span generators);
    rank 0 writes CHECKPOINT_DIR/<RUN_ID>/step_NNNNNN.pt atomically and removes older ones."""
    runtime, hp = trainer.runtime, trainer.hp
    if runtime.distributed:  # fold every rank's unlogged metric sums into rank 0's, which is saved
        dist.all_reduce(trainer.metric_sums, op=dist.ReduceOp.SUM)
        if not runtime.master:
            trainer.metric_sums.zero_()
    state = _to_cpu(trainer.modules_state())
    rank_local = {"muon": state["optimizers"][0]["state"], "span_generator": trainer.span_generator.get_state()}
    per_rank = [rank_local]
    if runtime.distributed:
        per_rank = [None] * runtime.world_size if runtime.master else None
        dist.gather_object(rank_local, per_rank, dst=0)
    path = checkpoint_folder(hp) / f"step_{step:06d}.pt"
    if runtime.master:
        for shard in per_rank:  # Muon parameter i has state on rank i % WORLD_SIZE only
            state["optimizers"][0]["state"].update(shard["muon"])
        checkpoint = {
            "format": 1, "config": dataclasses.asdict(hp), "step": step, "train_ms": train_ms,
            "world_size": runtime.world_size, **state,
            "span_generators": [shard["span_generator"] for shard in per_rank],
            "sigreg_generator": trainer.sigreg_generator.get_state(),
            "torch_rng": torch.get_rng_state(), "loader": trainer.loader.stream.state(),
            "metric_sums": trainer.metric_sums.cpu(), "metric_counts": list(trainer.metric_counts),
            "agreed_elapsed_ms": trainer.agreed_elapsed_ms, "skipped_steps": trainer.skipped_steps,
            "jepa_base_weight": trainer.schedule.base_jepa_weight, **extra,
        }
        with atomic_output(path) as handle:
            torch.save(checkpoint, handle)
        for older in path.parent.glob("step_*.pt"):
            if older != path:
                older.unlink()
        log(f"checkpoint: {path} (step {step}, {path.stat().st_size / 2**20:.1f} MiB)")
    if runtime.distributed:
        dist.barrier()
    return path


def find_resume_checkpoint(hp: Hyperparameters, log: RunLogger) -> Path | None:
    if not hp.resume:
        return None
    if hp.resume != "auto":
        path = Path(hp.resume)
        if not path.is_file():
            raise ConfigError(f"RESUME={hp.resume}: no such checkpoint file (use RESUME=auto to take the latest "
                              f"of RUN_ID's folder under CHECKPOINT_DIR)")
        return path
    candidates = sorted(checkpoint_folder(hp).glob("step_*.pt"))
    if not candidates:
        log(f"resume: no checkpoint under {checkpoint_folder(hp)}, starting from step 0")
        return None
    return candidates[-1]


def load_checkpoint(path: Path, trainer: Trainer) -> dict[str, Any]:
    """Restore a checkpoint into the trainer (on every rank); returns the checkpoint's dict."""
    hp, runtime = trainer.hp, trainer.runtime
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn or foreign file: say which and why, in one line
        raise ConfigError(f"checkpoint {path} cannot be read ({type(error).__name__}): delete it or name another "
                          f"with RESUME=PATH") from None
    saved, current = checkpoint["config"], dataclasses.asdict(hp)
    differing = [name for name in current if name not in RESUME_MAY_DIFFER and saved.get(name) != current[name]]
    if differing:
        listed = ", ".join(f"{name.upper()}={current[name]!r} (checkpoint: {saved.get(name)!r})" for name in differing)
        raise ConfigError(f"checkpoint {path} comes from a different configuration: {listed}; restore those settings "
                          f"or start a fresh run (another RUN_ID, or RESUME unset)")
    trainer.load_modules_state(checkpoint)
    muon = trainer.optimizers[0]
    for group in muon.param_groups:  # keep only this rank's Muon shard (ownership is per group, as in Muon.step)
        for index, param in enumerate(group["params"]):
            if index % runtime.world_size != runtime.rank:
                muon.state.pop(param, None)
    span_states = checkpoint["span_generators"]
    if checkpoint["world_size"] == runtime.world_size:
        trainer.span_generator.set_state(span_states[runtime.rank])
    else:  # another world size: span masks continue from a fresh, still deterministic stream
        trainer.span_generator.manual_seed(hp.seed * 1000 + runtime.rank + 7919 * checkpoint["step"])
    trainer.sigreg_generator.set_state(checkpoint["sigreg_generator"])
    torch.set_rng_state(checkpoint["torch_rng"])
    trainer.loader.stream.restore(checkpoint["loader"])
    if checkpoint["world_size"] == runtime.world_size:  # else the unlogged interval's sums are dropped
        if runtime.master:  # rank 0 saved the sums of all ranks
            trainer.metric_sums.copy_(checkpoint["metric_sums"])
        trainer.metric_counts = list(checkpoint["metric_counts"])
    trainer.agreed_elapsed_ms = checkpoint["agreed_elapsed_ms"]
    trainer.skipped_steps = checkpoint["skipped_steps"]
    # JEPA_GRAD_SHARE's controlled weight; checkpoints from before it ran at JEPA_WEIGHT.
    trainer.schedule.base_jepa_weight = checkpoint.get("jepa_base_weight", hp.jepa_weight)
    return checkpoint


# ---- the run: set-up, the loop, and the stages after it ----


class TrainingClock:
    """Training time in milliseconds, paused (after a device sync) while evaluating or saving:
    the wall-clock cap counts training only, as in parameter-golf."""

    def __init__(self, runtime: Runtime, offset_ms: float = 0.0):
        self.runtime = runtime
        self.accumulated_ms = offset_ms
        self.started: float | None = None

    def start(self) -> None:
        self.runtime.synchronize()
        self.started = time.perf_counter()

    def pause(self) -> float:
        self.runtime.synchronize()
        self.accumulated_ms = self.elapsed_ms()
        self.started = None
        return self.accumulated_ms

    def elapsed_ms(self) -> float:
        running = 1000.0 * (time.perf_counter() - self.started) if self.started is not None else 0.0
        return self.accumulated_ms + running


def jepa_settings_line(hp: Hyperparameters) -> str:
    """The start-up line of the JEPA settings that apply to the run's mode (and, for nextlat and
    stp, the latent modes' settings they ignore)."""
    if not hp.jepa_enabled:
        return "jepa:off (JEPA_WEIGHT=0, vanilla baseline)"
    if hp.jepa_uses_latents:
        return (f"jepa_mode:{hp.jepa_mode} jepa_weight:{hp.jepa_weight} d_latent:{hp.d_latent} offsets:{hp.jepa_offsets} "
                f"target_ema_decay:{hp.target_ema_decay} anti_collapse:{hp.anti_collapse} on:{hp.regularised_side} "
                f"layer:{hp.jepa_layer_index}")
    ignored = ("ignored: TARGET_EMA_DECAY (no target encoder), D_LATENT, JEPA_PRED_MULT, JEPA_LOSS, ANTI_COLLAPSE, "
               "VICREG_*, SIGREG_*, the span and chunk settings")
    if hp.jepa_mode == "nextlat":
        return (f"jepa_mode:nextlat jepa_weight:{hp.jepa_weight} smooth_l1_weight:{hp.nextlat_smooth_l1_weight} "
                f"kl_weight:{hp.nextlat_kl_weight} rollout:{hp.nextlat_rollout} "
                f"hidden:{hp.nextlat_hidden or hp.model_dim} target:sg(online final state) layer:{hp.jepa_layer_index} "
                f"({ignored})")
    return (f"jepa_mode:stp jepa_weight:{hp.jepa_weight} (the paper's range: 0.005-0.04) triples:{hp.stp_triples} "
            f"per sequence layer:{hp.jepa_layer_index} target:none ({ignored})")


def describe_run(trainer: Trainer, log: RunLogger) -> None:
    """The start-up lines: sizes, device, the JEPA settings and the record stack's switches."""
    hp, runtime, grad_accum_steps = trainer.hp, trainer.runtime, trainer.grad_accum_steps
    backbone_params = sum(p.numel() for p in trainer.model.parameters())
    head_params = sum(p.numel() for p in trainer.head.parameters()) if trainer.head is not None else 0
    target_kind = ("ema" if trainer.target_encoder is not None
                   else "stop-grad online" if trainer.head is not None and hp.jepa_mode != "stp" else "none")
    log(f"model_params:{backbone_params} jepa_params:{head_params} target_encoder:{target_kind}")
    log(f"device:{device_name(runtime)} world_size:{runtime.world_size} grad_accum_steps:{grad_accum_steps} "
        f"autocast:{runtime.autocast_dtype} compile:{runtime.compile}")
    log(jepa_settings_line(hp))
    log(f"stack: ortho_init:{int(hp.ortho_init)} scalar_wd:{hp.scalar_wd} bos_smear_fix:{int(hp.bos_smear_fix)} "
        f"ve:{hp.ve_dim}@{','.join(map(str, hp.value_embedding_layers)) or 'off'} "
        f"rope_train_seq_len:{hp.rope_train_seq_len} swa:{int(hp.swa_enabled)} qat_last:{hp.qat_start_fraction} "
        f"parallel_from:{hp.parallel_residual_start} loops:{hp.loop_layers or 'off'}x{hp.loop_count}"
        f"@{hp.loop_start_fraction} muon_ns:{hp.muon_ns} min_lr:{hp.min_lr} skip_gates:{int(hp.skip_gates)} "
        f"attn_output_gate:{int(hp.attn_output_gate)} model_dtype:{runtime.model_dtype} "
        f"tf32:{int(hp.tf32 and runtime.device.type == 'cuda')}")
    log(f"train_batch_tokens:{hp.train_batch_tokens} train_seq_len:{hp.train_seq_len} iterations:{hp.iterations} "
        f"max_wallclock_seconds:{hp.max_wallclock_seconds} final_ema:{hp.final_ema_enabled()} seed:{hp.seed}")
    if hp.jepa_enabled and (hp.jepa_grad_share > 0 or hp.jepa_head_lr > 0):
        log(f"jepa_grad_share:{hp.jepa_grad_share} (0 = fixed weight; else from JEPA_WEIGHT={hp.jepa_weight}, smoothing "
            f"{JEPA_GRAD_SHARE_SMOOTHING}, range {JEPA_GRAD_SHARE_WEIGHT_RANGE}) "
            f"jepa_head_lr:{hp.jepa_head_lr or hp.matrix_lr}")
    if hp.train_max_tokens > 0:
        step_tokens = hp.train_batch_tokens + grad_accum_steps * runtime.world_size  # +1 target token per rank slice
        log(f"train_max_tokens:{hp.train_max_tokens} (~{hp.iterations * step_tokens / hp.train_max_tokens:.2f} epochs "
            f"over the run: {hp.iterations} steps * {step_tokens} tokens / {hp.train_max_tokens}, fewer if the "
            f"wall-clock cap stops it first)")


def format_train_line(step: int, hp: Hyperparameters, metrics: dict[str, float], outcome: StepOutcome,
                      train_ms: float, eta_seconds: float) -> str:
    parts = [f"step:{step}/{hp.iterations}", f"train_loss:{metrics['train_loss']:.4f}"]
    if "jepa_loss" in metrics:
        parts += [f"jepa_loss:{metrics['jepa_loss']:.4f}", f"reg_loss:{metrics['reg_loss']:.4f}"]
    if "tgt_rank" in metrics:
        parts += [f"reg_other:{metrics['reg_other']:.4f}",
                  f"pred_std:{metrics['pred_std_mean']:.3f}/{metrics['pred_std_min']:.3f}",
                  f"tgt_std:{metrics['tgt_std_mean']:.3f}/{metrics['tgt_std_min']:.3f}",
                  f"tgt_rank:{metrics['tgt_rank']:.1f}"]
    if "nextlat_kl" in metrics:  # nextlat's two terms, unweighted
        parts += [f"nextlat_smooth_l1:{metrics['nextlat_smooth_l1']:.4f}", f"nextlat_kl:{metrics['nextlat_kl']:.4f}"]
    if "stp_cos" in metrics:
        parts += [f"stp_cos:{metrics['stp_cos']:.4f}", f"stp_valid:{metrics['stp_valid']:.3f}"]
    if "jepa_grad_share" in metrics:  # the pull: Muon's cosine sits near 1, so it needs the digits
        parts += [f"jepa_grad_share:{metrics['jepa_grad_share']:.4f}", f"jepa_update_cos:{metrics['jepa_update_cos']:.6f}"]
    if hp.jepa_enabled:
        parts.append(f"jepa_w:{outcome.jepa_weight:.4f}")
        if "jepa_base_weight" in metrics:  # JEPA_GRAD_SHARE's controller: the weight ramp and anneal multiply
            parts.append(f"jepa_base_w:{metrics['jepa_base_weight']:.4g}")
        if hp.jepa_only_fraction > 0:
            parts.append(f"ce_w:{outcome.ce_weight:.0f}")
    parts += [f"lr_mul:{outcome.lr_multiplier:.3f}", f"train_time:{train_ms:.0f}ms",
              f"step_avg:{train_ms / max(step, 1):.2f}ms", f"eta:{format_duration(eta_seconds)}"]
    return " ".join(parts)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    write_atomically(path, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode("utf-8"))


@dataclass
class TrainingRun:
    """What the stages of a training run share, from set-up to summary: the settings (with the
    run's id), the logger, the validation data, the trainer, the summary that <RUN_ID>.json
    receives, and where the loop stands."""

    hp: Hyperparameters
    runtime: Runtime
    log: RunLogger
    code_bytes: int  # the bytes of the file that ran: the artifact's budget counts them
    luts: tuple[Tensor, Tensor, Tensor]
    val_tokens: Tensor
    trainer: Trainer
    summary: dict[str, Any]
    summary_path: Path
    step: int = 0  # optimizer steps done (a resumed run starts at its checkpoint's)
    clock_offset_ms: float = 0.0  # training time before this process: a resumed run's
    eval_ms_total: float = 0.0  # validation time so far, kept out of the training clock
    last_checkpoint: Path | None = None
    train_ms: float = 0.0  # the training clock when the loop ended
    stage_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # the stages after the loop, timed

    def finish_summary(self, status: str, **fields: Any) -> None:
        """Close the summary with its status (completed, interrupted, nonfinite_loss, ...); rank 0
        writes it."""
        self.summary.update(status=status, finished_at=datetime.datetime.now().isoformat(timespec="seconds"),
                            **fields)
        if self.runtime.master:
            write_summary(self.summary_path, self.summary)

    def save_checkpoint(self, train_ms: float) -> Path:
        """A checkpoint of the current step (collective: every rank calls it), with the summary's
        histories and the validation time, which a resumed run continues."""
        extra = {"val_history": self.summary["val_history"], "train_history": self.summary["train_history"],
                 "eval_ms": self.eval_ms_total}
        self.last_checkpoint = save_checkpoint(self.trainer, self.step, train_ms, extra, self.log)
        return self.last_checkpoint


def agree_on_run_id(hp: Hyperparameters, runtime: Runtime) -> str:
    """RUN_ID, or the date, time and a random suffix; every rank takes rank 0's, since the id
    names the logs and the checkpoints."""
    run_id = hp.run_id or f"{datetime.datetime.now():%Y%m%d_%H%M%S}_{uuid.uuid4().hex[:6]}"
    if runtime.distributed:
        shared = [run_id]
        dist.broadcast_object_list(shared, src=0)
        run_id = shared[0]
    return run_id


def open_run_log(hp: Hyperparameters, runtime: Runtime, code: str) -> RunLogger:
    """<LOG_DIR>/<RUN_ID>.txt on rank 0. Like parameter-golf's logs it opens with the trainer's
    source and the resolved configuration (in the file only), so a log alone says what ran."""
    log_path = Path(hp.log_dir) / f"{hp.run_id}.txt"
    log = RunLogger(log_path if runtime.master else None)
    log(code, console=False)
    log("=" * 100, console=False)
    log(f"Running Python {sys.version.split()[0]}, PyTorch {torch.__version__}, device {device_name(runtime)}",
        console=False)
    log("resolved configuration:", console=False)
    for name, value in dataclasses.asdict(hp).items():
        log(f"  {name.upper()}={value}", console=False)
    log("=" * 100, console=False)
    log(f"run_id:{hp.run_id} log:{log_path}")
    return log


def load_run_data(hp: Hyperparameters, runtime: Runtime,
                  log: RunLogger) -> tuple[tuple[Tensor, Tensor, Tensor], list[Path], Tensor]:
    """val_bpb's byte tables, the training shards and the validation tokens."""
    luts = build_bpb_luts(load_tokenizer(hp), hp.vocab_size, runtime.device)
    train_files, val_files = find_shards(hp.data_path, "train"), find_shards(hp.data_path, "val")
    for path in train_files:  # headers and sizes now: a bad shard must not surface hours into the run
        check_shard_header(path)
    val_tokens = load_validation_tokens(val_files, hp.train_seq_len, hp.vocab_size, hp.val_max_tokens)
    log(f"data:{Path(hp.data_path).resolve().name} train_shards:{len(train_files)} "
        f"val_tokens:{val_tokens.numel() - 1} tokenizer:{hp.tokenizer_path}")
    return luts, train_files, val_tokens


def new_summary(hp: Hyperparameters, runtime: Runtime, code: str, code_bytes: int) -> dict[str, Any]:
    """The summary as a run starts it: the configuration, where and with what it runs, the
    sha256 of its code; the stages fill in the rest."""
    return {
        "run_id": hp.run_id, "status": "running", "config": dataclasses.asdict(hp),
        "device": device_name(runtime), "world_size": runtime.world_size, "torch_version": torch.__version__,
        "python_version": sys.version.split()[0], "code_sha256": hashlib.sha256(code.encode("utf-8")).hexdigest(),
        "code_bytes": code_bytes, "git_commit": git_commit(), "dataset": Path(hp.data_path).resolve().name,
        "tokenizer": hp.tokenizer_path, "seed": hp.seed,
        "started_at": datetime.datetime.now().isoformat(timespec="seconds"), "val_history": [], "train_history": [],
    }


def resume_from_checkpoint(run: TrainingRun) -> None:
    """RESUME: the trainer, the step, the clocks and the summary's histories as the checkpoint
    left them."""
    resume_path = find_resume_checkpoint(run.hp, run.log)
    run.last_checkpoint = resume_path
    if resume_path is None:
        return
    checkpoint = load_checkpoint(resume_path, run.trainer)
    run.step, run.clock_offset_ms, run.eval_ms_total = checkpoint["step"], checkpoint["train_ms"], checkpoint["eval_ms"]
    run.summary.update(val_history=checkpoint["val_history"], train_history=checkpoint["train_history"],
                       resumed_from=str(resume_path))
    run.log(f"resume: {resume_path} at step {run.step}, train_time {run.clock_offset_ms:.0f}ms")


def start_run(hp: Hyperparameters, runtime: Runtime, grad_accum_steps: int) -> TrainingRun:
    """Everything before the first step: the run's id and log, the data, the model (built,
    described, its compilation primed), the summary, and a checkpoint's state when RESUME asks."""
    code, code_bytes = running_code()
    hp = dataclasses.replace(hp, run_id=agree_on_run_id(hp, runtime))
    log = open_run_log(hp, runtime, code)
    luts, train_files, val_tokens = load_run_data(hp, runtime, log)
    trainer = Trainer(hp, runtime, grad_accum_steps, train_files, log)
    describe_run(trainer, log)
    if hp.warmup_steps > 0:
        primed = prime_and_undo(trainer)
        log(f"warmup: {primed} compile-priming steps ({'JEPA and vanilla paths' if trainer.head else 'vanilla path'}) "
            f"done and undone")
    run = TrainingRun(hp, runtime, log, code_bytes, luts, val_tokens, trainer,
                      summary=new_summary(hp, runtime, code, code_bytes),
                      summary_path=Path(hp.log_dir) / f"{hp.run_id}.json")
    resume_from_checkpoint(run)
    return run


def run_training_loop(run: TrainingRun) -> None:
    """parameter-golf's loop: validate every VAL_LOSS_EVERY steps and after the last, step, log
    every TRAIN_LOG_EVERY steps, checkpoint every CHECKPOINT_EVERY steps, until ITERATIONS or
    the wall-clock cap (MAX_WALLCLOCK_SECONDS less any GPTQ reserve). After SIGTERM or SIGINT the
    step under way is the last: a checkpoint, then RunInterrupted. Leaves run.train_ms and the
    summary's training figures."""
    hp, trainer = run.hp, run.trainer

    def request_stop(signum: int, frame: Any) -> None:
        trainer.stop_requested = True  # acted on at the next step, identically on every rank
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
    previous_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    max_wallclock_ms = 1000.0 * hp.training_seconds  # less the GPTQ calibration's reserve
    clock = TrainingClock(run.runtime, run.clock_offset_ms)
    last_ce_weight = trainer.schedule.ce_weight(run.step, trainer.agreed_elapsed_ms)
    stop_after: int | None = None
    clock.start()
    try:
        while True:
            last_step = run.step >= hp.iterations or (stop_after is not None and run.step >= stop_after)
            validate_if_due(run, clock, last_step)
            if last_step:
                if stop_after is not None and run.step < hp.iterations:
                    run.log(f"stopping_early: wallclock_cap train_time:{clock.elapsed_ms():.0f}ms "
                            f"step:{run.step}/{hp.iterations}")
                break

            outcome = step_or_stop(run, clock)
            run.step += 1
            step = run.step
            if outcome.skipped:
                terms = " ".join(f"{name}={value:.4g}" for name, value in outcome.terms.items())
                run.log(f"step:{step}/{hp.iterations} skipped: non-finite loss ({terms}), NAN_POLICY=skip, "
                        f"{trainer.skipped_steps} skipped so far")
            if outcome.ce_weight != last_ce_weight:
                run.log(f"curriculum: step {step - 1}: CE weight {last_ce_weight:.0f} -> {outcome.ce_weight:.0f} "
                        f"(JEPA_ONLY_FRACTION={hp.jepa_only_fraction})")
                last_ce_weight = outcome.ce_weight
            if max_wallclock_ms > 0 and stop_after is None and trainer.agreed_elapsed_ms >= max_wallclock_ms:
                stop_after = step
            if hp.train_log_every > 0 and (step <= 5 or step % hp.train_log_every == 0 or step == stop_after):
                log_train_step(run, clock, outcome, max_wallclock_ms)
            if outcome.stop:
                stop_for_signal(run, clock)
            if hp.checkpoint_every > 0 and step % hp.checkpoint_every == 0 and step < hp.iterations and step != stop_after:
                run.save_checkpoint(clock.pause())
                clock.start()
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    run.train_ms = clock.pause()
    record_training(run)


def validate_if_due(run: TrainingRun, clock: TrainingClock, last_step: bool) -> None:
    """val_loss and val_bpb every VAL_LOSS_EVERY steps and after the last step, with the training
    clock paused; once per step (a resumed run has already validated its checkpoint's step)."""
    hp, step, history = run.hp, run.step, run.summary["val_history"]
    due = last_step or (hp.val_loss_every > 0 and step % hp.val_loss_every == 0 and step > 0)
    already_validated = bool(history) and history[-1]["step"] == step
    if not due or already_validated:
        return
    train_ms = clock.pause()
    eval_started = time.perf_counter()
    val_loss, val_bpb = evaluate_bpb(run.trainer.compiled_model, run.val_tokens, hp.train_seq_len,
                                     hp.val_batch_size, run.luts, run.runtime)
    eval_ms = 1000.0 * (time.perf_counter() - eval_started)
    run.eval_ms_total += eval_ms
    run.log(f"step:{step}/{hp.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
            f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms eval_time:{eval_ms:.0f}ms")
    history.append({"step": step, "train_time_ms": round(train_ms, 1), "val_loss": val_loss, "val_bpb": val_bpb})
    clock.start()


def step_or_stop(run: TrainingRun, clock: TrainingClock) -> StepOutcome:
    """One Trainer.step. A non-finite loss under NAN_POLICY=stop ends the run: a checkpoint of the
    weights before the step when they are still finite, the summary closed, RunFailure."""
    try:
        return run.trainer.step(run.step, clock.elapsed_ms)
    except NonFiniteLoss as failure:
        train_ms = clock.pause()
        terms = " ".join(f"{name}={value:.4g}" for name, value in failure.terms.items())
        if failure.weights_finite:
            where = f"checkpoint of the weights before it: {run.save_checkpoint(train_ms)}"
        else:
            where = (f"the weights themselves are non-finite; last good checkpoint: "
                     f"{run.last_checkpoint or 'none (set CHECKPOINT_EVERY)'}")
        message = (f"non-finite loss at step {run.step + 1}: {terms}; {where}. Nothing was exported. Lower the "
                   f"learning rates or JEPA_WEIGHT in a new run, or resume with NAN_POLICY=skip")
        run.finish_summary("nonfinite_loss", steps=run.step, error=message, train_time_ms=round(train_ms, 1))
        raise RunFailure(message) from None


def log_train_step(run: TrainingRun, clock: TrainingClock, outcome: StepOutcome, max_wallclock_ms: float) -> None:
    """A train line: the metrics since the last one, rank 0's JEPA diagnostics and pull, the time
    left; a warning when the target latents collapse."""
    hp, trainer, runtime, step = run.hp, run.trainer, run.runtime, run.step
    # Logging, and the JEPA diagnostics with it, is not training: the clock is paused.
    train_ms = clock.pause()
    metrics = trainer.read_metrics()
    if "jepa_loss" in metrics and runtime.master and trainer.last_jepa_batch is not None:
        metrics.update(trainer.jepa_diagnostics())
    metrics.update(trainer.log_step_pull(outcome))  # every rank: JEPA_GRAD_SHARE broadcasts
    if runtime.distributed:
        # The other ranks wait here, clock paused, rather than in the next step's
        # collectives: rank 0's diagnostics must not reach any rank's training time.
        dist.barrier()
    remaining_ms = (hp.iterations - step) * (train_ms / step)
    if max_wallclock_ms > 0:
        remaining_ms = min(remaining_ms, max(max_wallclock_ms - train_ms, 0.0))
    run.log(format_train_line(step, hp, metrics, outcome, train_ms, remaining_ms / 1000.0))
    # Collapse is judged on the target side: MSE-optimal predictions are legitimately
    # narrower than their targets, but shrinking targets make the objective trivial.
    if "tgt_std_mean" in metrics and metrics["tgt_std_mean"] < hp.collapse_std_floor:
        run.log(f"warning: latent collapse at step {step}: target latent std {metrics['tgt_std_mean']:.4f} "
                f"< COLLAPSE_STD_FLOOR={hp.collapse_std_floor} (pred_std {metrics['pred_std_mean']:.4f}); "
                f"an anti-collapse term (ANTI_COLLAPSE, VICREG_ON) or an EMA target prevents it")
    run.summary["train_history"].append({"step": step, "train_time_ms": round(train_ms, 1), **metrics,
                                         "jepa_weight": outcome.jepa_weight})
    clock.start()


def stop_for_signal(run: TrainingRun, clock: TrainingClock) -> None:
    """SIGTERM or SIGINT reached every rank at this step: checkpoint, close the summary, raise
    RunInterrupted (exit status 75: RESUME=auto continues the run)."""
    train_ms = clock.pause()
    checkpoint = run.save_checkpoint(train_ms)
    message = (f"stopped by a signal after step {run.step}: checkpoint {checkpoint}; continue with "
               f"RESUME=auto RUN_ID={run.hp.run_id}")
    run.log(message)
    run.finish_summary("interrupted", steps=run.step, checkpoint=str(checkpoint), train_time_ms=round(train_ms, 1))
    raise RunInterrupted(message)


def training_measurements(trainer: Trainer, train_history: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary's view of the log-step measurements: the JEPA pull averaged over the log steps
    that measured it, JEPA_GRAD_SHARE's final base weight, and TRAIN_MAX_TOKENS's epochs (tokens
    the training loop read / N, before any GPTQ calibration reads more)."""
    hp = trainer.hp
    fields: dict[str, Any] = {}
    for key in ("jepa_grad_share", "jepa_update_cos"):
        values = [entry[key] for entry in train_history if key in entry]
        if values:
            fields[f"mean_{key}"] = sum(values) / len(values)
    if hp.jepa_enabled and hp.jepa_grad_share > 0:
        fields["jepa_base_weight"] = trainer.schedule.base_jepa_weight
    if hp.train_max_tokens > 0:
        fields.update(train_max_tokens=hp.train_max_tokens,
                      train_epochs=trainer.loader.stream.tokens_taken / hp.train_max_tokens)
    return fields


def record_training(run: TrainingRun) -> None:
    """The loop's figures into the summary; on CUDA the peak memory into the log as well."""
    trainer, summary, train_ms = run.trainer, run.summary, run.train_ms
    if run.runtime.device.type == "cuda":
        run.log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
        summary["peak_memory_mib"] = torch.cuda.max_memory_allocated() // 2**20
    summary.update(steps=run.step, train_time_ms=round(train_ms, 1), step_avg_ms=train_ms / max(run.step, 1),
                   skipped_steps=trainer.skipped_steps, eval_time_ms=round(run.eval_ms_total, 1))
    summary.update(training_measurements(trainer, summary["train_history"]))


def apply_final_weights(trainer: Trainer, val_tokens: Tensor, luts: tuple[Tensor, Tensor, Tensor],
                        summary: dict[str, Any], log: RunLogger) -> tuple[float, float]:
    """Load the averaged weights training ends with (SWA or EMA, if any) into the model and score
    them; without an average, the last validation's score. Returns (val_loss, val_bpb)."""
    hp, runtime = trainer.hp, trainer.runtime
    averaged = trainer.final_weights()
    if averaged is None:
        return summary["val_history"][-1]["val_loss"], summary["val_history"][-1]["val_bpb"]
    label, weights = averaged
    with torch.no_grad():
        for param, average in zip(trainer.model.parameters(), weights):
            param.copy_(average.to(param.dtype))
    val_loss, val_bpb = evaluate_bpb(trainer.compiled_model, val_tokens, hp.train_seq_len, hp.val_batch_size, luts,
                                     runtime)
    line_name = "final_swa" if label.startswith("swa") else "final_ema"
    log(f"{line_name} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} weights:{label.replace(' ', '_')} "
        f"ema_decay:{hp.final_ema_decay}")
    summary["final_weights"] = label
    return val_loss, val_bpb


def score_final_weights(run: TrainingRun) -> float:
    """The weights training ends with, scored before quantisation (the summary's val_bpb);
    non-finite weights stop the run before anything is exported. Returns that val_bpb."""
    started = time.perf_counter()
    final_val_loss, final_val_bpb = apply_final_weights(run.trainer, run.val_tokens, run.luts, run.summary, run.log)
    run.summary.update(val_loss=final_val_loss, val_bpb=final_val_bpb)
    if not run.trainer.weights_finite():
        message = "the final weights are non-finite: nothing was exported (a NaN model is never written)"
        run.finish_summary("nonfinite_weights", error=message)
        raise RunFailure(message)
    run.stage_ms["final weights and eval"] = 1000.0 * (time.perf_counter() - started)
    return final_val_bpb


def calibrate_and_log(run: TrainingRun) -> dict[str, Tensor] | None:
    """QUANT=gptq: collect the Hessians on training data and log their time against the cap."""
    hp, started = run.hp, time.perf_counter()
    hessians = None
    if hp.quant == "gptq":
        hessians, calibration_ms = calibrate_gptq(run.trainer)
        counted_ms = run.train_ms + calibration_ms
        run.log(f"gptq_calibration: {hp.gptq_calibration_batches} training batches x {run.trainer.local_batch_tokens} "
                f"tokens per rank, {len(hessians)} matrices, {calibration_ms:.0f}ms; training + calibration "
                f"{counted_ms:.0f}ms"
                + (f" of MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds:g}s" if hp.max_wallclock_seconds > 0 else ""))
        if 0 < 1000.0 * hp.max_wallclock_seconds < counted_ms:
            run.log(f"warning: training + GPTQ calibration took {counted_ms / 1000:.1f}s, over MAX_WALLCLOCK_SECONDS="
                    f"{hp.max_wallclock_seconds:g}: raise GPTQ_RESERVE_SECONDS to at least "
                    f"{calibration_ms / 1000 + 1:.0f} or lower GPTQ_CALIBRATION_BATCHES")
        run.summary.update(calibration_time_ms=round(calibration_ms, 1), train_and_calibration_ms=round(counted_ms, 1))
    run.stage_ms["calibration"] = 1000.0 * (time.perf_counter() - started)
    return hessians


def export_and_share(run: TrainingRun, hessians: dict[str, Tensor] | None) -> bytes:
    """Rank 0 writes the artifact (with the JEPA head for TTT_OBJECTIVE=ce+jepa); a failure closes
    the summary and stops the run on every rank; otherwise every rank gets the artifact's bytes."""
    hp, started = run.hp, time.perf_counter()
    exported_head = run.trainer.head if hp.ttt_objective == "ce+jepa" else None
    export_error = export_on_rank_zero(run.trainer.model, hp, run.runtime, run.code_bytes, run.log, hessians,
                                       exported_head)
    run.stage_ms["export"] = 1000.0 * (time.perf_counter() - started)
    if export_error is not None:
        run.finish_summary("export_failed", error=str(export_error))
        raise export_error
    return shared_artifact_bytes(Path(hp.artifact_path), run.runtime)


def evaluate_roundtrip(run: TrainingRun, blob: bytes, final_val_bpb: float) -> dict[str, Any]:
    """The model rebuilt from the artifact's bytes alone, evaluated (and with TTT=1 trained score-
    first); logs what quantisation cost against the final weights' score."""
    started = time.perf_counter()
    result = evaluate_artifact(run.hp, run.runtime, Path(run.hp.artifact_path), run.val_tokens, run.luts, run.log,
                               blob)
    run.stage_ms["roundtrip"] = 1000.0 * (time.perf_counter() - started)
    run.log(f"roundtrip_gap val_bpb:{result['roundtrip_val_bpb'] - final_val_bpb:+.5f}")
    return result


def finish_run(run: TrainingRun, result: dict[str, Any], final_val_bpb: float, artifact_bytes: int) -> None:
    """The timing line, the completed summary and the final line. No rank leaves while rank 0
    still writes."""
    hp, stage_ms, train_ms, code_bytes = run.hp, run.stage_ms, run.train_ms, run.code_bytes
    run.log(f"timing: train {train_ms / 1000:.1f}s, validation {run.eval_ms_total / 1000:.1f}s, "
            f"final weights and eval {stage_ms['final weights and eval'] / 1000:.1f}s, "
            f"calibration {stage_ms['calibration'] / 1000:.1f}s, export {stage_ms['export'] / 1000:.1f}s, "
            f"roundtrip eval{' and TTT' if hp.ttt else ''} {stage_ms['roundtrip'] / 1000:.1f}s")
    run.summary.update(result, artifact_path=str(Path(hp.artifact_path)), artifact_bytes=artifact_bytes,
                       total_bytes=artifact_bytes + code_bytes, artifact_budget_bytes=hp.artifact_budget_bytes,
                       export_time_ms=round(stage_ms["export"], 1), roundtrip_eval_time_ms=round(stage_ms["roundtrip"], 1))
    run.finish_summary("completed")
    run.log(f"summary:{run.summary_path}")
    ttt_part = f", score-first TTT {result['ttt_val_bpb']:.4f}" if hp.ttt else ""
    run.log(f"final: val_bpb {final_val_bpb:.4f} ({result['export_label']} roundtrip {result['roundtrip_val_bpb']:.4f}"
            f"{ttt_part}) after {run.step} steps in {train_ms / 1000:.0f}s; submission {artifact_bytes + code_bytes:,} "
            f"bytes (artifact {artifact_bytes:,} + code {code_bytes:,}) of {hp.artifact_budget_bytes:,}")
    if run.runtime.distributed:
        dist.barrier()  # no rank leaves while rank 0 still writes


# =============================================================================
# MAIN
# =============================================================================


def main() -> int:
    """The recipe. Settings and runtime; then a training run (set-up, the loop, the final weights,
    GPTQ calibration, export, the roundtrip evaluation of the artifact alone, the summary) or,
    with EVAL_ONLY=1, the evaluation of an existing artifact. Returns the exit status."""
    try:
        hp = load_hyperparameters()
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        grad_accum_steps = validate_hyperparameters(hp, world_size)
        runtime = setup_runtime(hp)
        try:
            if hp.eval_only:
                run_eval_only(hp, runtime)
            else:
                run = start_run(hp, runtime, grad_accum_steps)  # log, data, model, compile priming, resume
                run_training_loop(run)  # until ITERATIONS, the wall-clock cap or a signal
                final_val_bpb = score_final_weights(run)  # SWA / EMA weights in, scored before quantisation
                hessians = calibrate_and_log(run)  # QUANT=gptq: Hessians from training data
                blob = export_and_share(run, hessians)  # rank 0 writes the artifact, every rank reads it
                result = evaluate_roundtrip(run, blob, final_val_bpb)  # the artifact alone (and TTT)
                finish_run(run, result, final_val_bpb, len(blob))  # timing, summary, the final line
        finally:
            shut_down_processes(runtime)
    except (ConfigError, RunFailure, RunInterrupted) as error:
        if int(os.environ.get("RANK", "0")) == 0:
            prefix = "stopped" if isinstance(error, RunInterrupted) else "error"
            print(f"{prefix}: {error}", file=sys.stderr, flush=True)
        return {ConfigError: 2, RunFailure: 1, RunInterrupted: 75}[type(error)]
    return 0


if __name__ == "__main__":
    sys.exit(main())
