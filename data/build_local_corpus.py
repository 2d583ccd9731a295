"""
build_local_corpus.py: turn local text into a Parameter Golf dataset, with no network.

The challenge trains on FineWeb shards tokenised with an sp1024 SentencePiece model
(data/cached_challenge_fineweb.py downloads them). This script writes the same format from
text you have on disk, so the trainer, its tests and the demo run anywhere:

    python3 data/build_local_corpus.py                      # Python's own documentation
    python3 data/build_local_corpus.py notes/ books.jsonl   # your text
    python3 data/build_local_corpus.py corpus/ --tokenizer data/tokenizers/fineweb_1024_bpe.model

Inputs are any mix of .txt/.md/.rst files, folders (searched recursively for those and for
.jsonl) and JSONL files whose lines carry a "text" field: one document per file or per JSONL
line. With no input the corpus is the documentation shipped inside the running Python (the
docstrings of its standard library and the pydoc topics): the same Python gives
byte-identical output.

Output (see data/README.md):
    <output-root>/datasets/<name>/fineweb_{train,val}_NNNNNN.bin   challenge shards
    <output-root>/datasets/<name>/manifest.json                    counts, inputs, settings
    <output-root>/tokenizers/<name>_bpe.model (+ .vocab)           the SentencePiece model

The functions build_corpus(), python_documentation() and read_shard() are importable, so
tests can build small datasets in-process.
"""

import argparse
import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm

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


def current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it and restore it
    os.umask(mask)
    return mask


def write_atomic(path: Path, chunks: list[bytes | np.ndarray]) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as temp_file:
            for chunk in chunks:
                temp_file.write(chunk.tobytes() if isinstance(chunk, np.ndarray) else chunk)
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        os.chmod(temp_name, 0o666 & ~current_umask())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


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
        write_atomic(path, [shard_header(self.pending_tokens), *self.pending])
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
    for line in text.splitlines():
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
    return sorted(documents, key=lambda text: hashlib.sha256(seed_prefix + text.encode("utf-8")).digest())


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
# TOKENIZER: train a SentencePiece BPE model, or reuse an existing one
# =============================================================================


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vocab_text(processor: spm.SentencePieceProcessor) -> str:
    """The .vocab file SentencePiece writes beside a model: piece, tab, score, one per line."""
    return "".join(
        f"{processor.id_to_piece(token_id)}\t{processor.get_score(token_id):g}\n"
        for token_id in range(processor.vocab_size())
    )


def training_sentences(documents: list[str]) -> list[str]:
    """SentencePiece reads one sentence per line: feed it the non-empty lines, up to the cap."""
    sentences = []
    total_chars = 0
    for document in documents:
        for line in document.split("\n"):
            if line.strip():
                sentences.append(line)
                total_chars += len(line)
        if total_chars >= TOKENIZER_MAX_TRAINING_CHARS:
            break
    return sentences


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

    processor: spm.SentencePieceProcessor
    model_bytes: bytes
    vocab_bytes: bytes
    details: dict[str, object]


def train_tokenizer(train_documents: list[str], vocab_size: int, log: Log) -> Tokenizer:
    """Train BPE with the challenge's settings on the train split's lines."""
    sentences = training_sentences(train_documents)
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
        raise CorpusError(explain_trainer_error(str(err), vocab_size, text_chars, len(train_documents))) from None
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


