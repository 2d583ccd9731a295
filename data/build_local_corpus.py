"""
build_local_corpus.py: turn local text into a Parameter Golf dataset, with no network.

The challenge trains on FineWeb shards tokenised with an sp1024 SentencePiece model
(data/cached_challenge_fineweb.py downloads them). This script writes the same format from
text you have on disk, so the trainer, its tests and the demo run anywhere:

    python3 data/build_local_corpus.py                      # Python's own documentation
    python3 data/build_local_corpus.py notes/ books.jsonl   # your text
    python3 data/build_local_corpus.py corpus/ --tokenizer data/tokenizers/fineweb_1024_bpe.model
    python3 data/build_local_corpus.py corpus/ --tokenizer byte260        # the byte-level tokenizer
    python3 data/build_local_corpus.py data/docs_selected.jsonl --tokenizer byte260

Inputs are any mix of .txt/.md/.rst files, folders (searched recursively for those and for
.jsonl) and JSONL files whose lines carry a "text" field: one document per file or per JSONL
line. With no input the corpus is the documentation shipped inside the running Python (the
docstrings of its standard library and the pydoc topics): the same Python gives
byte-identical output. Documents are de-duplicated and split by a seeded shuffle.

A file named docs_selected.jsonl (the challenge's selected documents, fetched by
cached_challenge_fineweb.py --with-docs) is read differently, so that retokenising it
reproduces the challenge's split: streamed in its own order, nothing removed, the first
docs_val documents (from the docs_selected.source_manifest.json beside it, or --val-docs) form
val, and its sha256 is checked against the sidecar's docs_sha256.

--tokenizer byte260 selects the challenge's pure byte tokenizer instead of SentencePiece: ids
0-3 are pad/bos/eos/unk and byte b of a document's UTF-8 text is id 4 + b (vocab 260).

Output (see data/README.md):
    <output-root>/datasets/<name>/fineweb_{train,val}_NNNNNN.bin   challenge shards
    <output-root>/datasets/<name>/manifest.json                    counts, inputs, settings
    <output-root>/tokenizers/<name>_bpe.model (+ .vocab)           the SentencePiece model, or
    <output-root>/tokenizers/pure_byte_260.json                    the byte tokenizer's descriptor

The functions build_corpus(), python_documentation() and read_shard() are importable, so
tests can build small datasets in-process.
"""

import argparse
import ast
import hashlib
import itertools
import json
import os
import re
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm

# The tools' one atomic-write helper lives in scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from atomic_write import write_atomically  # noqa: E402

# =============================================================================
# CONSTANTS: the challenge's shard format and tokenizer settings
# =============================================================================

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256  # little-endian int32: magic, version, token count, then zeros
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
BOS_ID = 1  # every document starts with <s>; no </s> is appended (as in the challenge's export)
UINT16_LIMIT = 1 << 16  # tokens are stored as uint16, so every id must be below this

DEFAULT_NAME = "local_sp1024"
DEFAULT_OUTPUT_ROOT = Path(__file__).resolve().parent  # the repository's data/ folder
DEFAULT_VOCAB_SIZE = 1024
# The default corpus (Python's documentation, ~0.8M tokens) needs 15% for a validation split
# of ~100k tokens: enough sequences for a stable val_bpb in the tiny preset.
DEFAULT_VAL_FRACTION = 0.15
DEFAULT_SHARD_TOKENS = 100_000_000  # the challenge's shard size: small corpora get one shard

# The challenge's pure byte tokenizer (its fineweb_pure_byte_260.json): four special ids, then
# byte b of the UTF-8 text at id BYTE_OFFSET + b. No model to train or ship: a JSON descriptor.
BYTE_TOKENIZER_NAME = "byte260"  # the word --tokenizer takes instead of a .model path
BYTE_TOKENIZER_FILE = "pure_byte_260.json"
DEFAULT_BYTE_NAME = "local_byte260"
BYTE_OFFSET = 4
BYTE_COUNT = 256
BYTE_VOCAB_SIZE = BYTE_OFFSET + BYTE_COUNT
BYTE_TOKENIZER_DESCRIPTOR = {
    "tokenizer_type": "pure_byte",
    "config": {"pad_id": 0, "bos_id": BOS_ID, "eos_id": 2, "unk_id": 3, "byte_offset": BYTE_OFFSET,
               "byte_count": BYTE_COUNT},
    "vocab_size": BYTE_VOCAB_SIZE,
}

# The challenge's selected documents and the sidecar beside them (num_docs, docs_val,
# docs_sha256 of the .jsonl file's bytes): read in the export's order, not shuffled.
DOCS_SELECTED_FILE = "docs_selected.jsonl"
DOCS_SELECTED_SIDECAR = "docs_selected.source_manifest.json"
HASH_CHUNK_BYTES = 8 << 20  # docs_selected.jsonl is gigabytes: hash it a chunk at a time

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)

# The challenge's tokenizer trainer settings (GUIDE section 6).
TOKENIZER_TRAINER_SETTINGS: dict[str, object] = {
    "model_type": "bpe",
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "character_coverage": 0.999,
}
# The thread count is stored inside the .model file, so a machine-dependent value (the CPU
# count) would make two machines write different bytes for the same tokenizer.
TOKENIZER_TRAINER_THREADS = 8
# SentencePiece treats each input line as a sentence and skips longer ones.
TOKENIZER_MAX_SENTENCE_BYTES = 1 << 20
# Training text cap: BPE training time and memory grow with the text; past ~100 MB of text the
# merges barely change. The lines come from shuffled documents, so the first ones are a sample.
TOKENIZER_MAX_TRAINING_CHARS = 100_000_000

