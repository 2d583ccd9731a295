"""Validate a Parameter Golf record folder: ours (written by scripts/make_record.py) or any of the
challenge's own (records/track_10min_16mb/..., records/track_non_record_16mb/...).

    python3 scripts/check_record.py records/tiny_vanilla
    python3 scripts/check_record.py FOLDER --reference-bpb 1.0810
    python3 scripts/check_record.py FOLDER --reference-bpb 1.0810 --reference-loss 2.7902

The challenge's rules (its README): all counted code lives in train_gpt.py, which must compile and
run inside the folder; the artifact is the code bytes (the size of train_gpt.py) plus the
compressed model bytes, at most 16,000,000 (decimal); the folder holds README.md, submission.json,
the train logs the script produced, and enough seeds to show at p < 0.01 an improvement of at
least 0.005 nats over the current record. One line per check, PASS / FAIL / SKIP (cannot verify):

1. files: README.md, submission.json (valid JSON), train_gpt.py, at least one train log
   (train_seed<N>.log, train.log, logs/*.txt, ...); requirements.txt optional.
2. code: train_gpt.py compiles; a compressed self-extracting wrapper (exec(lzma.decompress(
   base64.b85decode("...")))) or TRAINER_SOURCE = ... forms, zlib/base64 variants) is decoded
   statically from its syntax tree, and the decoded source must compile too. Nothing is executed.
3. size, one line per log: the model bytes the log printed plus the size of the folder's
   train_gpt.py <= 16,000,000 (the log's own code count is shown when it differs); submission.json's
   bytes_total / bytes_code / artifact_bytes against those figures.
4. score, one line per log: its final roundtrip line (and its TTT line when TTT ran), and the
   per-seed val_bpb / val_loss of submission.json against it (submission.json's score_line names
   the line; without it: TTT, then sliding, then roundtrip, whichever matches).
5. seeds distinct (submission.json and logs), one code across the logs (sha256 of the source each
   log opens with, settings minus seed and paths), mean and std recomputed from the per-seed figures.
6. with --reference-bpb / --reference-loss: the challenge's rule, a one-sided one-sample t test
   that the improvement over the reference is at least 0.005 nats at p < 0.01.

Figures agree when they differ by at most half a unit in the last printed digit of the coarser one
(1.0728 against 1.07280123: 5e-5). Exit status: 0 every check passed (SKIP lines do not fail),
1 a check failed, 2 a usage error (one line).
"""

from __future__ import annotations

import argparse
import ast
import base64
import bz2
import decimal
import gzip
import hashlib
import json
import lzma
import math
import re
import statistics
import sys
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUDGET_BYTES = 16_000_000  # decimal: the challenge's cap on code + compressed model
CHALLENGE_EFFECT_NATS = 0.005  # a record must beat the current one by at least this much
SIGNIFICANCE_LEVEL = 0.01  # ... shown at p < 0.01, one-sided
CODE_NAME = "train_gpt.py"
SEPARATOR = "=" * 100  # the trainer's source ends here in the logs that open with it
MAX_WRAPPER_DEPTH = 3  # a wrapper whose payload is again a wrapper, at most this deep
FLOAT_SLACK = 1e-9  # on top of the printed-digit tolerance: binary floats of decimal figures

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


# -----------------------------------------------------------------------------
# Report: one line per check
# -----------------------------------------------------------------------------

@dataclass
class Check:
    status: str  # PASS | FAIL | SKIP
    name: str
    message: str


class Report:
    """Collects the check lines and prints each as it comes, so a long run shows progress."""

    def __init__(self, echo: bool = True) -> None:
        self.checks: list[Check] = []
        self.echo = echo

    def add(self, status: str, name: str, message: str) -> None:
        check = Check(status, name, message)
        self.checks.append(check)
        if self.echo:
            suffix = "cannot verify: " if status == SKIP and not message.startswith("cannot verify") else ""
            print(f"{status} {name}: {suffix}{message}", flush=True)

    def count(self, status: str) -> int:
        return sum(1 for check in self.checks if check.status == status)

    def summary(self) -> str:
        return (f"check_record: {self.count(PASS)} passed, {self.count(FAIL)} failed, "
                f"{self.count(SKIP)} cannot verify")

    def exit_code(self) -> int:
        return 1 if self.count(FAIL) else 0


# -----------------------------------------------------------------------------
# Printed figures: tolerance from the digits that were printed
# -----------------------------------------------------------------------------

class PrintedFloat(float):
    """A float parsed from JSON or a log that remembers its text, hence its printed decimals."""

    text: str

    def __new__(cls, text: str) -> PrintedFloat:
        value = super().__new__(cls, text)
        value.text = text
        return value

    def __repr__(self) -> str:  # 0.00090 stays 0.00090 in messages
        return self.text

    __str__ = __repr__


def decimals_of(value: float | int) -> int:
    """Digits after the decimal point as printed (1.0728 -> 4, 1e-08 -> 8, 2 -> 0)."""
    text = value.text if isinstance(value, PrintedFloat) else repr(value)
    try:
        exponent = decimal.Decimal(text).as_tuple().exponent
    except decimal.InvalidOperation:
        return 17
    return max(0, -exponent) if isinstance(exponent, int) else 17


def figures_agree(first: float, second: float) -> bool:
    """Equal up to rounding of the coarser printed figure (half a unit in its last digit)."""
    tolerance = 0.5 * 10.0 ** -min(decimals_of(first), decimals_of(second))
    return abs(first - second) <= tolerance + FLOAT_SLACK * max(1.0, abs(first))