def encode_split(
    processor: spm.SentencePieceProcessor, documents: list[str], writer: ShardWriter, log: Log
) -> int:
    """Encode documents in batches, each as [BOS] + ids, and stream them into the writer."""
    vocab_size = processor.vocab_size()
    text_bytes = 0
    for start in range(0, len(documents), ENCODE_BATCH_DOCUMENTS):
        batch = documents[start : start + ENCODE_BATCH_DOCUMENTS]
        text_bytes += sum(len(document.encode("utf-8")) for document in batch)
        encoded = processor.encode(batch, out_type=int)
        pieces = []
        for ids in encoded:
            pieces.append(np.array([BOS_ID], dtype=np.int64))
            pieces.append(np.asarray(ids, dtype=np.int64))
        writer.add(to_uint16_tokens(np.concatenate(pieces), vocab_size))
    writer.flush()
    tokens = writer.total_tokens
    log(
        f"encode: {writer.split} {len(documents):,} documents -> {tokens:,} tokens "
        f"({tokens / len(documents):.1f} tokens/document, {text_bytes / tokens:.2f} text bytes/token)"
    )
    return text_bytes


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
    name: str = DEFAULT_NAME,
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
    from python_documentation(). `tokenizer` reuses an existing model (vocab_size is then
    the model's); otherwise a BPE model of `vocab_size` (default 1024) is trained on the
    train split.
    Raises CorpusError for problems the user can fix.
    """
    started = time.perf_counter()
    if not DATASET_NAME_PATTERN.match(name):
        raise CorpusError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    if shard_tokens < 1:
        raise CorpusError(f"--shard-tokens {shard_tokens}: must be at least 1")
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"--val-fraction {val_fraction}: must be between 0 and 1 (exclusive)")
    if tokenizer is None and vocab_size is None:
        vocab_size = DEFAULT_VOCAB_SIZE
    if tokenizer is None and not 4 + 256 < vocab_size <= UINT16_LIMIT:
        raise CorpusError(
            f"--vocab-size {vocab_size}: must be above 260 (4 special + 256 byte-fallback pieces) "
            f"and at most {UINT16_LIMIT:,} (uint16 shards)"
        )
    output_root = Path(output_root)
    inputs = [Path(p) for p in (inputs or [])]

    # --- collect ---
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
    text_bytes = sum(len(document.encode("utf-8")) for document in unique_documents)
    if not unique_documents:
        skipped = f", {len(collected.files_skipped)} file(s) skipped" if collected.files_skipped else ""
        raise CorpusError(f"no text found in the inputs ({collected.files_read} file(s) read{skipped})")
    log(
        f"collect: {len(unique_documents):,} documents, {format_size(text_bytes)} text"
        + (f" ({duplicates:,} exact duplicates removed)" if duplicates else "")
        + (f", {len(collected.files_skipped)} file(s) skipped" if collected.files_skipped else "")
    )

    # --- split ---
    val_documents, train_documents = split_documents(unique_documents, seed, val_fraction, val_docs)
    log(f"split: seed {seed}: {len(train_documents):,} train, {len(val_documents):,} val documents")

    # --- output folders: fail now, before training, if they cannot be written ---
    dataset_dir = output_root / "datasets" / name
    tokenizer_dir = output_root / "tokenizers"
    ensure_writable_folder(dataset_dir)
    ensure_writable_folder(tokenizer_dir)
    manifest_path = dataset_dir / "manifest.json"
    model_path = tokenizer_dir / f"{name}_bpe.model"

    # --- tokenizer, in memory: if it fails, an earlier build of this name stays as it was ---
    if tokenizer is not None:
        built_tokenizer = reuse_tokenizer(Path(tokenizer), log)
        if vocab_size is not None and vocab_size != built_tokenizer.processor.vocab_size():
            pieces = built_tokenizer.processor.vocab_size()
            warn(f"--vocab-size {vocab_size} ignored: the tokenizer has {pieces} pieces")
    else:
        built_tokenizer = train_tokenizer(train_documents, vocab_size, log)
    processor = built_tokenizer.processor

    # --- write: from here on a build that stops half way must not look complete (make demo
    # checks for the manifest), so the old manifest goes first and the new one comes last ---
    manifest_path.unlink(missing_ok=True)
    write_atomic(model_path, [built_tokenizer.model_bytes])
    write_atomic(model_path.with_suffix(".vocab"), [built_tokenizer.vocab_bytes])
    log(f"tokenizer: wrote {display_path(model_path)}")

    # --- encode and write ---
    splits = {}
    written: list[Path] = []
    for split, documents_of_split in (("train", train_documents), ("val", val_documents)):
        writer = ShardWriter(dataset_dir, split, shard_tokens, log)
        split_text_bytes = encode_split(processor, documents_of_split, writer, log)
        written.extend(writer.written)
        splits[split] = {
            "documents": len(documents_of_split),
            "tokens": writer.total_tokens,
            "text_bytes": split_text_bytes,
            "shards": [path.name for path in writer.written],
        }
    remove_stale_shards(dataset_dir, written, log)

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
        "inputs": {
            "sources": collected.sources,
            "documents": len(unique_documents),
            "text_bytes": text_bytes,
            "files_read": collected.files_read,
            "files_skipped": len(collected.files_skipped),
            "skipped_files": collected.files_skipped,
            "jsonl_lines_skipped": collected.jsonl_lines_skipped,
            "empty_documents_skipped": collected.empty_documents_skipped,
            "duplicate_documents_removed": duplicates,
        },
        "splits": splits,  # token counts include one BOS per document
        "tokenizer": {
            "path": f"tokenizers/{model_path.name}",  # relative to the output root
            "vocab_path": f"tokenizers/{model_path.with_suffix('.vocab').name}",
            "sha256": hashlib.sha256(built_tokenizer.model_bytes).hexdigest(),
            "vocab_size": processor.vocab_size(),
            **built_tokenizer.details,
        },
        "settings": {
            "seed": seed,
            "val_fraction": None if val_docs is not None else val_fraction,
            "val_docs": val_docs,
            "shard_tokens": shard_tokens,
            "vocab_size": processor.vocab_size(),
        },
    }
    write_atomic(manifest_path, [(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")])

    log(f"done in {time.perf_counter() - started:.1f} s: {display_path(dataset_dir)}")
    for split in ("train", "val"):
        counts = splits[split]
        log(
            f"  {split:<5} {counts['documents']:>9,} documents {counts['tokens']:>12,} tokens "
            f"in {len(counts['shards'])} shard(s): {display_path(dataset_dir)}/fineweb_{split}_*.bin"
        )
    log(f"  tokenizer {display_path(model_path)} (vocab {processor.vocab_size()})")
    log(f"  manifest  {display_path(manifest_path)}")
    log(
        f"train with: DATA_PATH={display_path(dataset_dir)} TOKENIZER_PATH={display_path(model_path)} "
        f"VOCAB_SIZE={processor.vocab_size()} python3 train_gpt_jepa.py"
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
    parser.add_argument("--name", default=DEFAULT_NAME, help="dataset name (default: %(default)s)")
    parser.add_argument(
        "--output-root", type=Path, default=DEFAULT_OUTPUT_ROOT,
        help="folder that receives datasets/<name>/ and tokenizers/ (default: this script's folder, data/)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=None,
        help=f"BPE vocab size to train (default: {DEFAULT_VOCAB_SIZE}; with --tokenizer, the model's)",
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=None,
        help="reuse this SentencePiece .model (e.g. fineweb_1024_bpe.model) instead of training one",
    )
    val_group = parser.add_mutually_exclusive_group()
    val_group.add_argument(
        "--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
        help="fraction of the shuffled documents that form val (default: %(default)s)",
    )
    val_group.add_argument("--val-docs", type=int, default=None, help="number of documents that form val")
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
