"""
cached_challenge_fineweb.py: download the official Parameter Golf FineWeb export (needs network).

    python3 data/cached_challenge_fineweb.py --variant sp1024                  # every listed shard
    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10
    python3 data/cached_challenge_fineweb.py --variant byte260 --train-shards 1
    python3 data/cached_challenge_fineweb.py --variant sp8192 --repo-id OWNER/NAME   # a fork's export
    python3 data/cached_challenge_fineweb.py --with-docs                       # the selected documents only

The challenge publishes its tokenised FineWeb on the Hugging Face hub (dataset repo
willdepueoai/parameter-golf, folder `datasets/`, described by its manifest.json). This script
reads that manifest, downloads the val shards, the first N train shards and the tokenizer of a
variant (sp<N> for a SentencePiece BPE of N pieces, byte260 for the pure byte tokenizer), and
lays them out as the challenge's own scripts do:

    data/datasets/fineweb10B_<variant>/fineweb_{train,val}_NNNNNN.bin
    data/tokenizers/fineweb_<N>_bpe.model (+ .vocab), or fineweb_pure_byte_260.json for byte260

plus data/datasets/fineweb10B_<variant>/manifest.json (token counts, tokenizer sha256, source)
and hub_manifest.json (the remote manifest as downloaded). With --with-docs it also fetches
the documents the export was tokenised from, data/docs_selected.jsonl and its sidecar
data/docs_selected.source_manifest.json, checking the file's sha256 against the sidecar;
data/build_local_corpus.py retokenises them with any tokenizer, keeping the export's split.
Files already present and intact are not downloaded again. Without network it stops within
seconds and points to data/build_local_corpus.py, which builds a dataset in the same format
from local text.

huggingface_hub is imported inside main() only: the rest of the repository never needs it.
"""

import argparse
import hashlib
import importlib
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# =============================================================================
# CONSTANTS: where the export lives and what the variants are called
# =============================================================================

# The challenge's export; the same environment overrides as parameter-golf's own downloader
# (for mirrors and forks) are read when the command line is parsed, and --repo-id /
# --remote-root take precedence over them.
DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
REPO_ID_ENVIRONMENT = "MATCHED_FINEWEB_REPO_ID"
REMOTE_ROOT_ENVIRONMENT = "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_OUTPUT_ROOT = Path(__file__).resolve().parent  # the repository's data/ folder

# Variants: sp<N> (SentencePiece BPE with N pieces) or byte260 (the pure byte tokenizer). The
# export names a variant's dataset folder fineweb10B_<variant>; which variants exist is the
# remote manifest's business, so any N is accepted here and checked against it.
DATASET_PREFIX = "fineweb10B_"
VARIANT_PATTERN = re.compile(r"^(?:sp(?P<pieces>[1-9][0-9]*)|byte260)$")
VARIANT_FORMS = "sp<N> (N a positive integer, e.g. sp1024, sp4096) or byte260"
BYTE_VARIANT = "byte260"
BYTE_TOKENIZER_FILE = "fineweb_pure_byte_260.json"
BYTE_VOCAB_SIZE = 260  # 4 special ids, then the 256 byte values

# The documents the export was tokenised from, beside manifest.json, and their sidecar
# (num_docs, docs_val, shuffle_seed, docs_sha256 of the .jsonl file's bytes).
DOCS_FILE = "docs_selected.jsonl"
DOCS_SIDECAR_FILE = "docs_selected.source_manifest.json"
HASH_CHUNK_BYTES = 8 << 20  # docs_selected.jsonl is gigabytes: hash it a chunk at a time

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_BYTES = 256 * 4

PROBE_TIMEOUT_SECONDS = 10
OFFLINE_HINT = "without network build a local corpus: python3 data/build_local_corpus.py"

# hf_hub_download's default timeouts and retries can hang for minutes without network; these
# must be set before huggingface_hub is imported, which reads them once.
HUB_TIMEOUT_ENVIRONMENT = {"HF_HUB_ETAG_TIMEOUT": "10", "HF_HUB_DOWNLOAD_TIMEOUT": "60"}