def as_number(value: Any) -> float | None:
    """A JSON figure as a float (bools and strings are not figures)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def format_bytes(count: int) -> str:
    return f"{count:,}"


def seed_key(value: Any) -> int | str:
    """Seeds as ints where they are numbers ("42" and 42 are one seed)."""
    try:
        return int(str(value).strip())
    except ValueError:
        return str(value)


# -----------------------------------------------------------------------------
# Train logs: what each one printed
# -----------------------------------------------------------------------------

# Some launchers prefix every line with epoch seconds ("1776143508.229 quantized_ttt_phased ...").
TIMESTAMP_PREFIX = re.compile(r"^\d{9,}(?:\.\d+)?\s+")
# "final_int6_brotli_roundtrip_exact val_loss:X val_bpb:Y", "final_sliding_window_eval_exact stride:64
# val_loss:X val_bpb:Y", "ttt_sliding:done val_loss=X val_bpb=Y", "diagnostic quantized val_loss:X ...".
RESULT_LINE = re.compile(
    r"^(?P<label>[A-Za-z][\w.\-]*(?:[ :][A-Za-z][\w.\-]*)*)"
    r"(?:\s+\w+[:=]\S+)*?"
    r"\s+(?:sliding\s+)?val_loss[:=](?P<loss>\d+(?:\.\d+)?)"
    r"\s+(?:sliding\s+)?val_bpb[:=](?P<bpb>\d+(?:\.\d+)?)(?P<tail>.*)$")
# The labelled line is the compressed artifact; a bare "Serialized model: N bytes" is the raw float file.
MODEL_BYTES_LINE = re.compile(r"^Serialized model (?P<label>[^:\s][^:]*): (?P<bytes>\d+) bytes")
MODEL_BYTES_ALTERNATIVE = re.compile(r"^(?P<label>\S+\+\S+) model: (?P<bytes>\d+) bytes")  # "INT7+zlib model: N bytes"
CODE_SIZE_LINE = re.compile(r"^Code size(?: \((?P<kind>[^)]*)\))?: (?P<bytes>\d+) bytes")
TOTAL_SIZE_LINE = re.compile(r"^Total submission size(?: (?P<label>[^:]+))?: (?P<bytes>\d+) bytes")
CONFIG_SEED = re.compile(r"^\s+SEED=(\d+)\s*$")  # our resolved configuration block
ANY_SEED = re.compile(r"(?<![\w.])seed(?::\s?|=)(\d+)(?![\w.])", re.IGNORECASE)  # seed:42, seed: 42, seed=42
NAME_SEED = re.compile(r"seed[_-]?(\d+)", re.IGNORECASE)  # train_seed42.log, train_seed_42.txt, seed-42
NAME_TRAILING_NUMBER = re.compile(r"[_-](\d+)\.(?:log|txt)$")  # ternary_log_42.txt
# A line that shows test-time training ran: "ttt:start", "ttt_sliding:start", "tttg: c1/..", "legal_ttt ...".
TTT_ACTIVITY = re.compile(r"^(?:[a-z]+_)?ttt[a-z_]*(?::|\s)")
SETTINGS_HEADERS = ("resolved configuration:", "Hyperparameters:")
SETTING_LINE = re.compile(r"^  (?P<name>\w+)(?:=|: ?)(?P<value>.*)$")
# Settings that legitimately differ between the seeds of one submission.
RUN_SPECIFIC_SETTING = re.compile(r"^(seed|run_id|resume|rank|local_rank|world_rank|eval_only)$|path|dir$|_dir|file",
                                  re.IGNORECASE)
# Result lines of the float model, not of the artifact: never a score.
NOT_A_SCORE = ("pre-quant", "pre_quant", "prequant", "post-ema", "post_ema", "pre_ttt", "pre-ttt")
KIND_PREFERENCE = ("ttt", "sliding", "roundtrip")  # which line is the score when nothing names it
LOG_FIGURE = re.compile(rb"val_(?:bpb|loss)[:=]\s?\d")  # a log prints val_bpb:1.23; a JSON summary "val_bpb": 1.23


@dataclass
class ResultLine:
    label: str  # final_int6_brotli_roundtrip_exact
    kind: str  # ttt | sliding | roundtrip
    val_loss: float
    val_bpb: float


@dataclass
class LogFacts:
    name: str  # relative to the folder
    text_seed: int | None = None
    name_seed: int | None = None
    model_bytes: int | None = None
    model_label: str = ""
    code_sizes: dict[str, int] = field(default_factory=dict)  # "" | "compressed" | "uncompressed" -> bytes
    logged_total: int | None = None
    results: list[ResultLine] = field(default_factory=list)
    ttt_ran: bool = False
    source_sha256: str | None = None
    settings: dict[str, str] | None = None
    read_error: str | None = None

    @property
    def seed(self) -> int | None:
        return self.text_seed if self.text_seed is not None else self.name_seed

    def preferred_results(self) -> list[ResultLine]:
        """Score candidates best first: TTT, sliding, roundtrip; within a kind the most precise, last printed."""
        ranked = []
        for index, result in enumerate(self.results):
            rank = KIND_PREFERENCE.index(result.kind)
            ranked.append((rank, -decimals_of(result.val_bpb), -index, result))
        return [entry[-1] for entry in sorted(ranked, key=lambda entry: entry[:3])]


def result_kind(label: str, tail: str = "") -> str | None:
    """ttt / sliding / roundtrip, or None for a line that is not a final score. The tail after the
    figures counts for TTT ("final_int8_zlib_roundtrip ... eval_mode:online_ttt")."""
    lowered = label.lower()
    if any(marker in lowered for marker in NOT_A_SCORE):
        return None
    if "ttt" in lowered or "ttt" in tail.lower():
        return "ttt"
    if "sliding" in lowered:
        return "sliding"
    if "roundtrip" in lowered or "quantized" in lowered or lowered.startswith("final"):
        return "roundtrip"
    return None


def split_source(text: str) -> tuple[str | None, str]:
    """(the trainer's source the log opens with, or None; the rest of the log). The source is
    what precedes the first separator line, when it parses as Python."""
    position = text.find("\n" + SEPARATOR + "\n")
    if position < 0 or not text[:position].strip():
        return None, text
    candidate = text[:position + 1]
    try:
        ast.parse(candidate)
    except (SyntaxError, ValueError):
        return None, text
    return candidate, text[position + len(SEPARATOR) + 2:]


def parse_settings(lines: Sequence[str]) -> dict[str, str] | None:
    """The "  NAME=value" block after "resolved configuration:" (ours) or "  key: value" after
    "Hyperparameters:" (the challenge's recent trainers)."""
    for index, line in enumerate(lines):
        if line.strip() not in SETTINGS_HEADERS:
            continue
        settings: dict[str, str] = {}
        for setting_line in lines[index + 1:]:
            match = SETTING_LINE.match(setting_line)
            if not match:
                break
            settings[match["name"]] = match["value"].strip()
        return settings or None
    return None


def read_log(folder: Path, path: Path) -> LogFacts:
    facts = LogFacts(name=path.relative_to(folder).as_posix())
    name_match = NAME_SEED.search(path.name) or NAME_TRAILING_NUMBER.search(path.name)
    facts.name_seed = int(name_match.group(1)) if name_match else None
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as error:
        facts.read_error = f"{type(error).__name__}: {error}"
        return facts
    source, run_text = split_source(text)
    if source is not None:
        facts.source_sha256 = hashlib.sha256(source.encode("utf-8")).hexdigest()
    lines = [TIMESTAMP_PREFIX.sub("", line) for line in run_text.splitlines()]
    facts.settings = parse_settings(lines)
    parse_run_lines(facts, lines)
    return facts


def parse_run_lines(facts: LogFacts, lines: Iterable[str]) -> None:
    """Seeds, sizes, result lines and TTT activity from the part of a log after its source."""
    config_seed, seen_seeds = None, []
    for line in lines:
        if config_seed is None and (match := CONFIG_SEED.match(line)):
            config_seed = int(match.group(1))
        for match in ANY_SEED.finditer(line):
            if int(match.group(1)) not in seen_seeds:
                seen_seeds.append(int(match.group(1)))
        if match := MODEL_BYTES_LINE.match(line) or MODEL_BYTES_ALTERNATIVE.match(line):
            facts.model_bytes, facts.model_label = int(match["bytes"]), match["label"].strip()
        elif match := CODE_SIZE_LINE.match(line):
            facts.code_sizes[(match["kind"] or "").strip()] = int(match["bytes"])
        elif match := TOTAL_SIZE_LINE.match(line):
            if match["label"] or facts.logged_total is None:  # the labelled total is the compressed one
                facts.logged_total = int(match["bytes"])
        if TTT_ACTIVITY.match(line):
            facts.ttt_ran = True
        if (match := RESULT_LINE.match(line)) and (kind := result_kind(match["label"], match["tail"])):
            facts.results.append(ResultLine(match["label"].strip(), kind, PrintedFloat(match["loss"]),
                                            PrintedFloat(match["bpb"])))
    facts.text_seed = config_seed if config_seed is not None else (seen_seeds[0] if seen_seeds else None)
    if facts.settings and facts.settings.get("TTT", facts.settings.get("ttt_enabled", "0")) in ("1", "True", "true"):
        facts.ttt_ran = True
    if facts.model_bytes is None and facts.logged_total is not None and len(set(facts.code_sizes.values())) == 1:
        # Only a total was printed: the model is the total less the one code figure.
        facts.model_bytes = facts.logged_total - next(iter(facts.code_sizes.values()))
        facts.model_label = "total less code"


def find_logs(folder: Path) -> list[Path]:
    """Train logs: *.log and *.txt (requirements*.txt excepted) that carry a val_loss or val_bpb
    figure, at the top first, then one level down (logs/, logs_experiment/, a folder of eval-only
    re-runs), each level sorted by name."""
    candidates: list[Path] = []
    directories = [folder] + sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))
    for directory in directories:
        try:
            entries = sorted(directory.iterdir())
        except OSError:
            continue  # an unreadable subfolder holds no log we could check
        candidates += [path for path in entries if path.is_file() and path.suffix in (".log", ".txt")
                       and not path.name.lower().startswith("requirements")]
    logs = []
    for path in candidates:
        try:
            head = path.read_bytes()
        except OSError:
            logs.append(path)  # reported as unreadable by read_log
            continue
        if LOG_FIGURE.search(head):
            logs.append(path)
    return logs