ENCODE_BATCH_DOCUMENTS = 4096  # documents per sp.encode call (multithreaded inside)

# Default corpus: docstrings shorter than this are one-liners ("Return self.") with little text.
MIN_DOCSTRING_CHARS = 40
# Standard-library folders that are not documentation of the library itself.
SKIPPED_STDLIB_FOLDERS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages"}

SHARD_NAME_PATTERN = re.compile(r"^fineweb_(train|val)_(\d{6})\.bin$")
DATASET_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Log = Callable[[str], None]


class CorpusError(ValueError):
    """A problem the user can fix; main() prints it as one 'error: ...' line and exits 2."""


def print_progress(message: str) -> None:
    print(message, flush=True)


def print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def format_size(num_bytes: int) -> str:
    if num_bytes >= 1_000_000:
        return f"{num_bytes / 1_000_000:.1f} MB"
    if num_bytes >= 1_000:
        return f"{num_bytes / 1_000:.1f} kB"
    return f"{num_bytes} bytes"


def utf8_bytes(text: str) -> bytes:
    """The UTF-8 bytes of a text; a lone surrogate (JSON allows "\\ud800") becomes '?', as in the
    challenge's byte export, instead of stopping the build."""
    return text.encode("utf-8", errors="replace")


def display_path(path: Path) -> str:
    """The path relative to the working directory when it lies below it, else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


# =============================================================================
# SHARDS: write and read the challenge's .bin format
# =============================================================================


def shard_header(num_tokens: int) -> np.ndarray:
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = num_tokens
    return header


def read_shard(path: Path | str) -> np.ndarray:
    """The tokens of one shard as uint16, after checking its header and size."""
    path = Path(path)
    file_size = path.stat().st_size
    if file_size < SHARD_HEADER_BYTES:
        raise CorpusError(f"{path}: {file_size} bytes, shorter than the {SHARD_HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC or int(header[1]) != SHARD_VERSION:
        raise CorpusError(
            f"{path}: header magic/version {int(header[0])}/{int(header[1])}, "
            f"expected {SHARD_MAGIC}/{SHARD_VERSION}"
        )
    num_tokens = int(header[2])
    expected_size = SHARD_HEADER_BYTES + 2 * num_tokens
    if file_size != expected_size:
        raise CorpusError(f"{path}: {file_size} bytes, the header's {num_tokens} tokens need {expected_size}")
    return np.fromfile(path, dtype="<u2", count=num_tokens, offset=SHARD_HEADER_BYTES)


class ShardWriter:
    """Cuts one split's token stream into shards of `shard_tokens` and writes each atomically.

    Documents may straddle two shards, as in the challenge's export: the loader reads the
    shards of a split as one stream.
    """

    def __init__(self, folder: Path, split: str, shard_tokens: int, log: Log) -> None:
        self.folder = folder
        self.split = split
        self.shard_tokens = shard_tokens
        self.log = log
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.written: list[Path] = []
        self.total_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens) > 0:
            room = self.shard_tokens - self.pending_tokens
            self.pending.append(tokens[:room])
            self.pending_tokens += len(tokens[:room])
            tokens = tokens[room:]
            if self.pending_tokens == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.pending_tokens == 0:
            return
        path = self.folder / f"fineweb_{self.split}_{len(self.written):06d}.bin"
        write_atomically(path, [shard_header(self.pending_tokens), *self.pending])
        self.log(f"write: {display_path(path)} ({self.pending_tokens:,} tokens)")
        self.written.append(path)
        self.total_tokens += self.pending_tokens
        self.pending = []
        self.pending_tokens = 0


# =============================================================================
# INPUTS: collect documents from files, folders, JSONL, or Python's documentation
# =============================================================================


@dataclass
class CollectedText:
    """Documents in a deterministic order, with what was read and what was skipped."""

    documents: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    files_read: int = 0
    files_skipped: list[dict[str, str]] = field(default_factory=list)
    jsonl_lines_skipped: int = 0
    empty_documents_skipped: int = 0


def stdlib_source_files(stdlib: Path) -> list[Path]:
    """The standard library's .py files, tests and bundled applications excluded, sorted."""
    files = []
    for path in stdlib.rglob("*.py"):
        relative = path.relative_to(stdlib)
        folders = relative.parts[:-1]
        if any(part in SKIPPED_STDLIB_FOLDERS or part.startswith("test_") for part in folders):
            continue
        if relative.name.startswith("test_") or relative.name.endswith("_test.py"):
            continue
        files.append(relative)
    return [stdlib / relative for relative in sorted(files, key=lambda p: p.as_posix())]


def python_documentation() -> list[str]:
    """The documentation shipped inside this Python: one document per docstring and pydoc topic.

    The standard library is parsed with `ast`, never imported: importing every module would
    run their side effects (antigravity opens a browser, `this` prints) and take long.
    Order: module, class and function docstrings by sorted file path, then the pydoc topics
    by sorted key.
    """
    documents = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_source_files(stdlib):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. SyntaxWarning for old escape sequences
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (OSError, SyntaxError, ValueError):
            continue  # a file this Python cannot parse is not part of its documentation
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring and len(docstring) >= MIN_DOCSTRING_CHARS:
                    documents.append(docstring)
    try:
        from pydoc_data.topics import topics  # a plain dict of strings: no side effects
    except ImportError:
        topics = {}  # some distributions strip pydoc_data; the docstrings remain
    documents.extend(topics[key] for key in sorted(topics) if len(topics[key]) >= MIN_DOCSTRING_CHARS)
    return documents


