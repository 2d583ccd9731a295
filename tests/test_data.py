"""Tests of the data tools: data/build_local_corpus.py and data/cached_challenge_fineweb.py.

Small corpora in temporary folders, CPU only, a few seconds each. What they pin down: the
challenge's shard format, one BOS at the start of every document, exact token ids with the
official tokenizer, the trained tokenizer's settings, byte-identical rebuilds, the BPB byte
accounting, the one-line errors, and the downloader's offline failure and file layout.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import sentencepiece as spm

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "data" / "build_local_corpus.py"
DOWNLOAD_SCRIPT = REPO_ROOT / "data" / "cached_challenge_fineweb.py"


def load_script(path: Path) -> ModuleType:
    """Import a script of data/ (not a package) from its path, as data/README.md shows."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


corpus = load_script(BUILD_SCRIPT)
downloader = load_script(DOWNLOAD_SCRIPT)

# Hand-written documents covering what the corpora contain: digits, punctuation, tabs,
# newlines, runs of spaces, non-ASCII (accents, other scripts, emoji).
CRAFTED_DOCUMENTS = [
    "The quick brown fox jumps over 13 lazy dogs.",
    "Prices rose 12.5% in 2023: from $1,024.00 to $1,152.00 (see table 7).",
    "Line one.\nLine two,\twith a tab.\n\nA new paragraph after a blank line.",
    "Several    spaces   between   words, and trailing spaces   ",
    "  Leading spaces and a final newline\n",
    "Punctuation!? (round) [square] {curly} <angle> \"double\" 'single' a-b -- c; d: e/f\\g #h @i &j *k ~l ^m |n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 1e-9 0xFF 65535 20240520",
    "Café, naïve, Straße, smörgåsbord, Ελληνικά, русский, 日本語, 中文, 한국어, emoji 😀🚀.",
    "Ünïcödé everywhere: ½ ¼ ¾ ™ © ® — “curly quotes” ‘single’ … and ﬁ ligature.",
    "def f(x):\n    return x ** 2  # a comment with    spaces\n\nprint(f(12))",
    "It’s a “quoted” phrase — with dashes – and 3–4 apostrophes’ in it.",
]


def quiet(message: str) -> None:
    pass