# -----------------------------------------------------------------------------
# submission.json: the per-seed claims, whatever the schema
# -----------------------------------------------------------------------------

@dataclass
class SeedClaim:
    seed: int | str
    val_bpb: float | None = None
    val_loss: float | None = None
    artifact_bytes: int | None = None


def seed_claims(submission: dict[str, Any]) -> tuple[list[SeedClaim], list[int | str]]:
    """(per-seed figures, every seed listed anywhere in order, duplicates kept). Schemas seen:
    seed_results keyed by seed or a list of {"seed": ...}; seeds keyed by seed with figures;
    seeds as a list beside seed_scores (val_bpb); seeds alone."""
    results = submission.get("seed_results")
    seeds_field = submission.get("seeds")
    entries: list[tuple[Any, Any]] = []
    if isinstance(results, dict):
        entries = list(results.items())
    elif isinstance(results, list):
        entries = [(item.get("seed"), item) for item in results if isinstance(item, dict)]
    elif isinstance(seeds_field, dict):
        entries = list(seeds_field.items())
    elif isinstance(seeds_field, list) and isinstance(submission.get("seed_scores"), list):
        entries = [(seed, {"val_bpb": score}) for seed, score in zip(seeds_field, submission["seed_scores"])]
    claims = []
    for seed, figures in entries:
        figures = figures if isinstance(figures, dict) else {}
        artifact = figures.get("artifact_bytes", figures.get("bytes_total"))
        claims.append(SeedClaim(seed_key(seed), as_number(figures.get("val_bpb")), as_number(figures.get("val_loss")),
                                artifact if isinstance(artifact, int) and not isinstance(artifact, bool) else None))
    listed = [claim.seed for claim in claims]
    if isinstance(seeds_field, list):
        listed_from_field = [seed_key(seed) for seed in seeds_field]
        listed = listed_from_field if len(listed_from_field) >= len(listed) else listed
    return claims, listed


def top_level_figure(submission: dict[str, Any], *names: str) -> tuple[str, float] | None:
    """The first of several names for one figure (val_bpb / mean_bpb, val_bpb_std / std_bpb, ...)."""
    for name in names:
        value = as_number(submission.get(name))
        if value is not None:
            return name, value
    return None


# -----------------------------------------------------------------------------
# train_gpt.py: static decoding of compressed self-extracting wrappers
# -----------------------------------------------------------------------------

# (module, function) -> (what it does, the function). Decoding runs only these, on the literal.
DECODERS: dict[tuple[str, str], tuple[str, Callable[[Any], bytes]]] = {
    ("base64", "b85decode"): ("base85", base64.b85decode),
    ("base64", "b64decode"): ("base64", base64.b64decode),
    ("base64", "standard_b64decode"): ("base64", base64.standard_b64decode),
    ("base64", "urlsafe_b64decode"): ("base64", base64.urlsafe_b64decode),
    ("base64", "a85decode"): ("ascii85", base64.a85decode),
    ("base64", "b32decode"): ("base32", base64.b32decode),
    ("base64", "b16decode"): ("base16", base64.b16decode),
    ("base64", "decodebytes"): ("base64", base64.decodebytes),
    ("lzma", "decompress"): ("lzma", lzma.decompress),
    ("zlib", "decompress"): ("zlib", zlib.decompress),
    ("bz2", "decompress"): ("bz2", bz2.decompress),
    ("gzip", "decompress"): ("gzip", gzip.decompress),
}
UNSUPPORTED_DECOMPRESSORS = ("brotli", "zstandard", "zstd", "lz4")  # not in the standard library
# Modules whose UPPER_CASE constants a decoder's arguments may name (lzma.FORMAT_RAW, lzma.FILTER_LZMA2).
CONSTANT_MODULES = {"lzma": lzma, "zlib": zlib, "bz2": bz2, "gzip": gzip}


class NotALiteral(Exception):
    """The expression does not reduce to a literal through known decoders (an ordinary call)."""


class UnsupportedDecoder(Exception):
    """A decoder outside the standard library (brotli, zstd): the payload cannot be checked here."""


@dataclass
class Decoded:
    source: str
    steps: list[str]  # e.g. ["base85", "lzma"], innermost first


class WrapperReader:
    """Resolves import aliases and reduces decoder calls on literals, without executing anything."""

    def __init__(self, tree: ast.Module) -> None:
        self.module_aliases: dict[str, str] = {}  # L -> lzma
        self.function_aliases: dict[str, tuple[str, str]] = {}  # b85decode -> (base64, b85decode)
        self.literals: dict[str, str | bytes] = {}  # PAYLOAD = "..." at module level
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.module_aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    self.function_aliases[alias.asname or alias.name] = (node.module, alias.name)
        for statement in tree.body:
            if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                    and isinstance(statement.targets[0], ast.Name)
                    and isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, (str, bytes))):
                self.literals[statement.targets[0].id] = statement.value.value

    def function_of(self, call: ast.Call) -> tuple[str, str] | None:
        function = call.func
        if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
            module = self.module_aliases.get(function.value.id)
            return (module, function.attr) if module else None
        if isinstance(function, ast.Name):
            return self.function_aliases.get(function.id)
        return None

    def is_decoder(self, node: ast.AST) -> bool:
        if not isinstance(node, ast.Call):
            return False
        function = self.function_of(node)
        return function is not None and (function in DECODERS or function[0] in UNSUPPORTED_DECOMPRESSORS)

    def reduce(self, node: ast.AST, steps: list[str]) -> str | bytes:
        """The value of a literal, a module-level literal name, or known decoders applied to one."""
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            return node.value
        if isinstance(node, ast.Name) and node.id in self.literals:
            return self.literals[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):  # "..." + "..."
            left, right = self.reduce(node.left, steps), self.reduce(node.right, steps)
            if type(left) is type(right):
                return left + right
        if isinstance(node, ast.Call) and node.args:
            if isinstance(node.func, ast.Attribute) and node.func.attr in ("decode", "encode"):
                value = self.reduce(node.func.value, steps)
                encoding = node.args[0].value if isinstance(node.args[0], ast.Constant) else "utf-8"
                return value.decode(encoding) if isinstance(value, bytes) else value.encode(encoding)
            function = self.function_of(node)
            if function is not None and function[0] in UNSUPPORTED_DECOMPRESSORS:
                raise UnsupportedDecoder(f"{function[0]}.{function[1]} is not in the standard library")
            if function in DECODERS:
                argument = self.reduce(node.args[0], steps)
                extra = [self.constant(value) for value in node.args[1:]]
                options = {keyword.arg: self.constant(keyword.value) for keyword in node.keywords if keyword.arg}
                description, decoder = DECODERS[function]
                steps.append(description)
                data = argument.encode("ascii") if isinstance(argument, str) else argument
                return decoder(data, *extra, **options)
        if isinstance(node, ast.Call) and not node.args and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "decode":  # .decode() with the default codec
            value = self.reduce(node.func.value, steps)
            return value.decode("utf-8") if isinstance(value, bytes) else value
        raise NotALiteral


    def constant(self, node: ast.AST) -> Any:
        """A decoder option: literals, lists, dicts, | of flags and module constants such as
        lzma.FORMAT_RAW (format=L.FORMAT_RAW, filters=[{"id": L.FILTER_LZMA2}])."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.isupper():
            module = CONSTANT_MODULES.get(self.module_aliases.get(node.value.id, ""))
            if module is not None and hasattr(module, node.attr):
                return getattr(module, node.attr)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self.constant(element) for element in node.elts]
        if isinstance(node, ast.Dict) and None not in node.keys:
            return {self.constant(key): self.constant(value) for key, value in zip(node.keys, node.values)}
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self.constant(node.left) | self.constant(node.right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self.constant(node.operand)
        raise NotALiteral


def executes_code(tree: ast.Module) -> bool:
    """The file calls exec(): the mark of a self-extracting wrapper (a plain trainer does not)."""
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "exec"
               for node in ast.walk(tree))


def executes_another_file(tree: ast.Module) -> bool:
    """exec(open(...).read()) and the like: code that lives outside train_gpt.py."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "exec":
            for inner in ast.walk(node):
                if isinstance(inner, ast.Call) and (
                        (isinstance(inner.func, ast.Name) and inner.func.id == "open")
                        or (isinstance(inner.func, ast.Attribute) and inner.func.attr in ("read_text", "read_bytes"))):
                    return True
    return False