def decode_file(path: Path, collected: CollectedText, warn: Log) -> str | None:
    """The file's text, or None (with a warning, counted) when it is unreadable or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as err:
        reason = f"unreadable ({err.strerror or err})"
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            reason = f"not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})"
        else:
            collected.files_read += 1
            return text.removeprefix("\ufeff")  # a byte-order mark is not text
    collected.files_skipped.append({"path": str(path), "reason": reason})
    warn(f"skipped {path}: {reason}")
    return None


def add_document(text: str, collected: CollectedText) -> None:
    if text.strip():
        collected.documents.append(text)
    else:
        collected.empty_documents_skipped += 1


def read_jsonl(path: Path, collected: CollectedText, warn: Log) -> None:
    text = decode_file(path, collected, warn)
    if text is None:
        return
    bad_lines = 0
    # "\n" only: str.splitlines() also splits at U+2028, U+0085 and others, which JSON leaves
    # unescaped inside strings, and would cut such a record in two.
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            bad_lines += 1
            continue
        add_document(record["text"], collected)
    if bad_lines:
        collected.jsonl_lines_skipped += bad_lines
        warn(f'{path}: {bad_lines} line(s) skipped (not JSON, or no "text" string)')


def collect_documents(inputs: list[Path], warn: Log = print_warning) -> CollectedText:
    """Read every input: files as one document each, JSONL as one document per line."""
    collected = CollectedText()
    for input_path in inputs:
        if not input_path.exists():
            raise CorpusError(f"input not found: {input_path}")
        collected.sources.append(str(input_path))
        if input_path.is_dir():
            suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
            files = sorted(
                (p for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes),
                key=lambda p: p.as_posix(),
            )
            if not files:
                warn(f"no {'/'.join(suffixes)} files in folder {input_path}")
        else:
            files = [input_path]  # a file named explicitly is read whatever its suffix
        for path in files:
            if path.suffix.lower() in JSONL_SUFFIXES:
                read_jsonl(path, collected, warn)
            else:
                text = decode_file(path, collected, warn)
                if text is not None:
                    add_document(text, collected)
    return collected


def remove_duplicates(documents: list[str]) -> list[str]:
    """Keep the first copy of each exact duplicate: a copy in both splits would leak val text."""
    seen: set[str] = set()
    unique = []
    for document in documents:
        if document not in seen:
            seen.add(document)
            unique.append(document)
    return unique


# =============================================================================
# SPLIT: deterministic shuffle, the first documents go to val
# =============================================================================


def shuffle_documents(documents: list[str], seed: int) -> list[str]:
    """Order documents by a seeded hash of their text.

    Unlike random.shuffle or numpy generators, whose streams may change between versions,
    sha256 gives the same order on every Python and every machine.
    """
    seed_prefix = f"build_local_corpus seed {seed}\n".encode("utf-8")
    return sorted(documents, key=lambda text: hashlib.sha256(seed_prefix + utf8_bytes(text)).digest())


def split_documents(
    documents: list[str], seed: int, val_fraction: float = DEFAULT_VAL_FRACTION, val_docs: int | None = None
) -> tuple[list[str], list[str]]:
    """(val, train): the first shuffled documents are val, like the challenge's fixed val set."""
    shuffled = shuffle_documents(documents, seed)
    if val_docs is None:
        num_val = max(1, round(val_fraction * len(shuffled)))  # a positive fraction gets >= 1 doc
        requested = f"--val-fraction {val_fraction}"
    else:
        num_val = val_docs
        requested = f"--val-docs {val_docs}"
    if len(shuffled) < 2:
        raise CorpusError(f"{len(shuffled)} document(s) found: a train and a val split need at least 2")
    if num_val < 1 or num_val >= len(shuffled):
        raise CorpusError(
            f"{requested} gives {num_val} of {len(shuffled)} documents to val: "
            "each split needs at least one document"
        )
    return shuffled[:num_val], shuffled[num_val:]


# =============================================================================
# DOCS_SELECTED: the challenge's own documents, streamed in the export's order
# =============================================================================


@dataclass(frozen=True)
class SelectedDocuments:
    """docs_selected.jsonl once checked: its size, its val split, its digest and sidecar."""

    path: Path
    num_documents: int
    val_docs: int  # the first val_docs lines are val, the rest train: the export's split
    sha256: str
    sha256_checked: bool
    sidecar_path: Path | None
    sidecar: dict


def read_sidecar(path: Path) -> tuple[Path | None, dict]:
    """The docs_selected.source_manifest.json beside the .jsonl, or (None, {}) when absent."""
    sidecar_path = path.with_name(DOCS_SELECTED_SIDECAR)
    if not sidecar_path.is_file():
        return None, {}
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorpusError(f"{sidecar_path} is not readable JSON ({err})") from None
    if not isinstance(sidecar, dict):
        raise CorpusError(f"{sidecar_path} is not a JSON object")
    return sidecar_path, sidecar


def sidecar_count(sidecar: dict, key: str, sidecar_path: Path | None) -> int | None:
    value = sidecar.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CorpusError(f"{sidecar_path}: {key} {value!r} is not a non-negative integer")
    return value