# fetch(remote path relative to the remote root, staging folder) -> path of the downloaded file
Fetch = Callable[[str, Path], Path]


class DownloadError(Exception):
    """A problem main() reports as one 'error: ...' line, exit status 2."""


@dataclass(frozen=True)
class HubSource:
    """Where an export lives: a dataset repo, and the folder in it that holds manifest.json."""

    repo_id: str = DEFAULT_REPO_ID
    remote_root: str = DEFAULT_REMOTE_ROOT  # "" when manifest.json sits at the repo's top

    def remote_path(self, remote: str) -> str:
        """The path inside the repo of a file the manifest names relative to the root."""
        return f"{self.remote_root}/{remote}" if self.remote_root else remote


def make_source(repo_id: str | None, remote_root: str | None) -> HubSource:
    """The command line's values, else the environment overrides, else the challenge's repo."""
    repo_id = repo_id if repo_id is not None else os.environ.get(REPO_ID_ENVIRONMENT, DEFAULT_REPO_ID)
    if remote_root is None:
        remote_root = os.environ.get(REMOTE_ROOT_ENVIRONMENT, DEFAULT_REMOTE_ROOT)
    # A repo id is "owner/name" (or a bare legacy "name"): anything else would make a URL path.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?", repo_id):
        raise DownloadError(f"--repo-id {repo_id!r}: expected OWNER/NAME of a Hugging Face dataset repo")
    remote_root = remote_root.strip("/")
    if ".." in Path(remote_root).parts:
        raise DownloadError(f"--remote-root {remote_root!r}: must be a folder inside the repo, without '..'")
    return HubSource(repo_id, remote_root)


@dataclass(frozen=True)
class Variant:
    name: str  # sp4096, byte260
    dataset: str  # fineweb10B_sp4096: the folder under datasets/
    tokenizer_file: str  # fineweb_4096_bpe.model, or fineweb_pure_byte_260.json
    kind: str  # "sentencepiece" or "byte"
    vocab_size: int


def parse_variant(name: str) -> Variant:
    match = VARIANT_PATTERN.match(name)
    if match is None:
        raise DownloadError(f"--variant {name!r}: expected {VARIANT_FORMS}")
    if name == BYTE_VARIANT:
        return Variant(name, DATASET_PREFIX + name, BYTE_TOKENIZER_FILE, "byte", BYTE_VOCAB_SIZE)
    pieces = int(match.group("pieces"))
    return Variant(name, DATASET_PREFIX + name, f"fineweb_{pieces}_bpe.model", "sentencepiece", pieces)


def variant_sort_key(name: str) -> tuple[str, int]:
    """sp512 before sp1024: the letters, then the number."""
    letters = name.rstrip("0123456789")
    return letters, int(name[len(letters):] or 0)


# =============================================================================
# MANIFEST: which files make up a variant
# =============================================================================


@dataclass(frozen=True)
class DownloadItem:
    remote: str  # path relative to the remote root, e.g. datasets/fineweb10B_sp1024/fineweb_val_000000.bin
    local: Path  # final location under the output root
    is_shard: bool


def find_entry(entries: object, key: str, value: str) -> dict | None:
    if not isinstance(entries, list):
        return None
    return next((e for e in entries if isinstance(e, dict) and e.get(key) == value), None)


def manifest_count(dataset_entry: dict, key: str) -> int:
    stats = dataset_entry.get("stats")
    value = stats.get(key) if isinstance(stats, dict) else None
    if not isinstance(value, int) or value < 0:
        raise DownloadError(
            f"unexpected manifest shape: dataset {dataset_entry.get('name')!r} has no integer stats.{key}"
        )
    return value


def listed_variants(manifest: dict) -> list[str]:
    """The variants a manifest offers: its fineweb10B_<variant> dataset names, in natural order."""
    names = [entry.get("name") for entry in manifest.get("datasets", []) if isinstance(entry, dict)]
    variants = {
        name.removeprefix(DATASET_PREFIX) for name in names if isinstance(name, str) and name.startswith(DATASET_PREFIX)
    }
    return sorted(variants, key=variant_sort_key)