def decode_wrapper(tree: ast.Module) -> Decoded | None:
    """The source a wrapper carries, or None when the file is not a wrapper. Raises
    UnsupportedDecoder, or the decoder's own error (binascii.Error, LZMAError, ...) on a corrupt payload."""
    if not executes_code(tree):
        return None
    reader = WrapperReader(tree)
    calls = [node for node in ast.walk(tree) if reader.is_decoder(node)]
    inner = {id(child) for call in calls for argument in call.args for child in ast.walk(argument)}
    best: Decoded | None = None
    for call in calls:
        if id(call) in inner:
            continue  # part of a longer chain, reduced with it
        steps: list[str] = []
        try:
            value = reader.reduce(call, steps)
        except NotALiteral:
            continue
        source = value.decode("utf-8") if isinstance(value, bytes) else value
        if best is None or len(source) > len(best.source):
            best = Decoded(source, steps)
    return best


# -----------------------------------------------------------------------------
# The folder
# -----------------------------------------------------------------------------

@dataclass
class RecordFolder:
    path: Path
    submission: dict[str, Any] | None = None
    submission_name: str | None = None
    submission_error: str | None = None
    code_path: Path | None = None
    code_bytes: int | None = None
    decoded_source: str | None = None
    logs: list[LogFacts] = field(default_factory=list)
    claims: list[SeedClaim] = field(default_factory=list)
    listed_seeds: list[int | str] = field(default_factory=list)


def load_folder(path: Path) -> RecordFolder:
    folder = RecordFolder(path)
    submission_path = path / "submission.json"
    if not submission_path.is_file():
        # The challenge's older folders sometimes name it submission_<variant>.json: read it for
        # the other checks (the files check still fails).
        alternatives = sorted(path.glob("submission*.json"))
        submission_path = alternatives[0] if len(alternatives) == 1 else submission_path
    if submission_path.is_file():
        folder.submission_name = submission_path.name
        try:
            loaded = json.loads(submission_path.read_bytes().decode("utf-8"), parse_float=PrintedFloat)
            if isinstance(loaded, dict):
                folder.submission = loaded
                folder.claims, folder.listed_seeds = seed_claims(loaded)
            else:
                folder.submission_error = f"{submission_path.name} holds a {type(loaded).__name__}, not an object"
        except (OSError, UnicodeDecodeError, ValueError) as error:
            folder.submission_error = f"{submission_path.name} is not valid JSON: {error}"
    code_path = path / CODE_NAME
    if not code_path.is_file():
        alternatives = sorted(path.glob("train_gpt*.py"))
        code_path = alternatives[0] if len(alternatives) == 1 else code_path
    if code_path.is_file():
        folder.code_path = code_path
        try:
            folder.code_bytes = code_path.stat().st_size
        except OSError:
            folder.code_bytes = None
    folder.logs = [read_log(path, log_path) for log_path in find_logs(path)]
    return folder


# -----------------------------------------------------------------------------
# Check 1: files
# -----------------------------------------------------------------------------

def check_files(folder: RecordFolder, report: Report) -> None:
    problems, present = [], []
    # What the folder has instead of a required name (submission_ternary.json, train_gpt_v5.py).
    stand_ins = {"submission.json": folder.submission_name,
                 CODE_NAME: folder.code_path.name if folder.code_path is not None else None}
    for name in ("README.md", "submission.json", CODE_NAME):
        if (folder.path / name).is_file():
            present.append(name)
        else:
            stand_in = stand_ins.get(name)
            problems.append(f"no {name}" + (f" (found {stand_in}, read in its place)" if stand_in else ""))
    if folder.submission_error:
        problems.append(folder.submission_error)
    readable_logs = [log.name for log in folder.logs if log.read_error is None]
    for log in folder.logs:
        if log.read_error:
            problems.append(f"{log.name} unreadable: {log.read_error}")
    if not readable_logs:
        problems.append("no train log (train_seed<N>.log, train.log, logs/*.txt with val_bpb lines)")
    logs_text = f"{len(readable_logs)} log{'s' if len(readable_logs) != 1 else ''}"
    if readable_logs:
        logs_text += " (" + ", ".join(readable_logs[:6]) + (", ..." if len(readable_logs) > 6 else "") + ")"
    requirements = ("requirements.txt" if (folder.path / "requirements.txt").is_file()
                    else "no requirements.txt (optional)")
    if problems:
        report.add(FAIL, "files", "; ".join(problems) + f"; present: {', '.join(present) or 'none'}, {logs_text}")
    else:
        report.add(PASS, "files", f"{', '.join(present)}, {logs_text}, {requirements}")


# -----------------------------------------------------------------------------
# Check 2: train_gpt.py compiles (and so does the source a wrapper carries)
# -----------------------------------------------------------------------------

def local_imports(tree: ast.Module, folder: Path) -> list[str]:
    """Modules train_gpt.py imports that the folder ships beside it (their code is not counted)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return sorted(name for name in names if (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file())


def needs_newer_python(error: Exception) -> bool:
    """A SyntaxError that only an older interpreter raises: Python 3.12 allows quotes and
    backslashes inside f-string fields (PEP 701), which some records' trainers use."""
    return (sys.version_info < (3, 12) and isinstance(error, SyntaxError)
            and "f-string" in str(getattr(error, "msg", "")))


def check_code(folder: RecordFolder, report: Report) -> None:
    if folder.code_path is None:
        report.add(SKIP, "code", f"no {CODE_NAME} to compile")
        return
    name = folder.code_path.name
    try:
        source = folder.code_path.read_bytes().decode("utf-8")
        tree = ast.parse(source, filename=name)
        compile(tree, name, "exec")
    except (OSError, UnicodeDecodeError) as error:
        report.add(FAIL, "code", f"{name} unreadable: {type(error).__name__}: {error}")
        return
    except (SyntaxError, ValueError) as error:
        if needs_newer_python(error):
            report.add(SKIP, "code", f"{name} uses Python 3.12 f-string syntax; this is Python "
                                     f"{sys.version.split()[0]}: {error}")
        else:
            report.add(FAIL, "code", f"{name} does not compile: {type(error).__name__}: {error}")
        return
    notes = []
    if imported := local_imports(tree, folder.path):
        notes.append(f"imports {', '.join(imported)} from the folder (code outside {CODE_NAME})")
    if executes_another_file(tree):
        report.add(FAIL, "code", f"{name} compiles ({format_bytes(folder.code_bytes or 0)} bytes) but executes "
                                 f"another file's source (exec(open(...).read())): the counted code must live in "
                                 f"{CODE_NAME}")
        return
    described, layers = [], 0
    while layers < MAX_WRAPPER_DEPTH:
        try:
            decoded = decode_wrapper(tree)
        except UnsupportedDecoder as error:
            report.add(SKIP, "code", f"{name} compiles; its wrapped source cannot be decoded here: {error}")
            return
        except Exception as error:  # binascii.Error, LZMAError, zlib.error, UnicodeDecodeError, ...: corrupt payload
            report.add(FAIL, "code", f"{name} compiles, but its wrapper's payload does not decode: "
                                     f"{type(error).__name__}: {error}")
            return
        if decoded is None:
            break
        layers += 1
        try:
            tree = ast.parse(decoded.source, filename=f"{name} (decoded)")
            compile(tree, f"{name} (decoded)", "exec")
        except (SyntaxError, ValueError) as error:
            if needs_newer_python(error):
                report.add(SKIP, "code", f"{name} is a {'+'.join(reversed(decoded.steps))} wrapper whose decoded "
                                         f"source uses Python 3.12 f-string syntax; this is Python "
                                         f"{sys.version.split()[0]}: {error}")
                return
            report.add(FAIL, "code", f"{name} is a {'+'.join(reversed(decoded.steps))} wrapper whose decoded source "
                                     f"({format_bytes(len(decoded.source.encode()))} bytes) does not compile: "
                                     f"{type(error).__name__}: {error}")
            return
        folder.decoded_source = decoded.source
        described.append(f"{'+'.join(reversed(decoded.steps))} wrapper around "
                         f"{format_bytes(len(decoded.source.encode()))} bytes of source")
    if described:
        message = (f"{name} compiles: {format_bytes(folder.code_bytes or 0)} bytes, a " + ", holding a ".join(described)
                   + ", which compiles")
    else:
        folder.decoded_source = source
        message = f"{name} compiles: {format_bytes(folder.code_bytes or 0)} bytes, plain source"
    report.add(PASS, "code", message + (f"; note: {'; '.join(notes)}" if notes else ""))