def hash_and_count_lines(path: Path) -> tuple[str, int]:
    """sha256 of the file's bytes and its number of lines, a chunk at a time."""
    digest = hashlib.sha256()
    lines = 0
    last_byte = b"\n"
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            lines += chunk.count(b"\n")
            last_byte = chunk[-1:]
    if last_byte != b"\n":
        lines += 1  # a last line without its newline
    return digest.hexdigest(), lines


def open_docs_selected(path: Path, val_docs: int | None, log: Log, warn: Log) -> SelectedDocuments:
    """Check docs_selected.jsonl against its sidecar before any slow work, and fix the split.

    One pass over the file hashes it and counts its lines (one document per line); the text
    itself is read later, a line at a time, by iter_docs_selected.
    """
    sidecar_path, sidecar = read_sidecar(path)
    expected = sidecar.get("docs_sha256")
    expected = expected.strip().lower() if isinstance(expected, str) and expected.strip() else None
    log(f"collect: hashing {display_path(path)} ({format_size(path.stat().st_size)}) ...")
    digest, num_documents = hash_and_count_lines(path)
    if expected is not None and digest != expected:
        raise CorpusError(
            f"{path}: sha256 {digest} does not match docs_sha256 {expected} in {sidecar_path}: "
            "not the file the sidecar describes (fetch both again: cached_challenge_fineweb.py --with-docs)"
        )
    if sidecar_path is None:
        warn(f"{path}: no {DOCS_SELECTED_SIDECAR} beside it, sha256 not checked")
    elif expected is None:
        warn(f"{sidecar_path} has no docs_sha256, sha256 of {path.name} not checked")
    expected_documents = sidecar_count(sidecar, "num_docs", sidecar_path)
    if expected_documents is not None and expected_documents != num_documents:
        raise CorpusError(f"{path}: {num_documents:,} lines, but num_docs in {sidecar_path} is {expected_documents:,}")
    sidecar_val = sidecar_count(sidecar, "docs_val", sidecar_path)
    if val_docs is not None and sidecar_val is not None and val_docs != sidecar_val:
        raise CorpusError(
            f"--val-docs {val_docs} differs from docs_val {sidecar_val} in {sidecar_path}: "
            "leave --val-docs out to keep the export's split"
        )
    num_val = val_docs if val_docs is not None else sidecar_val
    if num_val is None:
        raise CorpusError(f"{path}: no docs_val in a {DOCS_SELECTED_SIDECAR} beside it; give --val-docs N")
    if num_val < 1 or num_val >= num_documents:
        raise CorpusError(
            f"docs_val {num_val} of the {num_documents:,} documents in {path}: each split needs at least one document"
        )
    checked = "sha256 matches the sidecar" if expected is not None else "sha256 not checked"
    log(f"collect: {display_path(path)}: {num_documents:,} documents ({checked})")
    return SelectedDocuments(path, num_documents, num_val, digest, expected is not None, sidecar_path, sidecar)