def local_path_for(remote: str, output_root: Path) -> Path:
    """Remote datasets/... and tokenizers/... map onto the same folders under the output root."""
    parts = Path(remote).parts
    if len(parts) < 2 or parts[0] not in ("datasets", "tokenizers") or ".." in parts:
        raise DownloadError(f"unexpected manifest shape: file path {remote!r} is not under datasets/ or tokenizers/")
    return output_root.joinpath(*parts)


DEFAULT_TRAIN_SHARDS = 80
TOKENIZER_FILE_KEYS = ("model_path", "vocab_path", "path")  # what parameter-golf's downloader reads


def plan_downloads(
    manifest: object, variant: str, train_shards: int | None, output_root: Path, source: HubSource = HubSource()
) -> list[DownloadItem]:
    """The files to fetch for a variant: val shards, the first train shards, the tokenizer.

    The manifest lists datasets (name, tokenizer_name, stats.files_train/files_val) and
    tokenizers (name, model_path/vocab_path for SentencePiece, path for a byte tokenizer's
    .json), paths relative to the export's root.
    """
    layout = parse_variant(variant)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), list):
        raise DownloadError("unexpected manifest shape: not a JSON object with a 'datasets' list")
    dataset_entry = find_entry(manifest["datasets"], "name", layout.dataset)
    if dataset_entry is None:
        listed = ", ".join(listed_variants(manifest)) or f"no {DATASET_PREFIX}* datasets"
        raise DownloadError(
            f"--variant {variant}: {source.repo_id} has no {layout.dataset} in "
            f"{source.remote_path('manifest.json')}, which lists: {listed}"
        )
    available_train = manifest_count(dataset_entry, "files_train")
    available_val = manifest_count(dataset_entry, "files_val")
    if train_shards is None:
        # The challenge's default download: 80 shards (8B tokens), or all when fewer exist.
        train_shards = min(DEFAULT_TRAIN_SHARDS, available_train)
    if train_shards > available_train:
        raise DownloadError(
            f"--train-shards {train_shards}: {layout.dataset} has {available_train} train shards on {source.repo_id}"
        )

    tokenizer_entry = find_entry(manifest.get("tokenizers"), "name", dataset_entry.get("tokenizer_name"))
    if tokenizer_entry is None:
        # No name link: fall back to the entry that lists the file this variant uses.
        candidates = manifest.get("tokenizers") if isinstance(manifest.get("tokenizers"), list) else []
        tokenizer_entry = next(
            (
                entry for entry in candidates
                if isinstance(entry, dict)
                and any(str(entry.get(key, "")).endswith(layout.tokenizer_file) for key in TOKENIZER_FILE_KEYS)
            ),
            None,
        )
    tokenizer_files = [
        tokenizer_entry[key]
        for key in TOKENIZER_FILE_KEYS
        if tokenizer_entry is not None and isinstance(tokenizer_entry.get(key), str) and tokenizer_entry[key]
    ]
    suffix = Path(layout.tokenizer_file).suffix  # .model for SentencePiece, .json for byte260
    if not any(remote.endswith(suffix) for remote in tokenizer_files):
        raise DownloadError(f"unexpected manifest shape: no tokenizer {suffix} file listed for {layout.dataset}")

    items = [
        DownloadItem(remote, local_path_for(remote, output_root), is_shard=True)
        for remote in [f"datasets/{layout.dataset}/fineweb_val_{i:06d}.bin" for i in range(available_val)]
        + [f"datasets/{layout.dataset}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    ]
    for remote in dict.fromkeys(tokenizer_files):  # in order, without repeats
        items.append(DownloadItem(remote, local_path_for(remote, output_root), is_shard=False))
    return items


# =============================================================================
# DOWNLOAD: fetch into a staging folder, check, move into place
# =============================================================================


def shard_token_count(path: Path) -> int | None:
    """Token count from a shard's header, or None when the header or the file size is wrong."""
    try:
        size = path.stat().st_size
        with path.open("rb") as shard:
            header = shard.read(12)
    except OSError:
        return None
    if len(header) < 12:
        return None
    magic, version, count = (int.from_bytes(header[i : i + 4], "little", signed=True) for i in (0, 4, 8))
    if magic != SHARD_MAGIC or version != SHARD_VERSION or size != SHARD_HEADER_BYTES + 2 * count:
        return None
    return count


def sha256_file(path: Path) -> str:
    """A chunk at a time: docs_selected.jsonl does not fit in memory on every machine."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def is_complete(item: DownloadItem) -> bool:
    if not item.local.is_file():
        return False
    if item.is_shard:
        return shard_token_count(item.local) is not None
    return item.local.stat().st_size > 0


def make_staging(output_root: Path, keep: list[Path]) -> Path:
    """Staging inside the output root: the final move is then a rename on one filesystem."""
    staging = output_root / "datasets" / ".hub_download"
    try:
        for folder in [*keep, staging]:
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"output not writable: {err.filename} ({err.strerror or err})") from None
    return staging


def download(
    variant: str,
    train_shards: int | None,
    output_root: Path,
    fetch: Fetch,
    log: Callable[[str], None] = print,
    source: HubSource = HubSource(),
) -> dict:
    """Fetch the manifest and the variant's files; write the local manifest; return it."""
    layout = parse_variant(variant)
    dataset_dir = output_root / "datasets" / layout.dataset
    staging = make_staging(output_root, [dataset_dir])

    log(f"manifest: {source.repo_id} {source.remote_path('manifest.json')}")
    manifest_file = fetch("manifest.json", staging)
    try:
        remote_manifest = json.loads(Path(manifest_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DownloadError(f"unexpected manifest: {source.remote_path('manifest.json')} is not JSON ({err})") from None
    items = plan_downloads(remote_manifest, variant, train_shards, output_root, source)

    started = time.perf_counter()
    for index, item in enumerate(items, start=1):
        if is_complete(item):
            log(f"download: [{index}/{len(items)}] {item.remote} already present")
            continue
        log(f"download: [{index}/{len(items)}] {item.remote}")
        fetched = Path(fetch(item.remote, staging))
        if item.is_shard and shard_token_count(fetched) is None:
            raise DownloadError(f"{item.remote}: downloaded file has a bad shard header or size")
        item.local.parent.mkdir(parents=True, exist_ok=True)
        os.replace(fetched, item.local)
    shutil.rmtree(staging, ignore_errors=True)

    # A manifest beside the shards, in the shape build_local_corpus.py writes.
    shards = {
        split: sorted(p for p in (i.local for i in items if i.is_shard) if p.name.startswith(f"fineweb_{split}_"))
        for split in ("train", "val")
    }
    suffix = Path(layout.tokenizer_file).suffix
    tokenizer_path = next(i.local for i in items if not i.is_shard and i.local.suffix == suffix)
    manifest = {
        "name": dataset_dir.name,
        "created_by": "data/cached_challenge_fineweb.py",
        "source": {
            "repo_id": source.repo_id, "repo_type": "dataset", "remote_root": source.remote_root, "variant": variant
        },
        "splits": {
            split: {
                "documents": None,  # not recorded by the export; counting BOS would read every shard
                "tokens": sum(shard_token_count(path) or 0 for path in paths),
                "shards": [path.name for path in paths],
            }
            for split, paths in shards.items()
        },
        "tokenizer": {
            "path": tokenizer_path.relative_to(output_root).as_posix(),
            "sha256": sha256_file(tokenizer_path),
            "kind": layout.kind,
            "vocab_size": layout.vocab_size,
            "trained": False,
        },
    }
    (dataset_dir / "hub_manifest.json").write_text(json.dumps(remote_manifest, indent=2) + "\n", encoding="utf-8")
    (dataset_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log(
        f"done in {time.perf_counter() - started:.0f} s: {dataset_dir} "
        f"(train {len(shards['train'])} shards, {manifest['splits']['train']['tokens']:,} tokens; "
        f"val {len(shards['val'])} shards, {manifest['splits']['val']['tokens']:,} tokens), tokenizer {tokenizer_path}"
    )
    log(f"train with: DATA_PATH={dataset_dir} TOKENIZER_PATH={tokenizer_path} VOCAB_SIZE={layout.vocab_size}")
    return manifest


def download_docs(
    output_root: Path, fetch: Fetch, log: Callable[[str], None] = print, source: HubSource = HubSource()
) -> dict:
    """Fetch docs_selected.jsonl and its sidecar into the output root, checking the sha256.

    Returns the sidecar with the file's local path and sha256. On a sha256 mismatch both
    downloaded files are deleted and neither is moved into place.
    """
    staging = make_staging(output_root, [])
    docs_path = output_root / DOCS_FILE
    sidecar_path = output_root / DOCS_SIDECAR_FILE

    log(f"docs: {source.repo_id} {source.remote_path(DOCS_SIDECAR_FILE)}")
    fetched_sidecar = Path(fetch(DOCS_SIDECAR_FILE, staging))
    try:
        sidecar = json.loads(fetched_sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DownloadError(f"{source.remote_path(DOCS_SIDECAR_FILE)} is not JSON ({err})") from None
    if not isinstance(sidecar, dict):
        raise DownloadError(f"{source.remote_path(DOCS_SIDECAR_FILE)} is not a JSON object")
    expected = sidecar.get("docs_sha256")
    expected = expected.strip().lower() if isinstance(expected, str) and expected.strip() else None

    # A local copy is reused when it matches the sidecar; without a digest to check, when it
    # exists at all (downloads land in staging first, so a file in place is a whole download).
    local_digest = sha256_file(docs_path) if docs_path.is_file() and expected else None
    if docs_path.is_file() and docs_path.stat().st_size > 0 and (expected is None or local_digest == expected):
        log(f"docs: {docs_path} already present")
        digest = local_digest or sha256_file(docs_path)
    else:
        log(f"docs: {source.remote_path(DOCS_FILE)} (gigabytes on the challenge's export)")
        fetched_docs = Path(fetch(DOCS_FILE, staging))
        digest = sha256_file(fetched_docs)
        if expected is not None and digest != expected:
            shutil.rmtree(staging, ignore_errors=True)  # the bad file and its sidecar: neither goes in place
            raise DownloadError(
                f"{source.remote_path(DOCS_FILE)}: sha256 {digest} does not match the sidecar's docs_sha256 "
                f"{expected}; the download was deleted"
            )
        os.replace(fetched_docs, docs_path)
    # The sidecar last: it describes the file now in place.
    os.replace(fetched_sidecar, sidecar_path)
    shutil.rmtree(staging, ignore_errors=True)

    checked = "sha256 matches the sidecar" if expected else "not checked: the sidecar has no docs_sha256"
    log(f"docs: {docs_path} ({docs_path.stat().st_size:,} bytes, {checked}), sidecar {sidecar_path}")
    log(
        f"retokenise them, keeping the export's order and val split (docs_val={sidecar.get('docs_val')}): "
        f"python3 data/build_local_corpus.py {docs_path} --tokenizer byte260 "
        f"(or --tokenizer PATH.model, or --vocab-size N to train a BPE)"
    )
    return {**sidecar, "path": str(docs_path), "sha256": digest, "sha256_checked": expected is not None}


# =============================================================================
# HUB: reachability check and the huggingface_hub fetch
# =============================================================================


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def check_hub_reachable(source: HubSource = HubSource()) -> None:
    """Fail in seconds without network: hf_hub_download would retry with back-off for ~25 s."""
    endpoint = hub_endpoint()
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise DownloadError(f"HF_HUB_OFFLINE is set, the hub cannot be used; {OFFLINE_HINT}")
    request = urllib.request.Request(f"{endpoint}/api/datasets/{source.repo_id}", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_SECONDS):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered (perhaps 401/404): reachable, hf_hub_download reports the rest
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot reach the Hugging Face hub at {endpoint} ({reason}); {OFFLINE_HINT}") from None


def hub_fetcher(source: HubSource) -> Fetch:
    """A fetch that downloads from `source` with huggingface_hub (imported by main() first)."""

    def hub_fetch(remote: str, staging: Path) -> Path:
        from huggingface_hub import hf_hub_download

        remote_path = source.remote_path(remote)
        try:
            return Path(
                hf_hub_download(repo_id=source.repo_id, repo_type="dataset", filename=remote_path, local_dir=staging)
            )
        except Exception as err:  # huggingface_hub's error classes differ between its versions
            kind = type(err).__name__
            detail = str(err).strip().splitlines()[0] if str(err).strip() else kind
            if kind == "LocalEntryNotFoundError" or "Connect" in kind or "Timeout" in kind:
                raise DownloadError(f"cannot reach the Hugging Face hub ({detail}); {OFFLINE_HINT}") from None
            if "NotFound" in kind:
                raise DownloadError(f"{remote_path} not found in the dataset repo {source.repo_id} ({kind})") from None
            raise DownloadError(f"downloading {remote_path} failed ({kind}: {detail})") from None

    return hub_fetch


# =============================================================================
# COMMAND LINE
# =============================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download the official Parameter Golf FineWeb shards and tokenizer "
        f"(default repo {DEFAULT_REPO_ID}, folder {DEFAULT_REMOTE_ROOT}/).",
        epilog=f"No network? {OFFLINE_HINT}",
    )
    parser.add_argument(
        "--variant", default=None,
        help=f"{VARIANT_FORMS}; it must be listed in the remote manifest (optional with --with-docs)",
    )
    parser.add_argument(
        "--train-shards", type=int, default=None,
        help=f"number of train shards (100M tokens each) to fetch (default: {DEFAULT_TRAIN_SHARDS}, "
        "the challenge's default, or all when fewer exist); 0 fetches the val shards and tokenizer only",
    )
    parser.add_argument(
        "--output-root", type=Path, default=DEFAULT_OUTPUT_ROOT,
        help="folder that receives datasets/, tokenizers/ and the --with-docs files "
        "(default: this script's folder, data/)",
    )
    parser.add_argument(
        "--repo-id", default=None,
        help=f"Hugging Face dataset repo (default: ${REPO_ID_ENVIRONMENT}, else {DEFAULT_REPO_ID})",
    )
    parser.add_argument(
        "--remote-root", default=None,
        help=f"folder in the repo holding manifest.json (default: ${REMOTE_ROOT_ENVIRONMENT}, "
        f"else {DEFAULT_REMOTE_ROOT})",
    )
    parser.add_argument(
        "--with-docs", action="store_true",
        help=f"also fetch {DOCS_FILE} and {DOCS_SIDECAR_FILE} (the export's documents) into the output "
        "root, checking the sha256; without --variant, only these",
    )
    args = parser.parse_args(argv)
    if args.train_shards is not None and args.train_shards < 0:
        parser.error(f"--train-shards {args.train_shards}: must be 0 or more")
    if args.variant is None and not args.with_docs:
        parser.error(f"--variant is required ({VARIANT_FORMS}), unless --with-docs fetches the documents only")
    if args.variant is None and args.train_shards is not None:
        parser.error("--train-shards needs --variant")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Checked before any network use: a typo should not wait for the hub.
        if args.variant is not None:
            parse_variant(args.variant)
        source = make_source(args.repo_id, args.remote_root)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, value in HUB_TIMEOUT_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    try:
        importlib.import_module("huggingface_hub")  # only this script needs it, so it is checked here
    except ImportError:
        print(f"error: huggingface_hub is not installed: pip install huggingface_hub ({OFFLINE_HINT})", file=sys.stderr)
        return 2
    try:
        check_hub_reachable(source)
        fetch = hub_fetcher(source)
        if args.variant is not None:
            download(args.variant, args.train_shards, args.output_root, fetch, source=source)
        if args.with_docs:
            download_docs(args.output_root, fetch, source=source)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err.filename or 'file system'}: {err.strerror or err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