# -----------------------------------------------------------------------------
# Check 3: code bytes + model bytes <= 16,000,000
# -----------------------------------------------------------------------------

def claim_for_log(folder: RecordFolder, log: LogFacts) -> SeedClaim | None:
    return next((claim for claim in folder.claims if log.seed is not None and claim.seed == log.seed), None)


def check_sizes(folder: RecordFolder, report: Report) -> None:
    if folder.code_bytes is None:
        report.add(SKIP, "size", f"no {CODE_NAME} to count")
        return
    totals: list[int] = []
    for log in folder.logs:
        if log.read_error:
            continue
        name = f"size {log.name}"
        if log.model_bytes is None:
            report.add(SKIP, name, "the log prints no compressed model size ('Serialized model <format>: N bytes')")
            continue
        total = log.model_bytes + folder.code_bytes
        totals.append(total)
        message = (f"model {format_bytes(log.model_bytes)} ({log.model_label}) + {CODE_NAME} "
                   f"{format_bytes(folder.code_bytes)} = {format_bytes(total)}")
        logged_code = describe_logged_code(log, folder.code_bytes)
        claim = claim_for_log(folder, log)
        artifact_problem = None
        if claim is not None and claim.artifact_bytes is not None:
            accepted = {log.model_bytes, total, log.logged_total}
            if claim.artifact_bytes not in accepted:
                artifact_problem = (f"submission.json's artifact_bytes for seed {claim.seed} is "
                                    f"{format_bytes(claim.artifact_bytes)}, the log's model is "
                                    f"{format_bytes(log.model_bytes)}"
                                    + (f" and its total {format_bytes(log.logged_total)}" if log.logged_total else ""))
        if total > BUDGET_BYTES:
            report.add(FAIL, name, f"{message} > {format_bytes(BUDGET_BYTES)} by {format_bytes(total - BUDGET_BYTES)}"
                                   + (f" ({logged_code})" if logged_code else ""))
        elif artifact_problem:
            report.add(FAIL, name, f"{message} <= {format_bytes(BUDGET_BYTES)}, but {artifact_problem}")
        else:
            report.add(PASS, name, f"{message} <= {format_bytes(BUDGET_BYTES)} (headroom "
                                   f"{format_bytes(BUDGET_BYTES - total)})" + (f"; {logged_code}" if logged_code else ""))
    check_submission_bytes(folder, report, totals)


def describe_logged_code(log: LogFacts, file_bytes: int) -> str:
    """The log's own code count when it is not the folder's file (say both figures)."""
    if not log.code_sizes or file_bytes in log.code_sizes.values():
        return ""
    parts = [f"{format_bytes(count)} bytes{' ' + kind if kind else ''}" for kind, count in log.code_sizes.items()]
    text = f"the log counts its code as {' / '.join(parts)}, the folder ships {format_bytes(file_bytes)}"
    if log.logged_total is not None:
        text += f"; the log's own total is {format_bytes(log.logged_total)}"
    return text


def check_submission_bytes(folder: RecordFolder, report: Report, totals: list[int]) -> None:
    """submission.json's bytes_total and bytes_code against the folder and the logs."""
    if folder.submission is None:
        return
    bytes_total, bytes_code = folder.submission.get("bytes_total"), folder.submission.get("bytes_code")
    if not isinstance(bytes_total, int) and not isinstance(bytes_code, int):
        return  # older records carry neither: nothing to compare
    problems, notes = [], []
    logged_codes = {count for log in folder.logs for count in log.code_sizes.values()}
    if isinstance(bytes_code, int):
        if bytes_code == folder.code_bytes:
            notes.append(f"bytes_code {format_bytes(bytes_code)} = {CODE_NAME}")
        elif bytes_code in logged_codes:
            notes.append(f"bytes_code {format_bytes(bytes_code)} is the logs' code count ({CODE_NAME} is "
                         f"{format_bytes(folder.code_bytes or 0)})")
        else:
            problems.append(f"bytes_code {format_bytes(bytes_code)} is neither {CODE_NAME}'s size "
                            f"{format_bytes(folder.code_bytes or 0)} nor a log's code count")
    if isinstance(bytes_total, int):
        logged_totals = {log.logged_total for log in folder.logs if log.logged_total is not None}
        if totals and bytes_total == max(totals):
            notes.append(f"bytes_total {format_bytes(bytes_total)} = the largest model + {CODE_NAME}")
        elif bytes_total in totals:
            notes.append(f"bytes_total {format_bytes(bytes_total)} = one log's model + {CODE_NAME} "
                         f"(the largest is {format_bytes(max(totals))})")
        elif bytes_total in logged_totals:
            notes.append(f"bytes_total {format_bytes(bytes_total)} is a log's own total")
        elif mean_of := next((name for name, group in (("model + " + CODE_NAME, totals), ("their own totals", logged_totals))
                              if group and abs(statistics.fmean(group) - bytes_total) <= 1.0), None):
            notes.append(f"bytes_total {format_bytes(bytes_total)} is the logs' mean ({mean_of}); the largest "
                         f"model + {CODE_NAME} is {format_bytes(max(totals)) if totals else 'unknown'}")
        elif totals:
            problems.append(f"bytes_total {format_bytes(bytes_total)} matches no log: model + {CODE_NAME} gives "
                            f"{', '.join(format_bytes(total) for total in sorted(set(totals)))}")
        if bytes_total > BUDGET_BYTES:
            problems.append(f"bytes_total {format_bytes(bytes_total)} > {format_bytes(BUDGET_BYTES)}")
    if problems:
        report.add(FAIL, "size submission.json", "; ".join(problems + notes))
    else:
        report.add(PASS, "size submission.json", "; ".join(notes))


# -----------------------------------------------------------------------------
# Check 4: each log's final lines, and submission.json's per-seed figures against them
# -----------------------------------------------------------------------------

@dataclass
class SeedFigure:
    """One seed's score as the folder claims it (submission.json where it has it, else the log)."""

    seed: int | str | None
    val_bpb: float | None
    val_loss: float | None
    log: str | None
    label: str | None


def final_lines_problem(log: LogFacts) -> str | None:
    if not log.results:
        return "no final score line (final_<quant>_<compressor>_roundtrip_exact val_loss:X val_bpb:Y or similar)"
    if log.ttt_ran and not any(result.kind == "ttt" for result in log.results):
        return "TTT ran but the log has no final TTT line (final_ttt_exact, legal_ttt_exact, ...)"
    return None


def matching_result(log: LogFacts, claim: SeedClaim, score_line: str | None) -> ResultLine | None:
    """The log's line whose figures are the claim's: the one score_line names, else the first of
    TTT / sliding / roundtrip that agrees."""
    candidates = [result for result in log.preferred_results() if score_line is None or result.label == score_line]
    for result in candidates:
        bpb_ok = claim.val_bpb is None or figures_agree(claim.val_bpb, result.val_bpb)
        loss_ok = claim.val_loss is None or figures_agree(claim.val_loss, result.val_loss)
        if bpb_ok and loss_ok:
            return result
    return None