def iter_docs_selected(path: Path, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """The "text" of lines start to stop - 1 (0-based), a line at a time: never the whole file.

    Every line is a document, an empty text included: skipping one would shift the split.
    """
    with path.open("rb") as file:  # binary: lines end at "\n" only, as hash_and_count_lines counts
        for index, line in enumerate(file):
            if stop is not None and index >= stop:
                return
            if index < start:
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CorpusError(
                    f'{path} line {index + 1}: not a JSON object with a "text" string '
                    "(every line of the export is a document: none can be skipped without shifting the split)"
                )
            yield record["text"]


# =============================================================================
# TOKENIZER: train a SentencePiece BPE model, reuse an existing one, or bytes
# =============================================================================


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vocab_text(processor: spm.SentencePieceProcessor) -> str:
    """The .vocab file SentencePiece writes beside a model: piece, tab, score, one per line."""
    return "".join(
        f"{processor.id_to_piece(token_id)}\t{processor.get_score(token_id):g}\n"
        for token_id in range(processor.vocab_size())
    )


def training_sentences(documents: Iterable[str]) -> tuple[list[str], int]:
    """SentencePiece reads one sentence per line: feed it the non-empty lines, up to the cap.

    Returns the lines and the number of documents they came from. `documents` may be a
    stream over a file larger than memory: it is read only up to the cap.
    """
    sentences = []
    total_chars = 0
    used_documents = 0
    for document in documents:
        used_documents += 1
        for line in document.split("\n"):
            if line.strip():
                sentences.append(line)
                total_chars += len(line)
        if total_chars >= TOKENIZER_MAX_TRAINING_CHARS:
            break
    return sentences, used_documents


def explain_trainer_error(message: str, vocab_size: int, text_chars: int, num_documents: int) -> str:
    plural = "" if num_documents == 1 else "s"
    text = f"{num_documents:,} training document{plural}, {text_chars:,} characters"
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return (
            f"--vocab-size {vocab_size} is too large for the text ({text}): at most "
            f"{too_high.group(2)} pieces can be learnt from it; give more text or a smaller --vocab-size"
        )
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        return (
            f"--vocab-size {vocab_size} is too small for the text ({text}): it needs at least "
            f"{too_small.group(2)} pieces for its characters; give a larger --vocab-size"
        )
    last_line = message.strip().splitlines()[-1] if message.strip() else "unknown error"
    return f"tokenizer training failed ({text}, --vocab-size {vocab_size}): {last_line}"


@dataclass
class Tokenizer:
    """A tokenizer held in memory until the build writes it: a failure leaves old files intact."""

    processor: spm.SentencePieceProcessor | None  # None for the byte tokenizer: bytes need no model
    model_bytes: bytes  # the tokenizer's file: a SentencePiece .model, or the byte descriptor's JSON
    vocab_bytes: bytes | None  # the .vocab written beside a .model; None for the byte tokenizer
    details: dict[str, object]

    @property
    def kind(self) -> str:
        return "byte" if self.processor is None else "sentencepiece"

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB_SIZE if self.processor is None else self.processor.vocab_size()


def is_byte_tokenizer(tokenizer: Path | str | None) -> bool:
    """--tokenizer byte260 names the byte tokenizer; anything else is a .model path."""
    return tokenizer is not None and str(tokenizer) == BYTE_TOKENIZER_NAME


def byte_tokenizer(log: Log) -> Tokenizer:
    """The challenge's byte260 tokenizer: nothing to train, a descriptor the trainer reads."""
    descriptor = json.dumps(BYTE_TOKENIZER_DESCRIPTOR, indent=2, sort_keys=True) + "\n"
    log(f"tokenizer: {BYTE_TOKENIZER_NAME} (UTF-8 bytes at ids {BYTE_OFFSET}-{BYTE_VOCAB_SIZE - 1}), no training")
    return Tokenizer(None, descriptor.encode("utf-8"), None, {"trained": False, "source": BYTE_TOKENIZER_NAME})


def train_tokenizer(train_documents: Iterable[str], vocab_size: int, log: Log) -> Tokenizer:
    """Train BPE with the challenge's settings on the train split's lines."""
    sentences, used_documents = training_sentences(train_documents)
    text_chars = sum(len(sentence) for sentence in sentences)
    capped = " (capped)" if text_chars >= TOKENIZER_MAX_TRAINING_CHARS else ""
    log(
        f"tokenizer: training BPE vocab {vocab_size} on {len(sentences):,} lines, "
        f"{text_chars:,} characters{capped} ..."
    )
    started = time.perf_counter()
    model_buffer = _BytesSink()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            # Written to memory, not to a model_prefix: the prefix would be stored in the model,
            # and a temporary path would make each build's .model bytes differ.
            model_writer=model_buffer,
            vocab_size=vocab_size,
            num_threads=TOKENIZER_TRAINER_THREADS,
            input_sentence_size=0,  # use all the lines given: the cap above is deterministic
            shuffle_input_sentence=False,
            max_sentence_length=TOKENIZER_MAX_SENTENCE_BYTES,
            minloglevel=2,  # SentencePiece's own INFO lines would drown the progress output
            **TOKENIZER_TRAINER_SETTINGS,
        )
    except RuntimeError as err:
        raise CorpusError(explain_trainer_error(str(err), vocab_size, text_chars, used_documents)) from None
    model_bytes = model_buffer.getvalue()
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    log(f"tokenizer: trained in {time.perf_counter() - started:.1f} s")
    details = {
        "trained": True,
        "source": None,
        "trainer_settings": {**TOKENIZER_TRAINER_SETTINGS, "vocab_size": vocab_size},
        "training_lines": len(sentences),
        "training_characters": text_chars,
    }
    return Tokenizer(processor, model_bytes, vocab_text(processor).encode("utf-8"), details)


class _BytesSink:
    """The file-like object SentencePiece's model_writer expects (it only calls write)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(bytes(data))

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


def load_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise CorpusError(f"tokenizer not found: {path}")
    try:
        processor = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as err:
        raise CorpusError(f"{path} is not a SentencePiece model ({str(err).strip().splitlines()[-1]})") from None
    if processor.bos_id() != BOS_ID:
        raise CorpusError(
            f"tokenizer {path} has bos id {processor.bos_id()}: the challenge's format needs <s> = {BOS_ID}"
        )
    if processor.vocab_size() > UINT16_LIMIT:
        raise CorpusError(
            f"tokenizer {path} has {processor.vocab_size():,} pieces: shard tokens are uint16 "
            f"(at most {UINT16_LIMIT:,} ids)"
        )
    return processor


def reuse_tokenizer(source: Path, log: Log) -> Tokenizer:
    """An existing model (and its .vocab, else one made from the model), to copy into the layout."""
    processor = load_tokenizer(source)
    log(f"tokenizer: reusing {display_path(source)} (vocab {processor.vocab_size()}), no training")
    source_vocab = source.with_suffix(".vocab")
    vocab_bytes = source_vocab.read_bytes() if source_vocab.is_file() else vocab_text(processor).encode("utf-8")
    return Tokenizer(processor, source.read_bytes(), vocab_bytes, {"trained": False, "source": str(source)})


# =============================================================================
# ENCODE: documents -> BOS-prefixed uint16 token stream
# =============================================================================


def to_uint16_tokens(token_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Check every id fits the tokenizer's vocab and uint16, then narrow to little-endian uint16."""
    if len(token_ids) == 0:
        return token_ids.astype("<u2")
    largest = int(token_ids.max())
    smallest = int(token_ids.min())
    if smallest < 0 or largest >= vocab_size or largest >= UINT16_LIMIT:
        raise CorpusError(
            f"token id {largest if largest >= 0 else smallest} out of range: ids must be >= 0, "
            f"below the vocab size {vocab_size:,} and below {UINT16_LIMIT:,} (uint16 shards)"
        )
    return token_ids.astype("<u2")