def run_script(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def assert_one_error_line(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """Non-zero exit, exactly one 'error: ' line on stderr, no traceback; returns the line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in error_lines[0], (phrase, error_lines[0])
    return error_lines[0]


def split_tokens(output_root: Path, name: str, split: str) -> np.ndarray:
    manifest = json.loads((output_root / "datasets" / name / "manifest.json").read_text())
    shards = [output_root / "datasets" / name / shard for shard in manifest["splits"][split]["shards"]]
    return np.concatenate([corpus.read_shard(path) for path in shards])


def documents_of(tokens: np.ndarray) -> list[np.ndarray]:
    """Cut a split's token stream at its BOS tokens; each piece is one document without BOS."""
    starts = np.flatnonzero(tokens == corpus.BOS_ID)
    ends = list(starts[1:]) + [len(tokens)]
    return [tokens[start + 1 : end] for start, end in zip(starts, ends, strict=True)]


def bpb_byte_count(tokens: np.ndarray, luts: tuple) -> int:
    """UTF-8 bytes the trainer's lookup tables count for a document's tokens, BOS before them."""
    bytes_per_token, has_leading_space, is_boundary_token = (t.numpy() for t in luts)
    previous = np.concatenate([[corpus.BOS_ID], tokens[:-1]]).astype(np.int64)
    tokens = tokens.astype(np.int64)
    counts = bytes_per_token[tokens].astype(np.int64) + (has_leading_space[tokens] & ~is_boundary_token[previous])
    return int(counts.sum())


def protobuf_fields(data: bytes) -> dict[int, list]:
    """Minimal protobuf wire-format reader (the protobuf package is not a dependency)."""

    def varint(position: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            byte = data[position]
            value |= (byte & 0x7F) << shift
            position += 1
            shift += 7
            if byte < 0x80:
                return value, position

    fields: dict[int, list] = collections.defaultdict(list)
    position = 0
    while position < len(data):
        key, position = varint(position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = varint(position)
        elif wire_type == 1:
            value, position = data[position : position + 8], position + 8
        elif wire_type == 2:
            length, position = varint(position)
            value, position = data[position : position + length], position + length
        elif wire_type == 5:
            value, position = data[position : position + 4], position + 4
        else:
            raise ValueError(f"wire type {wire_type}")
        fields[number].append(value)
    return fields


# =============================================================================
# Fixtures: the default corpus's documents, a trained build, an official-tokenizer build
# =============================================================================


@pytest.fixture(scope="session")
def python_docs() -> list[str]:
    return corpus.python_documentation()


@pytest.fixture(scope="module")
def trained_build(tmp_path_factory, python_docs) -> dict:
    """A ~0.6 MB corpus with a tokenizer trained at the default vocab 1024."""
    output_root = tmp_path_factory.mktemp("trained")
    documents = python_docs[:2000] + CRAFTED_DOCUMENTS
    manifest = corpus.build_corpus(
        documents=documents, name="trained", output_root=output_root, val_docs=150, log=quiet
    )
    processor = spm.SentencePieceProcessor(model_file=str(output_root / manifest["tokenizer"]["path"]))
    return {"root": output_root, "manifest": manifest, "documents": documents, "processor": processor}


@pytest.fixture(scope="module")
def official_inputs(tmp_path_factory, python_docs, official_tokenizer_path) -> Path:
    """An input folder mixing every supported kind, one bad JSONL line and one non-UTF-8 file.

    The official tokenizer has no piece for "_", "=", "*", "[", "`" and other characters
    that docstrings use, nor for most non-ASCII: it maps them to <unk>, which the BPB tables
    cannot count. The JSONL takes the docstrings it represents fully, so that BPB is checked
    on hundreds of documents.
    """
    official = spm.SentencePieceProcessor(model_file=str(official_tokenizer_path))
    representable = [text for text in python_docs[2000:] if official.unk_id() not in official.encode(text)]
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "fox.txt").write_text(CRAFTED_DOCUMENTS[0], encoding="utf-8")
    (folder / "prices.md").write_text(CRAFTED_DOCUMENTS[1], encoding="utf-8")
    (folder / "nested" / "deeper").mkdir(parents=True)
    (folder / "nested" / "deeper" / "lines.rst").write_text(CRAFTED_DOCUMENTS[2], encoding="utf-8")
    (folder / "nested" / "ignored.py").write_text("print('not a text suffix')\n", encoding="utf-8")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    records = [json.dumps({"text": text}) for text in representable[:400] + CRAFTED_DOCUMENTS[3:]]
    records += ["{not json", json.dumps({"title": "no text field"})]
    (folder / "docs.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def official_build(tmp_path_factory, official_inputs, official_tokenizer_path) -> dict:
    """The CLI run with --tokenizer pointing at the official fineweb_1024_bpe.model."""
    output_root = tmp_path_factory.mktemp("official")
    result = run_script(
        BUILD_SCRIPT, str(official_inputs), "--name", "official", "--output-root", str(output_root),
        "--tokenizer", str(official_tokenizer_path), "--val-docs", "40", "--seed", "7",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((output_root / "datasets" / "official" / "manifest.json").read_text())
    processor = spm.SentencePieceProcessor(model_file=str(official_tokenizer_path))
    return {"root": output_root, "manifest": manifest, "processor": processor, "result": result}


# =============================================================================
# Shard format
# =============================================================================


def test_shard_header_magic_version_count_and_file_size(trained_build):
    dataset_dir = trained_build["root"] / "datasets" / "trained"
    for split in ("train", "val"):
        counts = trained_build["manifest"]["splits"][split]
        total = 0
        for shard in counts["shards"]:
            path = dataset_dir / shard
            header = np.fromfile(path, dtype="<i4", count=256)
            assert header[0] == 20240520 and header[1] == 1
            assert np.all(header[3:] == 0)
            assert path.stat().st_size == 256 * 4 + 2 * int(header[2])
            tokens = corpus.read_shard(path)
            assert tokens.dtype == np.uint16 and len(tokens) == header[2]
            total += int(header[2])
        assert total == counts["tokens"] > 0
    assert sorted(p.name for p in dataset_dir.glob("*.bin")) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]


def test_read_shard_rejects_bad_magic_and_truncation(tmp_path, trained_build):
    good = trained_build["root"] / "datasets" / "trained" / "fineweb_val_000000.bin"
    data = bytearray(good.read_bytes())
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(data[:-2])
    with pytest.raises(ValueError, match="bytes"):
        corpus.read_shard(truncated)
    data[0:4] = struct.pack("<i", 12345)
    bad_magic = tmp_path / "bad_magic.bin"
    bad_magic.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="magic"):
        corpus.read_shard(bad_magic)


def test_every_document_starts_with_one_bos(trained_build):
    processor = trained_build["processor"]
    assert processor.bos_id() == 1
    for split in ("train", "val"):
        tokens = split_tokens(trained_build["root"], "trained", split)
        assert tokens[0] == 1
        assert int((tokens == 1).sum()) == trained_build["manifest"]["splits"][split]["documents"]
        assert all(len(document) > 0 for document in documents_of(tokens))  # no empty document
    assert trained_build["manifest"]["splits"]["val"]["documents"] == 150


def test_decoded_documents_round_trip(trained_build):
    processor = trained_build["processor"]
    decoded = {}
    for split in ("train", "val"):
        tokens = split_tokens(trained_build["root"], "trained", split)
        decoded[split] = [processor.decode(document.tolist()) for document in documents_of(tokens)]
    # Each document appears once in one split and decodes to what the tokenizer gives for it
    # (nmt_nfkc folds newlines and runs of spaces, as in the challenge's FineWeb shards).
    unique_documents = set(trained_build["documents"])
    expected = collections.Counter(processor.decode(processor.encode(text)) for text in unique_documents)
    assert collections.Counter(decoded["train"] + decoded["val"]) == expected
    assert not set(decoded["train"]) & set(decoded["val"])
    # Text the normaliser leaves alone (byte fallback included) comes back exactly.
    duplicates = len(trained_build["documents"]) - len(set(trained_build["documents"]))
    assert trained_build["manifest"]["inputs"]["duplicate_documents_removed"] == duplicates > 0
    all_decoded = set(decoded["train"]) | set(decoded["val"])
    assert CRAFTED_DOCUMENTS[0] in all_decoded
    assert CRAFTED_DOCUMENTS[1] in all_decoded
    assert "日本語, 中文, 한국어, emoji 😀🚀." in CRAFTED_DOCUMENTS[7] and CRAFTED_DOCUMENTS[7] in all_decoded


# =============================================================================
# Tokenizer
# =============================================================================


def test_trained_tokenizer_has_the_challenge_settings(trained_build):
    model_path = trained_build["root"] / trained_build["manifest"]["tokenizer"]["path"]
    model = protobuf_fields(model_path.read_bytes())
    trainer = protobuf_fields(model[2][0])  # ModelProto.trainer_spec
    normalizer = protobuf_fields(model[3][0])  # ModelProto.normalizer_spec
    assert trainer[3] == [2]  # model_type BPE
    assert trainer[4] == [1024]  # vocab_size
    assert trainer[35] == [1]  # byte_fallback
    assert trainer[25] == [1]  # split_digits
    assert struct.unpack("<f", trainer[10][0])[0] == pytest.approx(0.999)  # character_coverage
    assert normalizer[1] == [b"nmt_nfkc"]
    assert normalizer[3] == [0]  # add_dummy_prefix

    processor = trained_build["processor"]
    assert processor.vocab_size() == 1024
    assert (processor.pad_id(), processor.bos_id(), processor.eos_id(), processor.unk_id()) == (0, 1, 2, 3)
    assert [processor.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert sum(processor.is_byte(i) for i in range(processor.vocab_size())) == 256
    digits = processor.encode("98765432", out_type=str)
    assert digits == list("98765432")  # split_digits: one piece per digit
    rare = processor.encode("\U0001F600", out_type=int)  # an emoji is not a piece: 4 UTF-8 bytes
    assert len(rare) == 4 and all(processor.is_byte(i) for i in rare)
    assert (trained_build["root"] / "tokenizers" / "trained_bpe.vocab").read_text(encoding="utf-8").count("\n") == 1024


def test_official_tokenizer_gives_exactly_its_own_ids(official_build, official_inputs, official_tokenizer_path):
    manifest = official_build["manifest"]
    processor = official_build["processor"]
    # The documents in the order the tool reads, de-duplicates and shuffles them.
    collected = corpus.collect_documents([official_inputs], warn=quiet)
    unique = corpus.remove_duplicates(collected.documents)
    val_documents, train_documents = corpus.split_documents(unique, seed=7, val_docs=40)
    for split, documents in (("val", val_documents), ("train", train_documents)):
        expected = np.array([t for text in documents for t in [1] + processor.encode(text)], dtype=np.uint16)
        np.testing.assert_array_equal(split_tokens(official_build["root"], "official", split), expected)
    copied = official_build["root"] / "tokenizers" / "official_bpe.model"
    assert copied.read_bytes() == official_tokenizer_path.read_bytes()
    assert manifest["tokenizer"]["sha256"] == corpus.sha256_file(official_tokenizer_path)
    assert manifest["tokenizer"]["trained"] is False and manifest["tokenizer"]["vocab_size"] == 1024


def test_inputs_of_every_kind_are_read_and_bad_ones_counted(official_build):
    inputs = official_build["manifest"]["inputs"]
    # fox.txt, prices.md, nested/deeper/lines.rst: 3 documents; docs.jsonl: 400 + 7; the .py ignored.
    assert inputs["documents"] == 3 + 400 + len(CRAFTED_DOCUMENTS) - 3 - inputs["duplicate_documents_removed"]
    assert inputs["files_skipped"] == 1 and inputs["skipped_files"][0]["path"].endswith("latin1.txt")
    assert "not UTF-8" in inputs["skipped_files"][0]["reason"]
    assert inputs["jsonl_lines_skipped"] == 2
    stderr = official_build["result"].stderr
    assert any(line.startswith("warning: ") and "latin1.txt" in line for line in stderr.splitlines())
    assert "Traceback" not in stderr
    assert "train" in official_build["result"].stdout and "val" in official_build["result"].stdout


def test_reused_tokenizer_must_use_bos_id_1(tmp_path):
    model_writer = _Sink()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CRAFTED_DOCUMENTS * 3), model_writer=model_writer, vocab_size=200,
        bos_id=-1, unk_id=0, eos_id=1, pad_id=2, minloglevel=2, model_type="bpe",
    )
    model_path = tmp_path / "no_bos.model"
    model_path.write_bytes(model_writer.value)
    (tmp_path / "doc.txt").write_text(CRAFTED_DOCUMENTS[0], encoding="utf-8")
    (tmp_path / "doc2.txt").write_text(CRAFTED_DOCUMENTS[1], encoding="utf-8")
    result = run_script(BUILD_SCRIPT, str(tmp_path / "doc.txt"), str(tmp_path / "doc2.txt"),
                        "--output-root", str(tmp_path / "out"), "--tokenizer", str(model_path))
    assert_one_error_line(result, "bos id -1")


class _Sink:
    def __init__(self) -> None:
        self.value = b""

    def write(self, data: bytes) -> None:
        self.value += bytes(data)


def test_token_ids_must_fit_vocab_and_uint16():
    ok = corpus.to_uint16_tokens(np.array([1, 5, 1023]), 1024)
    assert ok.dtype == np.dtype("<u2") and ok.tolist() == [1, 5, 1023]
    with pytest.raises(ValueError, match="1024"):
        corpus.to_uint16_tokens(np.array([1, 1024]), 1024)
    with pytest.raises(ValueError, match="uint16"):
        corpus.to_uint16_tokens(np.array([1, 70_000]), 100_000)


# =============================================================================
# BPB: the trainer's lookup tables count exactly the UTF-8 bytes of the decoded text
# =============================================================================


def test_bpb_bytes_equal_utf8_bytes_with_official_tokenizer(official_build):
    from train_gpt_jepa import build_sentencepiece_luts

    processor = official_build["processor"]
    luts = build_sentencepiece_luts(processor, 1024)
    checked = skipped_unknown = 0
    for split in ("train", "val"):
        for document in documents_of(split_tokens(official_build["root"], "official", split)):
            ids = document.tolist()
            if processor.unk_id() in ids:
                skipped_unknown += 1  # <unk> decodes to " ⁇ ", which the tables count as 0 bytes
                continue
            assert bpb_byte_count(document, luts) == len(processor.decode(ids).encode("utf-8")), processor.decode(ids)
            checked += 1
    assert checked >= 400 and checked >= 9 * skipped_unknown


def test_bpb_bytes_equal_utf8_bytes_with_trained_byte_fallback_tokenizer(trained_build):
    from train_gpt_jepa import build_sentencepiece_luts

    processor = trained_build["processor"]
    luts = build_sentencepiece_luts(processor, 1024)
    byte_pieces_seen = 0
    documents = [
        document
        for split in ("train", "val")
        for document in documents_of(split_tokens(trained_build["root"], "trained", split))
    ]
    for document in documents:
        ids = document.tolist()
        assert processor.unk_id() not in ids  # byte fallback: nothing is unknown
        byte_pieces_seen += sum(processor.is_byte(i) for i in ids)
        assert bpb_byte_count(document, luts) == len(processor.decode(ids).encode("utf-8")), processor.decode(ids)
    assert len(documents) == len(set(trained_build["documents"])) and byte_pieces_seen > 20


# =============================================================================
# Determinism, split, rebuilds
# =============================================================================


def write_small_inputs(folder: Path, python_docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    records = [json.dumps({"text": text}) for text in python_docs[3000:3300] + CRAFTED_DOCUMENTS]
    (folder / "docs.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    return folder


def test_same_inputs_and_seed_give_byte_identical_outputs(tmp_path, python_docs):
    inputs = write_small_inputs(tmp_path / "inputs", python_docs)
    for root in ("first", "second"):
        result = run_script(BUILD_SCRIPT, str(inputs), "--output-root", str(tmp_path / root), "--vocab-size", "512")
        assert result.returncode == 0, result.stderr
    first = sorted(p.relative_to(tmp_path / "first") for p in (tmp_path / "first").rglob("*") if p.is_file())
    second = sorted(p.relative_to(tmp_path / "second") for p in (tmp_path / "second").rglob("*") if p.is_file())
    assert first == second and len(first) == 5  # two shards, manifest, .model, .vocab
    for relative in first:
        assert (tmp_path / "first" / relative).read_bytes() == (tmp_path / "second" / relative).read_bytes(), relative
    # Another seed gives another split.
    result = run_script(BUILD_SCRIPT, str(inputs), "--output-root", str(tmp_path / "seed1"), "--vocab-size", "512",
                        "--seed", "1")
    assert result.returncode == 0, result.stderr
    val_shard = Path("datasets/local_sp1024/fineweb_val_000000.bin")
    assert (tmp_path / "seed1" / val_shard).read_bytes() != (tmp_path / "first" / val_shard).read_bytes()


def test_split_is_a_seeded_shuffle_with_the_first_documents_in_val(python_docs):
    documents = corpus.remove_duplicates(python_docs[:500])
    shuffled = corpus.shuffle_documents(documents, seed=3)
    assert sorted(shuffled) == sorted(documents) and shuffled != documents
    assert corpus.shuffle_documents(documents, seed=3) == shuffled
    assert corpus.shuffle_documents(documents, seed=4) != shuffled
    val, train = corpus.split_documents(documents, seed=3, val_docs=25)
    assert val == shuffled[:25] and train == shuffled[25:]
    val, train = corpus.split_documents(documents, seed=3, val_fraction=0.1)
    assert len(val) == round(0.1 * len(documents)) and val + train == shuffled
    with pytest.raises(ValueError, match="each split"):
        corpus.split_documents(documents, seed=3, val_docs=len(documents))


def test_rebuild_replaces_stale_shards(tmp_path, python_docs):
    documents = python_docs[:300]
    many = corpus.build_corpus(documents=documents, output_root=tmp_path, name="rebuilt", vocab_size=400,
                               shard_tokens=5_000, val_docs=50, log=quiet)
    assert len(many["splits"]["train"]["shards"]) > 3 and len(many["splits"]["val"]["shards"]) > 1
    dataset_dir = tmp_path / "datasets" / "rebuilt"
    before = {split: split_tokens(tmp_path, "rebuilt", split) for split in ("train", "val")}
    # Shard size only cuts the stream: one shard per split holds the same tokens.
    one = corpus.build_corpus(documents=documents, output_root=tmp_path, name="rebuilt", vocab_size=400,
                              val_docs=50, log=quiet)
    assert sorted(p.name for p in dataset_dir.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_val_000000.bin", "manifest.json"
    ]
    assert one["splits"]["train"]["shards"] == ["fineweb_train_000000.bin"]
    for split in ("train", "val"):
        np.testing.assert_array_equal(split_tokens(tmp_path, "rebuilt", split), before[split])
    assert many["tokenizer"]["sha256"] == one["tokenizer"]["sha256"]


def test_interrupted_rebuild_does_not_look_complete(tmp_path, python_docs):
    documents = python_docs[:200]
    corpus.build_corpus(documents=documents, output_root=tmp_path, name="halfway", vocab_size=400, log=quiet)
    manifest_path = tmp_path / "datasets" / "halfway" / "manifest.json"
    assert manifest_path.is_file()

    def stop_after_first_shard(message: str) -> None:
        if message.startswith("write: ") and ".bin" in message:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while shards are written

    with pytest.raises(KeyboardInterrupt):
        corpus.build_corpus(documents=documents, output_root=tmp_path, name="halfway", vocab_size=400,
                            seed=1, log=stop_after_first_shard)
    assert not manifest_path.exists()  # make demo rebuilds rather than train on a mixed dataset
    assert not [p for p in manifest_path.parent.iterdir() if p.name.endswith(".tmp")]  # no temp files left


# =============================================================================
# Errors: one line, exit status 2, no traceback
# =============================================================================


def test_error_no_text_found(tmp_path):
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "blank.txt").write_text("   \n\n", encoding="utf-8")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    result = run_script(BUILD_SCRIPT, str(tmp_path / "empty_folder"), str(tmp_path / "blank.txt"),
                        str(tmp_path / "binary.txt"), "--output-root", str(tmp_path / "out"))
    assert_one_error_line(result, "no text found")
    assert "warning: " in result.stderr and "binary.txt" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are known good


def test_error_vocab_too_large_for_the_text_leaves_the_earlier_build(tmp_path):
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "a.txt").write_text("a small text about cats and dogs", encoding="utf-8")
    (tmp_path / "inputs" / "b.txt").write_text("another small text about birds", encoding="utf-8")
    output_args = ["--output-root", str(tmp_path / "out")]
    assert run_script(BUILD_SCRIPT, str(tmp_path / "inputs"), *output_args, "--vocab-size", "280").returncode == 0
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    result = run_script(BUILD_SCRIPT, str(tmp_path / "inputs"), *output_args, "--vocab-size", "1024")
    assert_one_error_line(result, "--vocab-size 1024", "too large", "smaller --vocab-size")
    # The failed build wrote nothing: the earlier one is complete, manifest included.
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert (tmp_path / "out" / "datasets" / "local_sp1024" / "manifest.json") in before


def test_error_output_not_writable(tmp_path):
    (tmp_path / "doc1.txt").write_text(CRAFTED_DOCUMENTS[0], encoding="utf-8")
    (tmp_path / "doc2.txt").write_text(CRAFTED_DOCUMENTS[1], encoding="utf-8")
    blocker = tmp_path / "a_regular_file"
    blocker.write_text("not a folder", encoding="utf-8")
    result = run_script(BUILD_SCRIPT, str(tmp_path / "doc1.txt"), str(tmp_path / "doc2.txt"),
                        "--output-root", str(blocker / "data"), "--vocab-size", "300")
    assert_one_error_line(result, "not writable", str(blocker))


@pytest.mark.parametrize(
    "setup, extra_args, phrases",
    [
        ("missing", [], ["input not found"]),
        ("one_document", [], ["1 document(s)", "at least 2"]),
        ("two_documents", ["--val-docs", "2"], ["--val-docs 2", "each split"]),
        ("two_documents", ["--vocab-size", "100"], ["--vocab-size 100", "above 260"]),
        ("two_documents", ["--tokenizer", str(BUILD_SCRIPT)], ["is not a SentencePiece model"]),
        ("two_documents", ["--tokenizer", "missing.model"], ["tokenizer not found: missing.model"]),
    ],
)
def test_error_bad_inputs_and_settings(tmp_path, setup, extra_args, phrases):
    inputs = [str(tmp_path / "missing.txt")]
    if setup != "missing":
        texts = CRAFTED_DOCUMENTS[:1] if setup == "one_document" else CRAFTED_DOCUMENTS[:2]
        inputs = []
        for index, text in enumerate(texts):
            (tmp_path / f"doc{index}.txt").write_text(text, encoding="utf-8")
            inputs.append(str(tmp_path / f"doc{index}.txt"))
    result = run_script(BUILD_SCRIPT, *inputs, "--output-root", str(tmp_path / "out"), *extra_args)
    assert_one_error_line(result, *phrases)


# =============================================================================
# Default corpus: the documentation inside Python
# =============================================================================


def test_python_documentation_is_deterministic_and_excludes_tests(python_docs):
    assert corpus.python_documentation() == python_docs
    assert len(python_docs) > 3000
    assert all(len(document) >= corpus.MIN_DOCSTRING_CHARS for document in python_docs)
    from pydoc_data.topics import topics

    assert topics["assert"] in python_docs  # pydoc topics are documents
    assert any(document.startswith("Serialize ``obj`` to a JSON formatted ``str``") for document in python_docs)
    stdlib = Path(__import__("sysconfig").get_paths()["stdlib"])
    files = corpus.stdlib_source_files(stdlib)
    assert files and all(
        not ({"test", "tests", "idlelib", "site-packages"} & set(p.relative_to(stdlib).parts[:-1])) for p in files
    )
    assert not any(p.name.startswith("test_") for p in files)


def test_default_build_from_the_command_line(tmp_path):
    started = time.perf_counter()
    result = run_script(BUILD_SCRIPT, "--output-root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - started < 120
    manifest = json.loads((tmp_path / "datasets" / "local_sp1024" / "manifest.json").read_text())
    assert manifest["inputs"]["sources"][0].startswith("python-documentation")
    assert manifest["splits"]["train"]["documents"] > 4000
    assert manifest["splits"]["val"]["tokens"] > 50_000  # several hundred 256-token val sequences
    assert (tmp_path / "tokenizers" / "local_sp1024_bpe.model").is_file()
    for split in ("train", "val"):
        assert f"{manifest['splits'][split]['tokens']:,} tokens" in result.stdout


# =============================================================================
# byte260 builds and the export's docs_selected.jsonl
# =============================================================================

# The challenge's descriptor, written out by hand: the test pins the exact file content.
BYTE260_DESCRIPTOR_TEXT = """{
  "config": {
    "bos_id": 1,
    "byte_count": 256,
    "byte_offset": 4,
    "eos_id": 2,
    "pad_id": 0,
    "unk_id": 3
  },
  "tokenizer_type": "pure_byte",
  "vocab_size": 260
}
"""


def byte_documents(tokens: np.ndarray) -> list[bytes]:
    """Each document of a byte260 stream as the bytes it encodes (id - 4); BOS dropped."""
    return [bytes((document.astype(np.int64) - 4).astype(np.uint8)) for document in documents_of(tokens)]


def write_docs_selected(folder: Path, texts: list[str], docs_val: int | None, sha256: str | None = "file",
                        sidecar: bool = True) -> Path:
    """A docs_selected.jsonl in the export's shape (raw non-ASCII), with its sidecar beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "docs_selected.jsonl"
    path.write_bytes("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts).encode("utf-8"))
    if sidecar:
        fields = {"num_docs": len(texts), "shuffle_seed": 1337}
        if docs_val is not None:
            fields["docs_val"] = docs_val
        if sha256 is not None:
            fields["docs_sha256"] = corpus.sha256_file(path) if sha256 == "file" else sha256
        (folder / "docs_selected.source_manifest.json").write_text(json.dumps(fields), encoding="utf-8")
    return path


# Export-like documents: duplicates and an empty text stay (the export keeps every line), a
# U+2028 inside a record must not split it, and the val documents come first.
SELECTED_DOCUMENTS = [
    f"Selected document {index}: " + CRAFTED_DOCUMENTS[index % len(CRAFTED_DOCUMENTS)] for index in range(30)
] + [CRAFTED_DOCUMENTS[0], CRAFTED_DOCUMENTS[0], "", "line\u2028separator and \u0085 next-line inside one record"]


def test_byte260_shards_decode_to_the_documents_byte_exactly(tmp_path, python_docs):
    documents = python_docs[:300] + CRAFTED_DOCUMENTS
    manifest = corpus.build_corpus(documents=documents, name="test_byte260", output_root=tmp_path,
                                   tokenizer="byte260", val_docs=30, log=quiet)
    decoded = {}
    for split in ("train", "val"):
        tokens = split_tokens(tmp_path, "test_byte260", split)
        assert tokens[0] == 1 and int(tokens.max()) < 260
        assert not np.isin(tokens, [0, 2, 3]).any()  # no pad, no EOS, nothing unknown
        assert int((tokens == 1).sum()) == manifest["splits"][split]["documents"]
        decoded[split] = byte_documents(tokens)
        # One token per UTF-8 byte, plus one BOS per document.
        assert manifest["splits"][split]["tokens"] == manifest["splits"][split]["text_bytes"] + len(decoded[split])
    expected = collections.Counter(text.encode("utf-8") for text in set(documents))
    assert collections.Counter(decoded["train"] + decoded["val"]) == expected
    assert len(decoded["val"]) == 30 and "😀".encode("utf-8") in b"".join(decoded["train"] + decoded["val"])

    descriptor = tmp_path / "tokenizers" / "pure_byte_260.json"
    assert descriptor.read_text(encoding="utf-8") == BYTE260_DESCRIPTOR_TEXT
    assert manifest["tokenizer"] == {
        "path": "tokenizers/pure_byte_260.json", "sha256": corpus.sha256_file(descriptor), "kind": "byte",
        "vocab_size": 260, "trained": False, "source": "byte260",
    }
    assert manifest["settings"]["vocab_size"] == 260
    assert sorted(p.name for p in (tmp_path / "tokenizers").iterdir()) == ["pure_byte_260.json"]  # no .model
    # --vocab-size 260 names the byte vocab and is accepted.
    corpus.build_corpus(documents=documents[:20], name="byte_again", output_root=tmp_path, tokenizer="byte260",
                        vocab_size=260, val_docs=2, log=quiet)


def test_byte260_from_the_command_line_defaults_to_local_byte260(tmp_path):
    for index, text in enumerate(CRAFTED_DOCUMENTS[:4]):
        (tmp_path / f"doc{index}.txt").write_text(text, encoding="utf-8")
    result = run_script(BUILD_SCRIPT, *(str(tmp_path / f"doc{i}.txt") for i in range(4)),
                        "--output-root", str(tmp_path / "out"), "--tokenizer", "byte260", "--val-docs", "1")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "datasets" / "local_byte260" / "manifest.json").read_text())
    assert manifest["name"] == "local_byte260" and manifest["tokenizer"]["kind"] == "byte"
    assert "TOKENIZER_PATH=" in result.stdout and "pure_byte_260.json VOCAB_SIZE=260" in result.stdout
    assert not (tmp_path / "out" / "datasets" / "local_sp1024").exists()


def test_sentencepiece_build_at_vocab_512(tmp_path, python_docs):
    manifest = corpus.build_corpus(documents=python_docs[:400], name="sp512", output_root=tmp_path,
                                   vocab_size=512, val_docs=40, log=quiet)
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizers" / "sp512_bpe.model"))
    assert processor.vocab_size() == 512
    assert manifest["tokenizer"]["kind"] == "sentencepiece" and manifest["tokenizer"]["vocab_size"] == 512
    assert manifest["tokenizer"]["vocab_path"] == "tokenizers/sp512_bpe.vocab"
    for split in ("train", "val"):
        tokens = split_tokens(tmp_path, "sp512", split)
        assert int(tokens.max()) < 512 and int((tokens == 1).sum()) == manifest["splits"][split]["documents"]


def test_jsonl_records_are_split_at_newlines_only(tmp_path):
    path = tmp_path / "records.jsonl"
    texts = ["one\u2028two", "three\u0085four", "five\x1cX"]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    collected = corpus.collect_documents([path], warn=quiet)
    assert collected.documents == texts and collected.jsonl_lines_skipped == 0


def test_docs_selected_keeps_the_export_order_and_split(tmp_path):
    path = write_docs_selected(tmp_path / "export", SELECTED_DOCUMENTS, docs_val=12)
    result = run_script(BUILD_SCRIPT, str(path), "--output-root", str(tmp_path / "out"), "--tokenizer", "byte260",
                        "--name", "selected_byte260", "--shard-tokens", "500")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    root = tmp_path / "out"
    manifest = json.loads((root / "datasets" / "selected_byte260" / "manifest.json").read_text())
    # The first docs_val lines are val, the others train, each in file order: no shuffle, no
    # de-duplication, the empty document kept as a lone BOS.
    expected = [text.encode("utf-8") for text in SELECTED_DOCUMENTS]
    assert byte_documents(split_tokens(root, "selected_byte260", "val")) == expected[:12]
    assert byte_documents(split_tokens(root, "selected_byte260", "train")) == expected[12:]
    assert len(manifest["splits"]["train"]["shards"]) > 1  # the streamed writer cuts shards as usual
    assert manifest["splits"]["val"]["documents"] == 12 and manifest["settings"]["val_docs"] == 12
    assert manifest["settings"]["split"].startswith("export order") and manifest["settings"]["seed"] is None
    selected = manifest["inputs"]["docs_selected"]
    assert selected["sha256"] == corpus.sha256_file(path) and selected["sha256_checked"] is True
    assert manifest["inputs"]["documents"] == len(SELECTED_DOCUMENTS)
    assert manifest["inputs"]["duplicate_documents_removed"] == 0
    assert manifest["inputs"]["text_bytes"] == sum(len(text) for text in expected)


def test_docs_selected_with_a_trained_tokenizer_and_given_val_docs(tmp_path, python_docs):
    # No sidecar: --val-docs gives the split (with a warning that nothing was checked); the
    # tokenizer is trained on the streamed train documents only.
    texts = python_docs[:300]
    path = write_docs_selected(tmp_path / "export", texts, docs_val=None, sidecar=False)
    warnings = []
    manifest = corpus.build_corpus(inputs=[path], name="selected_sp", output_root=tmp_path / "out",
                                   vocab_size=400, val_docs=25, log=quiet, warn=warnings.append)
    assert any("sha256 not checked" in warning for warning in warnings)
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / manifest["tokenizer"]["path"]))
    val = split_tokens(tmp_path / "out", "selected_sp", "val")
    expected = [t for text in texts[:25] for t in [1] + processor.encode(text)]
    np.testing.assert_array_equal(val, np.array(expected, dtype=np.uint16))
    assert manifest["splits"]["train"]["documents"] == 275
    assert manifest["tokenizer"]["training_lines"] == len(corpus.training_sentences(texts[25:])[0])


@pytest.mark.parametrize(
    "case, extra_args, phrases",
    [
        ("sha_mismatch", [], ["sha256", "does not match docs_sha256", "--with-docs"]),
        ("conflicting_val_docs", ["--val-docs", "5"], ["--val-docs 5", "docs_val 12", "leave --val-docs out"]),
        ("no_sidecar", [], ["no docs_val", "--val-docs"]),
        ("docs_val_too_large", [], ["docs_val 34", "each split"]),
        ("bad_line", [], ["line 3", "text"]),
        ("with_other_input", [], ["must be the only input"]),
        ("vocab_with_byte260", ["--vocab-size", "1024"], ["--vocab-size 1024", "byte260", "260 ids"]),
    ],
)
def test_error_docs_selected_and_byte260(tmp_path, case, extra_args, phrases):
    texts = list(SELECTED_DOCUMENTS)
    docs_val = {"docs_val_too_large": len(texts)}.get(case, 12)
    if case == "bad_line":
        texts[2] = None  # written as {"text": null}
    path = write_docs_selected(tmp_path / "export", texts, docs_val=docs_val,
                               sha256="0" * 64 if case == "sha_mismatch" else "file", sidecar=case != "no_sidecar")
    inputs = [str(path)]
    if case == "with_other_input":
        (tmp_path / "other.txt").write_text("more text", encoding="utf-8")
        inputs.append(str(tmp_path / "other.txt"))
    result = run_script(BUILD_SCRIPT, *inputs, "--output-root", str(tmp_path / "out"), "--tokenizer", "byte260",
                        *extra_args)
    assert_one_error_line(result, *phrases)
    if case != "bad_line":  # a bad line is met while streaming; everything else before any output
        assert not (tmp_path / "out").exists()
    else:
        assert not (tmp_path / "out" / "datasets" / "local_byte260" / "manifest.json").exists()



# =============================================================================
# Downloader
# =============================================================================


def fake_remote(tmp_path: Path, train_shards: int) -> tuple[Path, list[str]]:
    """A folder shaped like the hub export: manifest.json, datasets/<name>/, tokenizers/."""
    remote = tmp_path / "remote"
    documents = [f"Document number {i}: " + CRAFTED_DOCUMENTS[i % 3] * 20 for i in range(60)]
    corpus.build_corpus(documents=documents, output_root=remote, name="fineweb10B_sp1024", vocab_size=400,
                        shard_tokens=2_000, val_docs=10, log=quiet)
    (remote / "datasets" / "fineweb10B_sp1024" / "manifest.json").unlink()
    tokenizers = remote / "tokenizers"
    (tokenizers / "fineweb10B_sp1024_bpe.model").rename(tokenizers / "fineweb_1024_bpe.model")
    (tokenizers / "fineweb10B_sp1024_bpe.vocab").rename(tokenizers / "fineweb_1024_bpe.vocab")
    shards = sorted(p.name for p in (remote / "datasets" / "fineweb10B_sp1024").glob("fineweb_train_*.bin"))
    assert len(shards) >= train_shards
    manifest = {
        "datasets": [
            {"name": "fineweb10B_sp512", "tokenizer_name": "sp_bpe_512", "stats": {"files_train": 1, "files_val": 1}},
            {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
             "stats": {"files_train": len(shards), "files_val": 1}},
        ],
        "tokenizers": [
            {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
             "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
        ],
    }
    (remote / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return remote, shards


def test_downloader_lays_out_the_challenge_files(tmp_path):
    remote, shards = fake_remote(tmp_path, train_shards=3)
    fetched: list[str] = []

    def fetch(remote_path: str, staging: Path) -> Path:  # what hf_hub_download(local_dir=...) does
        fetched.append(remote_path)
        target = staging / downloader.DEFAULT_REMOTE_ROOT / remote_path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(remote / remote_path, target)
        return target

    output_root = tmp_path / "data"
    manifest = downloader.download("sp1024", 2, output_root, fetch, log=quiet)
    dataset_dir = output_root / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in dataset_dir.glob("*.bin")) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"
    ]
    for name in ("fineweb_train_000001.bin", "fineweb_val_000000.bin"):
        assert (dataset_dir / name).read_bytes() == (remote / "datasets" / "fineweb10B_sp1024" / name).read_bytes()
    model = output_root / "tokenizers" / "fineweb_1024_bpe.model"
    assert model.read_bytes() == (remote / "tokenizers" / "fineweb_1024_bpe.model").read_bytes()
    assert manifest["tokenizer"]["path"] == "tokenizers/fineweb_1024_bpe.model"
    train_tokens = sum(len(corpus.read_shard(path)) for path in dataset_dir.glob("fineweb_train_*"))
    assert manifest["splits"]["train"]["tokens"] == train_tokens
    assert json.loads((dataset_dir / "manifest.json").read_text()) == manifest
    assert not (output_root / "datasets" / ".hub_download").exists()
    # A second run fetches only the manifest and what is missing.
    fetched.clear()
    downloader.download("sp1024", 3, output_root, fetch, log=quiet)
    assert fetched == ["manifest.json", "datasets/fineweb10B_sp1024/fineweb_train_000002.bin"]


def test_downloader_rejects_unexpected_manifests(tmp_path):
    good = {
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "t", "stats": {"files_train": 5, "files_val": 1}}],
        "tokenizers": [{"name": "t", "model_path": "tokenizers/fineweb_1024_bpe.model"}],
    }
    items = downloader.plan_downloads(good, "sp1024", None, tmp_path)
    assert [i.remote for i in items][:2] == [
        "datasets/fineweb10B_sp1024/fineweb_val_000000.bin", "datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    ]
    assert len(items) == 1 + 5 + 1 and items[-1].local == tmp_path / "tokenizers" / "fineweb_1024_bpe.model"
    with pytest.raises(downloader.DownloadError, match="has 5 train shards"):
        downloader.plan_downloads(good, "sp1024", 6, tmp_path)
    bad_manifests = [
        [],
        {"datasets": {}},
        {"datasets": [{"name": "fineweb10B_sp1024", "stats": {}}]},
        {**good, "tokenizers": []},
        {**good, "tokenizers": [{"name": "t", "model_path": "../../etc/passwd"}]},
    ]
    for bad in bad_manifests:
        with pytest.raises(downloader.DownloadError, match="unexpected manifest"):
            downloader.plan_downloads(bad, "sp1024", None, tmp_path)
    with pytest.raises(downloader.DownloadError, match="which lists: no fineweb10B_"):
        downloader.plan_downloads({"datasets": []}, "sp1024", None, tmp_path)


def test_downloader_rejects_a_malformed_variant_before_any_network():
    # Checked before huggingface_hub is imported or the hub probed: no network settings needed.
    for variant in ("gpt2", "sp0", "sp", "byte256"):
        result = run_script(DOWNLOAD_SCRIPT, "--variant", variant)
        assert_one_error_line(result, f"--variant {variant!r}", "sp<N>", "byte260")


def test_huggingface_hub_is_imported_only_by_the_downloader_main():
    code = (
        "import importlib.util, sys\n"
        f"for path in [{str(BUILD_SCRIPT)!r}, {str(DOWNLOAD_SCRIPT)!r}]:\n"
        "    spec = importlib.util.spec_from_file_location(path.split('/')[-1][:-3], path)\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "print('huggingface_hub' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_downloader_defaults_to_the_challenge_80_train_shards(tmp_path):
    manifest = {
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "t", "stats": {"files_train": 195, "files_val": 1}}],
        "tokenizers": [{"name": "t", "model_path": "tokenizers/fineweb_1024_bpe.model"}],
    }
    items = downloader.plan_downloads(manifest, "sp1024", None, tmp_path)
    assert sum("fineweb_train_" in item.remote for item in items) == 80


# -----------------------------------------------------------------------------
# Downloader against a stub hub: a fake huggingface_hub whose hf_hub_download serves files
# from temporary folders, one per repo id. None of this has run against the real hub.
# -----------------------------------------------------------------------------


class EntryNotFoundError(Exception):
    """Named like huggingface_hub's: the downloader recognises a missing file by the name."""


class StubHub:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.downloads: list[tuple[str, str]] = []  # (repo_id, filename inside the repo)
        self.probed: list[str] = []

    def repo(self, repo_id: str) -> Path:
        return self.folder / repo_id

    def hf_hub_download(self, repo_id: str, repo_type: str, filename: str, local_dir: Path) -> str:
        assert repo_type == "dataset"
        self.downloads.append((repo_id, filename))
        source = self.repo(repo_id) / filename
        if not source.is_file():
            raise EntryNotFoundError(f"404 {repo_id}/{filename}")
        target = Path(local_dir) / filename  # where hf_hub_download(local_dir=...) puts it
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return str(target)

    def check_reachable(self, source) -> None:
        self.probed.append(source.repo_id)


@pytest.fixture
def stub_hub(tmp_path, monkeypatch) -> StubHub:
    hub = StubHub(tmp_path / "hub")
    module = ModuleType("huggingface_hub")
    module.hf_hub_download = hub.hf_hub_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    monkeypatch.setattr(downloader, "check_hub_reachable", hub.check_reachable)
    for key, value in downloader.HUB_TIMEOUT_ENVIRONMENT.items():
        monkeypatch.setenv(key, value)  # main() sets them; the fixture restores the environment after
    for key in (downloader.REPO_ID_ENVIRONMENT, downloader.REMOTE_ROOT_ENVIRONMENT):
        monkeypatch.delenv(key, raising=False)
    return hub


def write_export(root: Path, variants: dict[str, int], documents: list[str] | None = None,
                 docs_val: int = 0, docs_sha256: str | None = "file") -> None:
    """An export in the challenge's shape under `root` (the remote root): manifest.json,
    datasets/fineweb10B_<variant>/ shards (random ids below the vocab, one val shard),
    tokenizers/ files, and optionally docs_selected.jsonl with its sidecar."""
    manifest: dict[str, list] = {"datasets": [], "tokenizers": []}
    for variant, train_shards in variants.items():
        dataset_dir = root / "datasets" / f"fineweb10B_{variant}"
        dataset_dir.mkdir(parents=True)
        (root / "tokenizers").mkdir(exist_ok=True)
        if variant == "byte260":
            vocab, kind, tokenizer_name = 260, "byte", "pure_byte_260"
            entry = {"name": tokenizer_name, "kind": kind, "path": "tokenizers/fineweb_pure_byte_260.json"}
            (root / entry["path"]).write_text(BYTE260_DESCRIPTOR_TEXT, encoding="utf-8")
        else:
            vocab, kind, tokenizer_name = int(variant[2:]), "sentencepiece", f"sp_bpe_{variant[2:]}"
            entry = {"name": tokenizer_name, "kind": kind, "model_path": f"tokenizers/fineweb_{vocab}_bpe.model",
                     "vocab_path": f"tokenizers/fineweb_{vocab}_bpe.vocab"}
            (root / entry["model_path"]).write_bytes(f"stub model {variant}".encode())
            (root / entry["vocab_path"]).write_bytes(f"stub vocab {variant}".encode())
        manifest["tokenizers"].append(entry)
        manifest["datasets"].append({"name": f"fineweb10B_{variant}", "tokenizer_name": tokenizer_name,
                                     "tokenizer_kind": kind, "vocab_size": vocab,
                                     "stats": {"files_train": train_shards, "files_val": 1}})
        generator = np.random.default_rng(vocab)
        for split, count in (("val", 1), ("train", train_shards)):
            for index in range(count):
                tokens = generator.integers(4, vocab, size=200 + index).astype("<u2")
                tokens[0] = 1
                shard = dataset_dir / f"fineweb_{split}_{index:06d}.bin"
                shard.write_bytes(corpus.shard_header(len(tokens)).tobytes() + tokens.tobytes())
    if documents is not None:
        write_docs_selected(root, documents, docs_val=docs_val, sha256=docs_sha256)
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


CHALLENGE_REPO = "willdepueoai/parameter-golf"
CHALLENGE_VARIANTS = {"byte260": 2, "sp512": 1, "sp1024": 3, "sp2048": 1, "sp4096": 3}


def test_downloader_sp4096_and_byte260_layouts(tmp_path, stub_hub, capsys):
    remote = stub_hub.repo(CHALLENGE_REPO) / "datasets"
    write_export(remote, CHALLENGE_VARIANTS)
    output_root = tmp_path / "data"
    for variant, tokenizer_file, kind, vocab in (
        ("sp4096", "fineweb_4096_bpe.model", "sentencepiece", 4096),
        ("byte260", "fineweb_pure_byte_260.json", "byte", 260),
    ):
        assert downloader.main(["--variant", variant, "--train-shards", "2", "--output-root", str(output_root)]) == 0
        dataset_dir = output_root / "datasets" / f"fineweb10B_{variant}"
        assert sorted(p.name for p in dataset_dir.glob("*.bin")) == [
            "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"
        ]
        for shard in dataset_dir.glob("*.bin"):
            assert shard.read_bytes() == (remote / "datasets" / dataset_dir.name / shard.name).read_bytes()
        tokenizer = output_root / "tokenizers" / tokenizer_file
        assert tokenizer.read_bytes() == (remote / "tokenizers" / tokenizer_file).read_bytes()
        manifest = json.loads((dataset_dir / "manifest.json").read_text())
        assert manifest["tokenizer"] == {"path": f"tokenizers/{tokenizer_file}",
                                         "sha256": corpus.sha256_file(tokenizer), "kind": kind,
                                         "vocab_size": vocab, "trained": False}
        assert manifest["source"] == {"repo_id": CHALLENGE_REPO, "repo_type": "dataset", "remote_root": "datasets",
                                      "variant": variant}
        assert f"VOCAB_SIZE={vocab}" in capsys.readouterr().out
    assert (output_root / "tokenizers" / "fineweb_4096_bpe.vocab").is_file()
    assert json.loads((output_root / "tokenizers" / "fineweb_pure_byte_260.json").read_text())["vocab_size"] == 260
    assert {repo for repo, _ in stub_hub.downloads} == {CHALLENGE_REPO} and stub_hub.probed == [CHALLENGE_REPO] * 2
    assert all(filename.startswith("datasets/") for _, filename in stub_hub.downloads)


def test_downloader_sp8192_from_another_repo_and_root(tmp_path, stub_hub, monkeypatch, capsys):
    write_export(stub_hub.repo(CHALLENGE_REPO) / "datasets", CHALLENGE_VARIANTS)
    fork = "someone/parameter-golf-sp8192"
    write_export(stub_hub.repo(fork) / "exports", {"sp8192": 2})
    output_root = tmp_path / "data"
    arguments = ["--variant", "sp8192", "--train-shards", "1", "--output-root", str(output_root)]
    # The challenge's repo has no sp8192: refused, naming what it does list.
    assert downloader.main(arguments) == 2
    error = capsys.readouterr().err
    assert error.count("error: ") == 1 and "sp8192" in error
    assert "which lists: byte260, sp512, sp1024, sp2048, sp4096" in error
    # --repo-id and --remote-root, then the same through the environment overrides.
    assert downloader.main([*arguments, "--repo-id", fork, "--remote-root", "exports/"]) == 0
    assert stub_hub.downloads[-1] == (fork, "exports/tokenizers/fineweb_8192_bpe.vocab")
    manifest = json.loads((output_root / "datasets" / "fineweb10B_sp8192" / "manifest.json").read_text())
    assert manifest["source"]["repo_id"] == fork and manifest["source"]["remote_root"] == "exports"
    assert manifest["tokenizer"]["path"] == "tokenizers/fineweb_8192_bpe.model"
    shutil.rmtree(output_root)
    monkeypatch.setenv(downloader.REPO_ID_ENVIRONMENT, fork)
    monkeypatch.setenv(downloader.REMOTE_ROOT_ENVIRONMENT, "exports")
    stub_hub.downloads.clear()
    assert downloader.main(arguments) == 0
    assert {repo for repo, _ in stub_hub.downloads} == {fork} and stub_hub.probed[-1] == fork
    assert (output_root / "datasets" / "fineweb10B_sp8192" / "fineweb_train_000000.bin").is_file()


def test_downloader_with_docs_checks_the_sha256_and_retokenises(tmp_path, stub_hub, capsys):
    remote = stub_hub.repo(CHALLENGE_REPO) / "datasets"
    write_export(remote, CHALLENGE_VARIANTS, documents=SELECTED_DOCUMENTS, docs_val=12)
    output_root = tmp_path / "data"
    # Documents only: no --variant.
    assert downloader.main(["--with-docs", "--output-root", str(output_root)]) == 0
    out = capsys.readouterr().out
    docs = output_root / "docs_selected.jsonl"
    assert docs.read_bytes() == (remote / "docs_selected.jsonl").read_bytes()
    assert (output_root / "docs_selected.source_manifest.json").read_bytes() == (
        remote / "docs_selected.source_manifest.json").read_bytes()
    assert "sha256 matches the sidecar" in out and "python3 data/build_local_corpus.py" in out and "byte260" in out
    assert not (output_root / "datasets" / ".hub_download").exists()
    # A rerun with a variant: the documents are verified in place, not fetched again.
    stub_hub.downloads.clear()
    assert downloader.main(["--variant", "byte260", "--train-shards", "0", "--with-docs",
                            "--output-root", str(output_root)]) == 0
    assert ("willdepueoai/parameter-golf", "datasets/docs_selected.jsonl") not in stub_hub.downloads
    assert "already present" in capsys.readouterr().out
    # The printed retokenising reproduces the export's split.
    manifest = corpus.build_corpus(inputs=[docs], name="retokenised", output_root=output_root, tokenizer="byte260",
                                   log=quiet)
    assert manifest["splits"]["val"]["documents"] == 12
    expected = [text.encode("utf-8") for text in SELECTED_DOCUMENTS]
    assert byte_documents(split_tokens(output_root, "retokenised", "val")) == expected[:12]


def test_downloader_with_docs_refuses_a_sha256_mismatch(tmp_path, stub_hub, capsys):
    remote = stub_hub.repo(CHALLENGE_REPO) / "datasets"
    write_export(remote, CHALLENGE_VARIANTS, documents=SELECTED_DOCUMENTS, docs_val=12, docs_sha256="ab" * 32)
    output_root = tmp_path / "data"
    assert downloader.main(["--with-docs", "--output-root", str(output_root)]) == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "does not match" in error_lines[0] and "ab" * 32 in error_lines[0]
    # Neither file in place, and both downloads deleted from staging.
    assert not list(output_root.rglob("docs_selected*"))


@pytest.mark.parametrize(
    "arguments",
    [
        ["--variant", "sp1024"],
        ["--variant", "byte260", "--train-shards", "1"],
        ["--variant", "sp8192", "--repo-id", "someone/parameter-golf-sp8192", "--remote-root", "exports"],
        ["--with-docs"],
        ["--variant", "sp4096", "--with-docs"],
    ],
)
def test_downloader_fails_fast_without_network(tmp_path, arguments):
    pytest.importorskip("huggingface_hub", reason="huggingface_hub not installed (requirements.txt lists it)")
    started = time.perf_counter()
    # Nothing listens on port 9 (discard): the connection is refused at once.
    result = run_script(DOWNLOAD_SCRIPT, *arguments, "--output-root", str(tmp_path),
                        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
                             "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    assert time.perf_counter() - started < 15  # hf_hub_download alone retries for ~25 s
    assert_one_error_line(result, "cannot reach", "python3 data/build_local_corpus.py")
    assert not list(tmp_path.iterdir())  # nothing written before the hub answered


def test_downloader_argument_combinations(tmp_path):
    result = run_script(DOWNLOAD_SCRIPT, "--output-root", str(tmp_path))
    assert result.returncode == 2 and "--variant is required" in result.stderr and "--with-docs" in result.stderr
    result = run_script(DOWNLOAD_SCRIPT, "--with-docs", "--train-shards", "2")
    assert result.returncode == 2 and "--train-shards needs --variant" in result.stderr
    result = run_script(DOWNLOAD_SCRIPT, "--variant", "sp1024", "--repo-id", "not a repo")
    assert_one_error_line(result, "--repo-id 'not a repo'")
    result = run_script(DOWNLOAD_SCRIPT, "--variant", "sp1024", "--remote-root", "../elsewhere")
    assert_one_error_line(result, "--remote-root", "..")