def describe_claim_mismatch(log: LogFacts, claim: SeedClaim, score_line: str | None) -> str:
    candidates = [result for result in log.preferred_results() if score_line is None or result.label == score_line]
    if not candidates:
        return f"{log.name} has no {score_line} line (submission.json's score_line)"
    shown = candidates[0]
    parts = []
    if claim.val_bpb is not None:
        parts.append(f"val_bpb {claim.val_bpb} in submission.json, {shown.val_bpb} in the log")
    if claim.val_loss is not None:
        parts.append(f"val_loss {claim.val_loss} in submission.json, {shown.val_loss} in the log")
    others = ", ".join(f"{result.label} {result.val_bpb}" for result in candidates[1:4])
    return (f"seed {claim.seed}: " + "; ".join(parts) + f" ({shown.label}"
            + (f"; also {others}" if others else "") + ")")


def where_figure_appears(logs: Sequence[LogFacts], claim: SeedClaim, score_line: str | None) -> str:
    """A hint for a claim no log of its seed backs: the log (of another seed) that has its figures."""
    for log in logs:
        result = matching_result(log, claim, score_line)
        if result is not None:
            ran = f", which ran seed {log.seed}" if log.seed is not None else ", which prints no seed"
            return f"; its figures are {log.name}'s {result.label}{ran}"
    return ""


def check_scores(folder: RecordFolder, report: Report) -> list[SeedFigure]:
    """One line per log and per claimed seed without a log; returns the per-seed figures."""
    score_line = folder.submission.get("score_line") if folder.submission else None
    score_line = score_line if isinstance(score_line, str) and score_line else None
    logs = [log for log in folder.logs if log.read_error is None]
    cited: dict[str, tuple[SeedClaim, ResultLine]] = {}
    failed_claims: dict[str, tuple[SeedClaim, str]] = {}
    missing: list[SeedClaim] = []
    for claim in folder.claims:
        if claim.val_bpb is None and claim.val_loss is None:
            continue
        candidates = [log for log in logs if claim.seed in (log.seed, log.name_seed) and log.name not in cited]
        by_figure = not candidates
        if by_figure:  # logs that print no seed: match by figure
            candidates = [log for log in logs if log.seed is None and log.name not in cited]
        match = next(((log, result) for log in candidates
                      if (result := matching_result(log, claim, score_line)) is not None), None)
        if match:
            cited[match[0].name] = (claim, match[1])
        elif candidates and not by_figure:
            failed_claims[candidates[0].name] = (claim, describe_claim_mismatch(candidates[0], claim, score_line)
                                                 + where_figure_appears(logs, claim, score_line))
        else:
            missing.append(claim)
    figures = []
    for log in logs:
        figures.extend(report_log_score(log, report, cited.get(log.name), failed_claims.get(log.name), bool(folder.claims)))
    for claim in missing:
        report.add(FAIL, f"score seed {claim.seed}", f"submission.json claims val_bpb {claim.val_bpb} for seed "
                                                     f"{claim.seed} but no train log of that seed shows it"
                                                     + where_figure_appears(logs, claim, score_line))
    if folder.claims:  # the claimed figures, each backed (or not) by its log above
        figures = [SeedFigure(claim.seed, claim.val_bpb, claim.val_loss, None, None) for claim in folder.claims]
        for log_name, (claim, result) in cited.items():
            for figure in figures:
                if figure.seed == claim.seed and figure.log is None:
                    figure.log, figure.label = log_name, result.label
                    figure.val_loss = figure.val_loss if figure.val_loss is not None else result.val_loss
                    figure.val_bpb = figure.val_bpb if figure.val_bpb is not None else result.val_bpb
                    break
    return figures


def report_log_score(log: LogFacts, report: Report, cited: tuple[SeedClaim, ResultLine] | None,
                     failed: tuple[SeedClaim, str] | None, has_claims: bool) -> list[SeedFigure]:
    name = f"score {log.name}" + (f" (seed {log.seed})" if log.seed is not None else "")
    problem = final_lines_problem(log)
    if problem:
        report.add(FAIL, name, problem)
        return []
    if failed is not None:
        report.add(FAIL, name, f"submission.json disagrees with the log: {failed[1]}")
        return []
    lines = ", ".join(dict.fromkeys(result.label for result in log.results))
    if cited is not None:
        claim, result = cited
        agreed = []
        if claim.val_bpb is not None:
            agreed.append(f"val_bpb {result.val_bpb}")
        if claim.val_loss is not None:
            agreed.append(f"val_loss {result.val_loss}")
        report.add(PASS, name, f"{result.label} {' '.join(agreed)} = submission.json's seed {claim.seed} "
                               f"(lines: {lines})")
        return []
    best = log.preferred_results()[0]
    suffix = " (not cited by submission.json's per-seed figures)" if has_claims else ""
    report.add(PASS, name, f"{best.label} val_loss {best.val_loss} val_bpb {best.val_bpb}{suffix} (lines: {lines})")
    return [] if has_claims else [SeedFigure(log.seed, best.val_bpb, best.val_loss, log.name, best.label)]


# -----------------------------------------------------------------------------
# Check 5: distinct seeds, one code, mean and std
# -----------------------------------------------------------------------------

def same_run(first: LogFacts, second: LogFacts) -> bool:
    """Two logs with identical final lines are one run (a copy), whatever their names say."""
    return bool(first.results) and [(result.label, result.val_loss, result.val_bpb) for result in first.results] == \
        [(result.label, result.val_loss, result.val_bpb) for result in second.results]


def check_seeds(folder: RecordFolder, report: Report) -> None:
    """Seeds listed once; each log runs the seed its name says; no run counted under two seeds;
    every listed seed has a log."""
    problems, notes = [], []
    listed = folder.listed_seeds
    duplicates = sorted({str(seed) for seed in listed if listed.count(seed) > 1})
    if duplicates:
        problems.append(f"submission.json lists seed {', '.join(duplicates)} more than once "
                        f"({', '.join(str(seed) for seed in listed)})")
    logs = [log for log in folder.logs if log.read_error is None]
    for log in logs:
        if log.text_seed is not None and log.name_seed is not None and log.text_seed != log.name_seed:
            problems.append(f"{log.name} is named for seed {log.name_seed} but ran seed {log.text_seed}")
    for index, first in enumerate(logs):
        for second in logs[index + 1:]:
            if not same_run(first, second):
                continue
            if first.seed is not None and second.seed is not None and first.seed != second.seed:
                problems.append(f"{first.name} (seed {first.seed}) and {second.name} (seed {second.seed}) have the "
                                f"same final figures: one run counted under two seeds")
            else:
                notes.append(f"{second.name} is a copy of {first.name}")
    logged_seeds = {seed for log in logs for seed in (log.seed, log.name_seed) if seed is not None}
    unlogged = [str(seed) for seed in dict.fromkeys(listed) if seed not in logged_seeds]
    if unlogged and logged_seeds:
        problems.append(f"submission.json lists seed {', '.join(unlogged)} but no log ran it")
    unseeded = [log.name for log in logs if log.seed is None]
    if unseeded:
        notes.append(f"no seed printed in {', '.join(unseeded[:4])}" + (" ..." if len(unseeded) > 4 else ""))
    seeds = sorted({str(seed) for seed in listed} | {str(log.seed) for log in logs if log.seed is not None},
                   key=lambda text: (len(text), text))
    if problems:
        report.add(FAIL, "seeds", "; ".join(problems + notes))
    elif not seeds:
        report.add(SKIP, "seeds", "neither submission.json nor the logs name a seed")
    else:
        report.add(PASS, "seeds", f"{len(seeds)} distinct: {', '.join(seeds)}" + (f"; {'; '.join(notes)}" if notes else ""))


def comparable_settings(settings: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in settings.items() if not RUN_SPECIFIC_SETTING.search(name)}