def document_tokens(tokenizer: Tokenizer, batch: list[str]) -> np.ndarray:
    """[BOS] + ids of each document of the batch, concatenated and checked to fit uint16."""
    if tokenizer.processor is None:
        # Byte b is id BYTE_OFFSET + b; every id is below 260, so uint16 holds the batch.
        bos = np.array([BOS_ID], dtype=np.uint16)
        pieces = []
        for document in batch:
            pieces.append(bos)
            pieces.append(np.frombuffer(utf8_bytes(document), dtype=np.uint8).astype(np.uint16) + BYTE_OFFSET)
        return to_uint16_tokens(np.concatenate(pieces), BYTE_VOCAB_SIZE)
    pieces = []
    for ids in tokenizer.processor.encode(batch, out_type=int):
        pieces.append(np.array([BOS_ID], dtype=np.int64))
        pieces.append(np.asarray(ids, dtype=np.int64))
    return to_uint16_tokens(np.concatenate(pieces), tokenizer.vocab_size)


def encode_split(tokenizer: Tokenizer, documents: Iterable[str], writer: ShardWriter, log: Log) -> tuple[int, int]:
    """Encode documents in batches, each as [BOS] + ids, and stream them into the writer.

    `documents` may be a stream over a file larger than memory: one batch is held at a time.
    Returns (documents, UTF-8 bytes of their text).
    """
    num_documents = 0
    text_bytes = 0
    stream = iter(documents)
    while batch := list(itertools.islice(stream, ENCODE_BATCH_DOCUMENTS)):
        num_documents += len(batch)
        text_bytes += sum(len(utf8_bytes(document)) for document in batch)
        writer.add(document_tokens(tokenizer, batch))
    writer.flush()
    tokens = writer.total_tokens
    log(
        f"encode: {writer.split} {num_documents:,} documents -> {tokens:,} tokens "
        f"({tokens / max(1, num_documents):.1f} tokens/document, {text_bytes / max(1, tokens):.2f} text bytes/token)"
    )
    return num_documents, text_bytes


# =============================================================================
# BUILD: inputs -> tokenizer + shards + manifest
# =============================================================================


