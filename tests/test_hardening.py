"""GPU-path and ecosystem hardening checked on the CPU: byte-level (byte260) runs and their BPB
byte counts, SIGREG_MAX_ROWS, an export failure on rank 0 reaching every rank, EVAL_ONLY with
the run's compute dtype, and XSA keeping bf16 where CUDA autocast would promote a sum."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train_gpt_jepa as T
from conftest import REPO_ROOT, tiny_hyperparameters
from test_trainer import run_trainer

sys.path.insert(0, str(REPO_ROOT / "data"))
import build_local_corpus  # noqa: E402


@pytest.fixture(scope="module")
def byte_dataset(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("byte_corpus")
    documents = build_local_corpus.python_documentation()[:1500] + ["héllo wörld ✓ 😀", "", "tab\tand\nnewline"]
    build_local_corpus.build_corpus(documents=documents, name="test_byte260", output_root=root, tokenizer="byte260",
                                    val_docs=150, log=lambda message: None)
    return {"data_path": root / "datasets" / "test_byte260", "tokenizer_path": root / "tokenizers" / "pure_byte_260.json",
            "documents": documents}


# ---------------------------------------------------------------------------
# Byte level
# ---------------------------------------------------------------------------


def test_byte_luts_count_the_utf8_bytes_of_every_document(byte_dataset):
    hp = tiny_hyperparameters(byte_dataset, VOCAB_SIZE=260)
    tokenizer = T.load_tokenizer(hp)
    assert isinstance(tokenizer, T.ByteTokenizer) and tokenizer.vocab_size == 260
    bytes_per_token, has_leading_space, is_boundary = T.build_bpb_luts(tokenizer, 260)
    tokens = np.concatenate([T.load_data_shard(path, 260).numpy() for split in ("train", "val")
                             for path in T.find_shards(str(byte_dataset["data_path"]), split)]).astype(np.int64)
    starts = np.flatnonzero(tokens == hp.bos_id)
    pieces = [tokens[start + 1:end] for start, end in zip(starts, list(starts[1:]) + [len(tokens)])]
    documents = set(byte_dataset["documents"])
    for piece in pieces:  # each document's bytes, as the trainer counts them and as UTF-8 has them
        text = bytes((piece - 4).astype(np.uint8).tolist()).decode("utf-8")
        assert text in documents
        assert int(bytes_per_token[piece].sum()) + int(has_leading_space[piece].sum()) == len(text.encode("utf-8"))
    assert len(pieces) > 1000 and any(len(text) < len(text.encode("utf-8")) for text in map(str, documents))
    assert int(bytes_per_token[hp.bos_id]) == 0 and bool(is_boundary[hp.bos_id]) and not bool(is_boundary[4 + 65])


def test_byte_level_run_reports_bpb_from_byte_counts(tmp_path, byte_dataset):
    result = run_trainer(tmp_path, byte_dataset, RUN_ID="bytes", VOCAB_SIZE=260, ITERATIONS=6, EVAL_STRIDE=0)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "logs" / "bytes.json").read_text())
    # Every scored target is one byte except the BOS tokens: bpb = loss / ln 2 * targets / bytes.
    val = T.load_validation_tokens(T.find_shards(str(byte_dataset["data_path"]), "val"), 256, 260, 4096)
    targets = val[1:]
    ratio = targets.numel() / int((targets != 1).sum())
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / np.log(2) * ratio, rel=1e-5)
    assert 5.0 < summary["train_history"][0]["train_loss"] < 6.5  # about ln 260


@pytest.mark.parametrize("payload, vocab, phrase", [
    ({"tokenizer_type": "char", "config": {}}, 260, "tokenizer_type 'char'"),
    ({"tokenizer_type": "pure_byte", "config": {}}, 1024, "has 260 ids but VOCAB_SIZE=1024"),
    ({"tokenizer_type": "pure_byte", "config": {"bos_id": 2}}, 260, "BOS_ID=1"),
])
def test_bad_byte_descriptors_are_refused_in_one_line(tmp_path, byte_dataset, payload, vocab, phrase):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(payload))
    hp = tiny_hyperparameters(byte_dataset, VOCAB_SIZE=vocab, TOKENIZER_PATH=path)
    with pytest.raises(T.ConfigError, match=re.escape(phrase)):
        T.load_tokenizer(hp)


# ---------------------------------------------------------------------------
# SIGREG_MAX_ROWS
# ---------------------------------------------------------------------------


def test_sigreg_reads_every_kth_row_above_max_rows():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3000, 16, generator=generator)
    directions = torch.nn.functional.normalize(torch.randn(16, 32, generator=generator), dim=0)
    assert T.sigreg_loss(z, directions, max_rows=3000) == T.sigreg_loss(z, directions)
    capped = T.sigreg_loss(z, directions, max_rows=1000)
    assert capped == T.sigreg_loss(z[::3], directions) and capped != T.sigreg_loss(z, directions)
    weights = (torch.arange(3000) % 2).float()
    assert T.sigreg_loss(z, directions, weights, max_rows=1000) == T.sigreg_loss(z[::3], directions, weights[::3])


def test_jepa_head_applies_sigreg_max_rows(byte_dataset):
    hp = tiny_hyperparameters(byte_dataset, VOCAB_SIZE=260, ANTI_COLLAPSE="sigreg", SIGREG_MAX_ROWS=100)
    head = T.JepaHead(hp)
    z = torch.randn(450, hp.d_latent)
    directions = torch.nn.functional.normalize(torch.randn(hp.d_latent, hp.sigreg_slices), dim=0)
    expected = hp.sigreg_weight * T.sigreg_loss(z[::5], directions)
    assert head._regulariser(z, directions, None) == expected
    with pytest.raises(T.ConfigError, match="SIGREG_MAX_ROWS"):
        T.validate_hyperparameters(tiny_hyperparameters(byte_dataset, SIGREG_MAX_ROWS=-1), 1)


# ---------------------------------------------------------------------------
# Export failures on rank 0, EVAL_ONLY's compute dtype
# ---------------------------------------------------------------------------


def test_any_export_failure_on_rank_zero_stops_every_rank_with_one_line(tmp_path, tiny_dataset):
    # lzma.compress raises on rank 0 only (through sitecustomize): an error the exporter does not
    # expect. Before, the other rank waited in the broadcast until the collective timeout.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import lzma, os\n"
        "if os.environ.get('RANK') == '0':\n"
        "    def broken(*args, **kwargs):\n"
        "        raise RuntimeError('injected compressor fault')\n"
        "    lzma.compress = broken\n")
    result = run_trainer(tmp_path, tiny_dataset, nproc=2, timeout=240, RUN_ID="broken", ITERATIONS=2,
                         COMPRESSOR="lzma", PYTHONPATH=f"{hooks}:{REPO_ROOT}")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "export failed on rank 0 with RuntimeError: injected compressor fault" in errors[0]
    assert "Traceback" in (tmp_path / "logs" / "broken.txt").read_text()
    assert json.loads((tmp_path / "logs" / "broken.json").read_text())["status"] == "export_failed"


def test_eval_only_uses_the_runs_compute_dtype(tmp_path, tiny_dataset):
    trained = run_trainer(tmp_path, tiny_dataset, RUN_ID="bf16", ITERATIONS=3, COMPUTE_DTYPE="bfloat16")
    assert trained.returncode == 0, trained.stderr[-3000:]
    exact = re.search(r"final_int\d+_[a-z]+_roundtrip_exact .*", trained.stdout).group(0)
    again = run_trainer(tmp_path / "eval", tiny_dataset, EVAL_ONLY=1, RUN_ID="again", ARTIFACT_PATH=tmp_path / "model.ptz")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "autocast:torch.bfloat16 compile:False" in again.stdout
    assert re.search(r"final_int\d+_[a-z]+_roundtrip_exact .*", again.stdout).group(0) == exact
    forced = run_trainer(tmp_path / "fp32", tiny_dataset, EVAL_ONLY=1, RUN_ID="fp32", COMPUTE_DTYPE="float32",
                         ARTIFACT_PATH=tmp_path / "model.ptz")
    assert forced.returncode == 0 and "autocast:None" in forced.stdout  # the environment still overrides


# ---------------------------------------------------------------------------
# XSA under autocast
# ---------------------------------------------------------------------------


class SumDtypes(TorchDispatchMode):
    """Records the dtype argument of every sum over a dimension."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[object] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.sum.dim_IntList:
            self.dtypes.append(kwargs.get("dtype"))
        return func(*args, **kwargs)


def test_xsa_projection_passes_its_dtype_so_cuda_autocast_keeps_bf16(tiny_dataset):
    # CUDA autocast runs a sum without an explicit dtype in fp32 (CPU autocast does not), which
    # would turn XSA's output fp32. Passing dtype keeps it; the CPU can check that it is passed.
    hp = tiny_hyperparameters(tiny_dataset, XSA_LAST_N=1)
    attention = T.CausalSelfAttention(hp, use_xsa=True, use_value_embedding=False)
    x = torch.randn(2, 16, hp.model_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16), SumDtypes() as recorder:
        output = attention(x)
    assert output.dtype == torch.bfloat16 and recorder.dtypes == [torch.bfloat16]