def groups_text(groups: dict[Any, list[str]], describe: Callable[[Any], str]) -> str:
    return "; ".join(f"{describe(key)} in {', '.join(names)}" for key, names in groups.items())


def check_one_code(folder: RecordFolder, report: Report, figures: list[SeedFigure]) -> None:
    """Every log behind the submission's figures ran the same code with the same settings: the
    sha256 of the source each log opens with, else the code size each printed; and the settings."""
    cited_names = {figure.log for figure in figures if figure.log}
    logs = [log for log in folder.logs if log.read_error is None and (not cited_names or log.name in cited_names)]
    if len(logs) < 2:
        report.add(PASS, "one code", f"{len(logs)} log: nothing to compare")
        return
    problems, evidence = [], []
    sources: dict[str, list[str]] = {}
    for log in logs:
        if log.source_sha256:
            sources.setdefault(log.source_sha256, []).append(log.name)
    if len(sources) > 1:
        problems.append("different source: " + groups_text(sources, lambda sha: f"sha256 {sha[:12]}"))
    elif sources:
        sha = next(iter(sources))
        evidence.append(f"source sha256 {sha[:12]} in {len(sources[sha])} logs")
        if folder.decoded_source is not None:
            same = hashlib.sha256(folder.decoded_source.encode("utf-8")).hexdigest() == sha
            # Not a failure: our records' train_gpt.py is generated (settings baked in, stripped)
            # from the trainer that ran, and the challenge's logs often predate the final edit.
            evidence.append(f"the same as {CODE_NAME}'s source" if same else f"not {CODE_NAME}'s source, which "
                            f"differs from what ran (a generated or edited record file)")
    else:
        code_counts: dict[tuple[tuple[str, int], ...], list[str]] = {}
        for log in logs:
            if log.code_sizes:
                code_counts.setdefault(tuple(sorted(log.code_sizes.items())), []).append(log.name)
        if len(code_counts) > 1:
            problems.append("different code sizes (these logs print no source): "
                            + groups_text(code_counts, lambda key: " / ".join(f"{count:,} bytes" for _, count in key)))
        elif code_counts:
            evidence.append("the same code size in every log (they print no source to hash)")
    settings_problem, settings_evidence = compare_settings(logs)
    problems += [settings_problem] if settings_problem else []
    evidence += [settings_evidence] if settings_evidence else []
    if problems:
        report.add(FAIL, "one code", "; ".join(problems))
    elif evidence:
        report.add(PASS, "one code", f"{len(logs)} logs: " + "; ".join(evidence))
    else:
        report.add(SKIP, "one code", "the logs print neither their source, their settings nor a code size")


def compare_settings(logs: Sequence[LogFacts]) -> tuple[str | None, str | None]:
    """(a difference between the logs' settings, or None; what agreed, or None)."""
    with_settings = [log for log in logs if log.settings]
    if len(with_settings) < 2:
        return None, None
    reference = comparable_settings(with_settings[0].settings or {})
    differences = []
    for log in with_settings[1:]:
        other = comparable_settings(log.settings or {})
        for name in sorted(set(reference) | set(other)):
            if reference.get(name) != other.get(name):
                differences.append(f"{name}={reference.get(name, '(unset)')} in {with_settings[0].name}, "
                                   f"{other.get(name, '(unset)')} in {log.name}")
    if differences:
        shown = "; ".join(differences[:4]) + (f"; {len(differences) - 4} more" if len(differences) > 4 else "")
        return f"different settings: {shown}", None
    return None, f"the same {len(reference)} settings (seed, run id and paths aside)"


# The names the challenge's submissions give the summary figures, ours first.
MEAN_NAMES = {"val_bpb": ("val_bpb", "mean_val_bpb", "mean_bpb"),
              "val_loss": ("val_loss", "mean_val_loss", "mean_val_loss_nats")}
STD_NAMES = {"val_bpb": ("val_bpb_std", "std_bpb", "std_val_bpb"),
             "val_loss": ("val_loss_std", "std_loss", "std_val_loss", "std_val_loss_nats")}
STD_RELATIVE_TOLERANCE = 0.05  # a std printed from rounded per-seed figures is a few percent off


def check_mean(folder: RecordFolder, report: Report, figures: list[SeedFigure]) -> list[SeedFigure]:
    """submission.json's val_bpb / val_loss (and their std) against the per-seed figures; returns
    the figures the rule test should use."""
    if folder.submission is None:
        report.add(SKIP, "mean", "no readable submission.json")
        return figures
    if not folder.claims:
        return check_top_level_against_logs(folder, report)
    for metric in ("val_bpb", "val_loss"):
        claimed = top_level_figure(folder.submission, *MEAN_NAMES[metric])
        if claimed is None:
            if metric == "val_bpb":
                report.add(FAIL, "mean val_bpb", "submission.json has no val_bpb")
            continue
        values = [getattr(figure, metric) for figure in figures]
        if not values or None in values:
            report.add(SKIP, f"mean {metric}", f"{metric} for {len([v for v in values if v is not None])} of "
                                               f"{len(values)} seeds: cannot recompute {claimed[0]} {claimed[1]}")
            continue
        report_mean_and_std(folder.submission, report, metric, claimed, values, f"the mean of {len(values)} seeds")
    return figures


def check_top_level_against_logs(folder: RecordFolder, report: Report) -> list[SeedFigure]:
    """Older records give one val_bpb and no per-seed figures: it is the mean of one line over the
    logs (one per run), or a single log's figure. Say which."""
    logs: list[LogFacts] = []
    for log in folder.logs:  # one entry per run: copies of a log (train.log beside train_seed1337.log) count once
        if log.read_error is None and log.results and not any(same_run(log, kept) for kept in logs):
            logs.append(log)
    assert folder.submission is not None
    claimed_bpb = top_level_figure(folder.submission, *MEAN_NAMES["val_bpb"])
    if claimed_bpb is None:
        report.add(FAIL, "mean val_bpb", "submission.json has no val_bpb")
    if not logs:
        if claimed_bpb is not None:
            report.add(SKIP, "mean val_bpb", f"no log with a final line to recompute {claimed_bpb[0]} from")
        return []
    if len(set(folder.listed_seeds)) > len(logs):
        report.add(SKIP, "mean val_bpb", f"submission.json lists {len(set(folder.listed_seeds))} seeds, the folder "
                                         f"has {len(logs)} run log(s): its figures are not all here")
        return []
    label = logs[0].preferred_results()[0].label
    for metric in ("val_bpb", "val_loss"):
        claimed = top_level_figure(folder.submission, *MEAN_NAMES[metric])
        if claimed is None:
            continue
        found = find_top_level_source(logs, metric, claimed[1])
        if found is None:
            values = [value for log in logs if (value := result_value(log, label, metric)) is not None]
            report.add(FAIL, f"mean {metric}", f"{claimed[0]} {claimed[1]} is neither the mean of one line over the "
                                               f"{len(logs)} logs nor one log's figure (mean of {label}: "
                                               f"{statistics.fmean(values):.8f})")
            continue
        found_label, values, where = found
        label = found_label if metric == "val_bpb" else label
        report_mean_and_std(folder.submission, report, metric, claimed, values, where)
    return [SeedFigure(log.seed, result_value(log, label, "val_bpb"), result_value(log, label, "val_loss"),
                       log.name, label) for log in logs if result_value(log, label, "val_bpb") is not None]


def result_value(log: LogFacts, label: str, metric: str) -> float | None:
    result = next((result for result in reversed(log.results) if result.label == label), None)
    return getattr(result, metric) if result is not None else None