def ensure_writable_folder(folder: Path) -> None:
    """Create the folder and prove a file can be written there, before any slow work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise CorpusError(f"output not writable: cannot write files in {folder} ({err.strerror or err})") from None


def remove_stale_shards(folder: Path, keep: list[Path], log: Log) -> None:
    """Delete shards of an earlier build that this build did not rewrite (e.g. a 4th shard)."""
    keep_names = {path.name for path in keep}
    stale = sorted(p for p in folder.iterdir() if SHARD_NAME_PATTERN.match(p.name) and p.name not in keep_names)
    for path in stale:
        path.unlink()
    if stale:
        log(f"write: removed {len(stale)} stale shard(s) of an earlier build: {', '.join(p.name for p in stale)}")


def build_corpus(
    documents: list[str] | None = None,
    inputs: list[Path] | None = None,
    name: str | None = None,
    output_root: Path | str = DEFAULT_OUTPUT_ROOT,
    vocab_size: int | None = None,
    tokenizer: Path | str | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    val_docs: int | None = None,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    log: Log = print_progress,
    warn: Log = print_warning,
) -> dict:
    """Build <output_root>/datasets/<name>/ and its tokenizer; return the manifest.

    Text comes from `documents` (in-memory strings) and/or `inputs` (paths); with neither,
    from python_documentation(). An input file named docs_selected.jsonl must be the only
    text: it is streamed in its own order with its own split (see open_docs_selected).
    `tokenizer` reuses an existing SentencePiece model (vocab_size is then the model's), or
    is the word "byte260" for the byte tokenizer (vocab 260, written to
    tokenizers/pure_byte_260.json); otherwise a BPE model of `vocab_size` (default 1024) is
    trained on the train split. `name` defaults to local_sp1024, or local_byte260 with byte260.
    Raises CorpusError for problems the user can fix.
    """
    started = time.perf_counter()
    byte_level = is_byte_tokenizer(tokenizer)
    if name is None:
        name = DEFAULT_BYTE_NAME if byte_level else DEFAULT_NAME
    if not DATASET_NAME_PATTERN.match(name):
        raise CorpusError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    if shard_tokens < 1:
        raise CorpusError(f"--shard-tokens {shard_tokens}: must be at least 1")
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"--val-fraction {val_fraction}: must be between 0 and 1 (exclusive)")
    if byte_level and vocab_size is not None and vocab_size != BYTE_VOCAB_SIZE:
        raise CorpusError(
            f"--vocab-size {vocab_size} with --tokenizer {BYTE_TOKENIZER_NAME}: the byte tokenizer has "
            f"{BYTE_VOCAB_SIZE} ids (4 special + 256 bytes); leave --vocab-size out"
        )
    if tokenizer is None and vocab_size is None:
        vocab_size = DEFAULT_VOCAB_SIZE
    if tokenizer is None and not 4 + 256 < vocab_size <= UINT16_LIMIT:
        raise CorpusError(
            f"--vocab-size {vocab_size}: must be above 260 (4 special + 256 byte-fallback pieces) "
            f"and at most {UINT16_LIMIT:,} (uint16 shards)"
        )
    output_root = Path(output_root)
    inputs = [Path(p) for p in (inputs or [])]

    # --- collect and split: each split is a function giving its documents, so that the
    # export's docs_selected.jsonl can be streamed from disk (twice, when a tokenizer is
    # trained on it) instead of held in memory ---
    selected_inputs = [path for path in inputs if path.name == DOCS_SELECTED_FILE and path.is_file()]
    split_sources: dict[str, Callable[[], Iterable[str]]]
    if selected_inputs:
        if len(inputs) > 1 or documents is not None:
            raise CorpusError(
                f"{selected_inputs[0]}: {DOCS_SELECTED_FILE} must be the only input, "
                "so that its split stays the export's"
            )
        selected = open_docs_selected(selected_inputs[0], val_docs, log, warn)
        split_sources = {
            "train": lambda: iter_docs_selected(selected.path, start=selected.val_docs),
            "val": lambda: iter_docs_selected(selected.path, stop=selected.val_docs),
        }
        log(
            f"split: export order: the first {selected.val_docs:,} documents are val, the other "
            f"{selected.num_documents - selected.val_docs:,} train (no shuffle, no de-duplication)"
        )
        input_record = {
            "sources": [str(selected.path)],
            "documents": selected.num_documents,
            "text_bytes": None,  # counted while encoding
            "files_read": 1,
            "files_skipped": 0,
            "skipped_files": [],
            "jsonl_lines_skipped": 0,
            "empty_documents_skipped": 0,  # kept: each line is a document of the export
            "duplicate_documents_removed": 0,
            "docs_selected": {
                "sha256": selected.sha256,
                "sha256_checked": selected.sha256_checked,
                "sidecar": str(selected.sidecar_path) if selected.sidecar_path else None,
                "docs_val": selected.val_docs,
                "sidecar_fields": selected.sidecar,
            },
        }
    else:
        if documents is None and not inputs:
            log("collect: reading the documentation of this Python (stdlib docstrings, pydoc topics) ...")
            collected = CollectedText(documents=python_documentation())
            collected.sources = [
                f"python-documentation: Python {sys.version.split()[0]} standard-library docstrings "
                f"(>= {MIN_DOCSTRING_CHARS} characters, tests excluded) and pydoc topics"
            ]
        else:
            collected = collect_documents(inputs, warn)
            if documents is not None:
                collected.sources.insert(0, f"{len(documents)} in-memory documents")
                for document in documents:
                    add_document(document, collected)
        unique_documents = remove_duplicates(collected.documents)
        duplicates = len(collected.documents) - len(unique_documents)
        text_bytes = sum(len(utf8_bytes(document)) for document in unique_documents)
        if not unique_documents:
            skipped = f", {len(collected.files_skipped)} file(s) skipped" if collected.files_skipped else ""
            raise CorpusError(f"no text found in the inputs ({collected.files_read} file(s) read{skipped})")
        log(
            f"collect: {len(unique_documents):,} documents, {format_size(text_bytes)} text"
            + (f" ({duplicates:,} exact duplicates removed)" if duplicates else "")
            + (f", {len(collected.files_skipped)} file(s) skipped" if collected.files_skipped else "")
        )
        val_documents, train_documents = split_documents(unique_documents, seed, val_fraction, val_docs)
        split_sources = {"train": lambda: train_documents, "val": lambda: val_documents}
        log(f"split: seed {seed}: {len(train_documents):,} train, {len(val_documents):,} val documents")
        input_record = {
            "sources": collected.sources,
            "documents": len(unique_documents),
            "text_bytes": text_bytes,
            "files_read": collected.files_read,
            "files_skipped": len(collected.files_skipped),
            "skipped_files": collected.files_skipped,
            "jsonl_lines_skipped": collected.jsonl_lines_skipped,
            "empty_documents_skipped": collected.empty_documents_skipped,
            "duplicate_documents_removed": duplicates,
        }

    # --- output folders: fail now, before training, if they cannot be written ---
    dataset_dir = output_root / "datasets" / name
    tokenizer_dir = output_root / "tokenizers"
    ensure_writable_folder(dataset_dir)
    ensure_writable_folder(tokenizer_dir)
    manifest_path = dataset_dir / "manifest.json"
    # The byte descriptor has one fixed name: it is the same file for every byte260 build.
    tokenizer_path = tokenizer_dir / (BYTE_TOKENIZER_FILE if byte_level else f"{name}_bpe.model")

    # --- tokenizer, in memory: if it fails, an earlier build of this name stays as it was ---
    if byte_level:
        built_tokenizer = byte_tokenizer(log)
    elif tokenizer is not None:
        built_tokenizer = reuse_tokenizer(Path(tokenizer), log)
        if vocab_size is not None and vocab_size != built_tokenizer.vocab_size:
            warn(f"--vocab-size {vocab_size} ignored: the tokenizer has {built_tokenizer.vocab_size} pieces")
    else:
        built_tokenizer = train_tokenizer(split_sources["train"](), vocab_size, log)

    # --- write: from here on a build that stops half way must not look complete (make demo
    # checks for the manifest), so the old manifest goes first and the new one comes last ---
    manifest_path.unlink(missing_ok=True)
    write_atomically(tokenizer_path, [built_tokenizer.model_bytes])
    if built_tokenizer.vocab_bytes is not None:
        write_atomically(tokenizer_path.with_suffix(".vocab"), [built_tokenizer.vocab_bytes])
    log(f"tokenizer: wrote {display_path(tokenizer_path)}")

    # --- encode and write ---
    splits = {}
    written: list[Path] = []
    for split in ("train", "val"):
        writer = ShardWriter(dataset_dir, split, shard_tokens, log)
        split_documents_count, split_text_bytes = encode_split(built_tokenizer, split_sources[split](), writer, log)
        written.extend(writer.written)
        splits[split] = {
            "documents": split_documents_count,
            "tokens": writer.total_tokens,
            "text_bytes": split_text_bytes,
            "shards": [path.name for path in writer.written],
        }
    remove_stale_shards(dataset_dir, written, log)
    if input_record["text_bytes"] is None:
        input_record["text_bytes"] = splits["train"]["text_bytes"] + splits["val"]["text_bytes"]

    tokenizer_record: dict[str, object] = {"path": f"tokenizers/{tokenizer_path.name}"}  # relative to the output root
    if built_tokenizer.vocab_bytes is not None:
        tokenizer_record["vocab_path"] = f"tokenizers/{tokenizer_path.with_suffix('.vocab').name}"
    tokenizer_record.update({
        "sha256": hashlib.sha256(built_tokenizer.model_bytes).hexdigest(),
        "kind": built_tokenizer.kind,
        "vocab_size": built_tokenizer.vocab_size,
        **built_tokenizer.details,
    })
    export_order = bool(selected_inputs)
    manifest = {
        "name": name,
        "created_by": "data/build_local_corpus.py",
        "format": {
            "header": f"{SHARD_HEADER_INTS} little-endian int32: magic, version, token count, zeros",
            "magic": SHARD_MAGIC,
            "version": SHARD_VERSION,
            "token_dtype": "uint16 little-endian",
            "bos_id": BOS_ID,
            "documents_start_with_bos": True,
            "eos_appended": False,
        },
        "inputs": input_record,
        "splits": splits,  # token counts include one BOS per document
        "tokenizer": tokenizer_record,
        "settings": {
            "split": "export order: the first val_docs documents" if export_order else "seeded shuffle",
            "seed": None if export_order else seed,
            "val_fraction": None if export_order or val_docs is not None else val_fraction,
            "val_docs": splits["val"]["documents"] if export_order else val_docs,
            "shard_tokens": shard_tokens,
            "vocab_size": built_tokenizer.vocab_size,
        },
    }
    write_atomically(manifest_path, [(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")])

    log(f"done in {time.perf_counter() - started:.1f} s: {display_path(dataset_dir)}")
    for split in ("train", "val"):
        counts = splits[split]
        log(
            f"  {split:<5} {counts['documents']:>9,} documents {counts['tokens']:>12,} tokens "
            f"in {len(counts['shards'])} shard(s): {display_path(dataset_dir)}/fineweb_{split}_*.bin"
        )
    log(f"  tokenizer {display_path(tokenizer_path)} ({built_tokenizer.kind}, vocab {built_tokenizer.vocab_size})")
    log(f"  manifest  {display_path(manifest_path)}")
    log(
        f"train with: DATA_PATH={display_path(dataset_dir)} TOKENIZER_PATH={display_path(tokenizer_path)} "
        f"VOCAB_SIZE={built_tokenizer.vocab_size} python3 train_gpt_jepa.py"
    )
    return manifest


# =============================================================================
# COMMAND LINE
# =============================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build a Parameter Golf dataset (tokenizer + challenge shards) from local text, offline.",
        epilog="With no INPUT the corpus is the documentation inside this Python. See data/README.md.",
    )
    parser.add_argument(
        "inputs", nargs="*", type=Path, metavar="INPUT",
        help=".txt/.md/.rst files (one document each), folders (recursive), JSONL files with a \"text\" field",
    )
    parser.add_argument(
        "--name", default=None,
        help=f"dataset name (default: {DEFAULT_NAME}, or {DEFAULT_BYTE_NAME} with --tokenizer {BYTE_TOKENIZER_NAME})",
    )
    parser.add_argument(
        "--output-root", type=Path, default=DEFAULT_OUTPUT_ROOT,
        help="folder that receives datasets/<name>/ and tokenizers/ (default: this script's folder, data/)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=None,
        help=f"BPE vocab size to train (default: {DEFAULT_VOCAB_SIZE}; with --tokenizer, the model's)",
    )
    parser.add_argument(
        "--tokenizer", default=None, metavar="PATH|byte260",
        help="reuse this SentencePiece .model (e.g. fineweb_1024_bpe.model) instead of training one, or "
        f"{BYTE_TOKENIZER_NAME}: the challenge's byte-level tokenizer (UTF-8 bytes, vocab {BYTE_VOCAB_SIZE})",
    )
    val_group = parser.add_mutually_exclusive_group()
    val_group.add_argument(
        "--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
        help="fraction of the shuffled documents that form val (default: %(default)s)",
    )
    val_group.add_argument(
        "--val-docs", type=int, default=None,
        help=f"number of documents that form val (for {DOCS_SELECTED_FILE}: its sidecar's docs_val by default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default: %(default)s)")
    parser.add_argument(
        "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
        help="tokens per shard file (default: %(default)s, the challenge's size)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        build_corpus(
            documents=None,
            inputs=args.inputs,
            name=args.name,
            output_root=args.output_root,
            vocab_size=args.vocab_size,
            tokenizer=args.tokenizer,
            val_fraction=args.val_fraction,
            val_docs=args.val_docs,
            seed=args.seed,
            shard_tokens=args.shard_tokens,
        )
    except CorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the disk filled up while writing shards
        target = f" {err.filename}" if err.filename else ""
        print(f"error: cannot write{target}: {err.strerror or err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