def find_top_level_source(logs: Sequence[LogFacts], metric: str,
                          claimed: float) -> tuple[str, list[float], str] | None:
    """(label, values, description) of the line whose mean over all logs is the claimed figure,
    else of the one log whose line is; None when neither."""
    labels = list(dict.fromkeys(result.label for result in logs[0].preferred_results()))
    for label in labels:
        values = [result_value(log, label, metric) for log in logs]
        if None not in values and figures_agree(claimed, statistics.fmean(values)):
            where = f"the mean of {label} over {len(values)} logs" if len(values) > 1 else f"{logs[0].name}'s {label}"
            return label, values, where
    for log in logs:
        for result in log.preferred_results():
            if figures_agree(claimed, getattr(result, metric)):
                return result.label, [getattr(result, metric)], f"{log.name}'s {result.label} (one log of {len(logs)})"
    return None


def report_mean_and_std(submission: dict[str, Any], report: Report, metric: str, claimed: tuple[str, float],
                        values: list[float], where: str) -> None:
    mean = statistics.fmean(values)
    agrees = figures_agree(claimed[1], mean)
    parts = [f"{claimed[0]} {claimed[1]} {'=' if agrees else '!='} {where} {mean:.8f}"]
    claimed_std = top_level_figure(submission, *STD_NAMES[metric])
    std_ok = True
    if claimed_std is not None and len(values) > 1:
        sample, population = statistics.stdev(values), statistics.pstdev(values)
        exact = [label for label, value in (("ddof=1", sample), ("ddof=0", population))
                 if figures_agree(claimed_std[1], value)]
        near = [label for label, value in (("ddof=1", sample), ("ddof=0", population))
                if abs(claimed_std[1] - value) <= STD_RELATIVE_TOLERANCE * value]
        figures_text = f"ddof=1 {sample:.6f}, ddof=0 {population:.6f}"
        if exact:
            parts.append(f"{claimed_std[0]} {claimed_std[1]} matches {' and '.join(exact)} ({figures_text})")
        elif near:
            parts.append(f"{claimed_std[0]} {claimed_std[1]} matches {' and '.join(near)} within "
                         f"{STD_RELATIVE_TOLERANCE:.0%} ({figures_text})")
        else:
            std_ok = False
            parts.append(f"{claimed_std[0]} {claimed_std[1]} matches neither {figures_text}")
    report.add(PASS if agrees and std_ok else FAIL, f"mean {metric}", "; ".join(parts))


# -----------------------------------------------------------------------------
# Check 6: the challenge's rule, >= 0.005 nats better at p < 0.01 (one-sided)
# -----------------------------------------------------------------------------

@dataclass
class OneSampleTest:
    mean_improvement: float  # mean of reference - value, in the tested units
    n: int
    t: float | None = None  # for H1: improvement - bar > 0
    df: int | None = None
    p_value: float | None = None
    reason: str = ""


def one_sample_test(values: Sequence[float], reference: float, bar: float) -> OneSampleTest:
    """H1: mean(reference - value) > bar. scripts/ab_stats.py's paired test (scipy) on the pairs
    (value + bar, reference) is exactly this test; a hand-written Student t CDF stands in without scipy."""
    improvement = statistics.fmean(reference - value for value in values)
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import ab_stats  # noqa: PLC0415 - optional: needs scipy
    except ImportError:
        ab_stats = None
    finally:
        sys.path.pop(0)
    if ab_stats is not None:
        seeds = range(len(values))
        result = ab_stats.paired_test({seed: values[seed] + bar for seed in seeds}, {seed: reference for seed in seeds})
        if result.t is None:
            return OneSampleTest(improvement, len(values), reason=result.reason)
        return OneSampleTest(improvement, len(values), -result.t, int(result.df), result.p_one_sided)
    if len(values) < 2:
        return OneSampleTest(improvement, len(values), reason="no p-value: one seed (the test needs >= 2)")
    spread = statistics.stdev(values)
    if spread == 0.0:
        return OneSampleTest(improvement, len(values), reason="no p-value: every seed gave the same value")
    t = (improvement - bar) / (spread / math.sqrt(len(values)))
    df = len(values) - 1
    return OneSampleTest(improvement, len(values), t, df, 1.0 - student_t_cdf(t, df))


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom, via the regularized incomplete beta
    function (continued fraction, Numerical Recipes' betacf): used only when scipy is missing."""
    x = df / (df + t * t)
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast on this side
        return math.exp(log_front) * beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * beta_continued_fraction(b, a, 1.0 - x) / b


def beta_continued_fraction(a: float, b: float, x: float, iterations: int = 300, epsilon: float = 1e-15) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, iterations + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < epsilon:
            break
    return result


def check_rule(figures: list[SeedFigure], report: Report, reference_bpb: float | None,
               reference_loss: float | None) -> None:
    name = "rule 0.005 nats at p < 0.01"
    if reference_loss is not None:
        values = [figure.val_loss for figure in figures if figure.val_loss is not None]
        if not values:
            report.add(SKIP, name, "no per-seed val_loss to test against --reference-loss")
            return
        reference, bar, units, how = reference_loss, CHALLENGE_EFFECT_NATS, "nats", "on per-seed val_loss"
    else:
        values = [figure.val_bpb for figure in figures if figure.val_bpb is not None]
        losses = [figure.val_loss for figure in figures if figure.val_loss is not None]
        if not values or not losses:
            report.add(SKIP, name, "no per-seed val_loss to convert the 0.005-nat bar to bpb "
                                   "(give --reference-loss, or a submission with val_loss)")
            return
        ratio = statistics.fmean(values) / statistics.fmean(losses)  # bpb per nat, from the submission itself
        reference, bar, units = reference_bpb, CHALLENGE_EFFECT_NATS * ratio, "bpb"
        how = (f"in bpb (no --reference-loss): bar 0.005 nats x {ratio:.5f} bpb/nat "
               f"(the submission's mean val_bpb / val_loss) = {bar:.6f} bpb")
    assert reference is not None
    test = one_sample_test(values, reference, bar)
    text = (f"{how}; reference {reference}, mean improvement {test.mean_improvement:.6f} {units} over "
            f"{test.n} seed{'s' if test.n != 1 else ''} (bar {bar:.6f})")
    if test.p_value is None:
        report.add(FAIL, name, f"{text}; {test.reason}")
        return
    text += f", t = {test.t:.3f}, df = {test.df}, p = {test.p_value:.3g}"
    report.add(PASS if test.p_value < SIGNIFICANCE_LEVEL else FAIL, name,
               text + (" < 0.01" if test.p_value < SIGNIFICANCE_LEVEL else " >= 0.01: not shown"))


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

class UsageError(Exception):
    pass


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2) rather than usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="check_record.py", description="Validate a Parameter Golf record folder.")
    parser.add_argument("folder", type=Path, help="the record folder (README.md, submission.json, train_gpt.py, logs)")
    parser.add_argument("--reference-bpb", type=positive_float, metavar="X",
                        help="the current record's val_bpb: test the challenge's 0.005-nat rule against it")
    parser.add_argument("--reference-loss", type=positive_float, metavar="X",
                        help="the current record's val_loss (nats): test the rule on per-seed val_loss")
    return parser.parse_args(argv)


def run_checks(folder_path: Path, reference_bpb: float | None, reference_loss: float | None,
               report: Report) -> None:
    folder = load_folder(folder_path)
    check_files(folder, report)
    check_code(folder, report)
    check_sizes(folder, report)
    figures = check_scores(folder, report)
    check_seeds(folder, report)
    check_one_code(folder, report, figures)
    figures = check_mean(folder, report, figures)
    if reference_bpb is not None or reference_loss is not None:
        check_rule(figures, report, reference_bpb, reference_loss)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        arguments = parse_arguments(argv)
        if not arguments.folder.is_dir():
            raise UsageError(f"no such folder: {arguments.folder}")
    except UsageError as error:
        print(f"check_record: error: {error}", file=sys.stderr)
        return 2
    report = Report()
    try:
        run_checks(arguments.folder, arguments.reference_bpb, arguments.reference_loss, report)
    except Exception as error:  # a folder shaped like nothing seen so far: one line, not a traceback
        report.add(FAIL, "check_record", f"stopped on an unexpected {type(error).__name__}: {error} "
                                         f"(a bug in check_record.py for this folder's shape)")
    print(report.summary())
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
