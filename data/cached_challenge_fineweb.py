"""
cached_challenge_fineweb.py: download the official Parameter Golf FineWeb export (needs network).

    python3 data/cached_challenge_fineweb.py --variant sp1024                  # every listed shard
    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10

The challenge publishes its tokenised FineWeb on the Hugging Face hub (dataset repo
willdepueoai/parameter-golf, folder `datasets/`, described by its manifest.json). This script
reads that manifest, downloads the val shards, the first N train shards and the tokenizer, and
lays them out as the challenge's own scripts do:

    data/datasets/fineweb10B_sp1024/fineweb_{train,val}_NNNNNN.bin
    data/tokenizers/fineweb_1024_bpe.model (+ .vocab)

plus data/datasets/fineweb10B_sp1024/manifest.json (token counts, tokenizer sha256, source)
and hub_manifest.json (the remote manifest as downloaded). Files already present and intact
are not downloaded again. Without network it stops within seconds and points to
data/build_local_corpus.py, which builds a dataset in the same format from local text.

huggingface_hub is imported inside main() only: the rest of the repository never needs it.
"""

import argparse
import hashlib
import json
import os
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

# The same environment overrides as parameter-golf's own downloader, for mirrors and forks.
REPO_ID = os.environ.get("MATCHED_FINEWEB_REPO_ID", "willdepueoai/parameter-golf")
REMOTE_ROOT = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets")
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_OUTPUT_ROOT = Path(__file__).resolve().parent  # the repository's data/ folder

# Variants whose local layout we know: the dataset folder and the tokenizer model's file name.
VARIANTS = {
    "sp1024": {"dataset": "fineweb10B_sp1024", "tokenizer_model": "fineweb_1024_bpe.model"},
}

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_BYTES = 256 * 4

PROBE_TIMEOUT_SECONDS = 10
OFFLINE_HINT = "without network build a local corpus: python3 data/build_local_corpus.py"

# hf_hub_download's default timeouts and retries can hang for minutes without network; these
# must be set before huggingface_hub is imported, which reads them once.
HUB_TIMEOUT_ENVIRONMENT = {"HF_HUB_ETAG_TIMEOUT": "10", "HF_HUB_DOWNLOAD_TIMEOUT": "60"}

# fetch(remote path relative to REMOTE_ROOT, staging folder) -> path of the downloaded file
Fetch = Callable[[str, Path], Path]


class DownloadError(Exception):
    """A problem main() reports as one 'error: ...' line, exit status 2."""


# =============================================================================
# MANIFEST: which files make up a variant
# =============================================================================


@dataclass(frozen=True)
class DownloadItem:
    remote: str  # path relative to REMOTE_ROOT, e.g. datasets/fineweb10B_sp1024/fineweb_val_000000.bin
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


def local_path_for(remote: str, output_root: Path) -> Path:
    """Remote datasets/... and tokenizers/... map onto the same folders under the output root."""
    parts = Path(remote).parts
    if len(parts) < 2 or parts[0] not in ("datasets", "tokenizers") or ".." in parts:
        raise DownloadError(f"unexpected manifest shape: file path {remote!r} is not under datasets/ or tokenizers/")
    return output_root.joinpath(*parts)


DEFAULT_TRAIN_SHARDS = 80


def plan_downloads(manifest: object, variant: str, train_shards: int | None, output_root: Path) -> list[DownloadItem]:
    """The files to fetch for a variant: val shards, the first train shards, the tokenizer.

    The manifest lists datasets (name, tokenizer_name, stats.files_train/files_val) and
    tokenizers (name, model_path, vocab_path), paths relative to the export's root.
    """
    dataset_name = VARIANTS[variant]["dataset"]
    tokenizer_model = VARIANTS[variant]["tokenizer_model"]
    if not isinstance(manifest, dict):
        raise DownloadError("unexpected manifest shape: not a JSON object")
    dataset_entry = find_entry(manifest.get("datasets"), "name", dataset_name)
    if dataset_entry is None:
        raise DownloadError(f"unexpected manifest shape: no dataset named {dataset_name} in its 'datasets' list")
    available_train = manifest_count(dataset_entry, "files_train")
    available_val = manifest_count(dataset_entry, "files_val")
    if train_shards is None:
        # The challenge's default download: 80 shards (8B tokens), or all when fewer exist.
        train_shards = min(DEFAULT_TRAIN_SHARDS, available_train)
    if train_shards > available_train:
        raise DownloadError(
            f"--train-shards {train_shards}: {dataset_name} has {available_train} train shards on {REPO_ID}"
        )

    tokenizer_entry = find_entry(manifest.get("tokenizers"), "name", dataset_entry.get("tokenizer_name"))
    if tokenizer_entry is None:
        # No name link: fall back to the entry whose model file is the one this variant uses.
        candidates = manifest.get("tokenizers") if isinstance(manifest.get("tokenizers"), list) else []
        tokenizer_entry = next(
            (e for e in candidates if isinstance(e, dict) and str(e.get("model_path", "")).endswith(tokenizer_model)),
            None,
        )
    # The keys parameter-golf's own downloader reads for a tokenizer's files.
    tokenizer_files = [
        tokenizer_entry[key]
        for key in ("model_path", "vocab_path", "path")
        if tokenizer_entry is not None and isinstance(tokenizer_entry.get(key), str) and tokenizer_entry[key]
    ]
    if not any(remote.endswith(".model") for remote in tokenizer_files):
        raise DownloadError(f"unexpected manifest shape: no tokenizer .model file listed for {dataset_name}")

    items = [
        DownloadItem(remote, local_path_for(remote, output_root), is_shard=True)
        for remote in [f"datasets/{dataset_name}/fineweb_val_{i:06d}.bin" for i in range(available_val)]
        + [f"datasets/{dataset_name}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
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


def is_complete(item: DownloadItem) -> bool:
    if not item.local.is_file():
        return False
    if item.is_shard:
        return shard_token_count(item.local) is not None
    return item.local.stat().st_size > 0


def download(
    variant: str, train_shards: int | None, output_root: Path, fetch: Fetch, log: Callable[[str], None] = print
) -> dict:
    """Fetch the manifest and the variant's files; write the local manifest; return it."""
    dataset_dir = output_root / "datasets" / VARIANTS[variant]["dataset"]
    # Staging inside the output root: the final move is then a rename on one filesystem.
    staging = output_root / "datasets" / ".hub_download"
    try:
        dataset_dir.mkdir(parents=True, exist_ok=True)
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"output not writable: {err.filename} ({err.strerror or err})") from None

    log(f"manifest: {REPO_ID} {REMOTE_ROOT}/manifest.json")
    manifest_file = fetch("manifest.json", staging)
    try:
        remote_manifest = json.loads(Path(manifest_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DownloadError(f"unexpected manifest: {REMOTE_ROOT}/manifest.json is not JSON ({err})") from None
    items = plan_downloads(remote_manifest, variant, train_shards, output_root)

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
    model_path = next(i.local for i in items if not i.is_shard and i.local.suffix == ".model")
    manifest = {
        "name": dataset_dir.name,
        "created_by": "data/cached_challenge_fineweb.py",
        "source": {"repo_id": REPO_ID, "repo_type": "dataset", "remote_root": REMOTE_ROOT, "variant": variant},
        "splits": {
            split: {
                "documents": None,  # not recorded by the export; counting BOS would read every shard
                "tokens": sum(shard_token_count(path) or 0 for path in paths),
                "shards": [path.name for path in paths],
            }
            for split, paths in shards.items()
        },
        "tokenizer": {
            "path": model_path.relative_to(output_root).as_posix(),
            "sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
            "trained": False,
        },
    }
    (dataset_dir / "hub_manifest.json").write_text(json.dumps(remote_manifest, indent=2) + "\n", encoding="utf-8")
    (dataset_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log(
        f"done in {time.perf_counter() - started:.0f} s: {dataset_dir} "
        f"(train {len(shards['train'])} shards, {manifest['splits']['train']['tokens']:,} tokens; "
        f"val {len(shards['val'])} shards, {manifest['splits']['val']['tokens']:,} tokens), tokenizer {model_path}"
    )
    return manifest


# =============================================================================
# HUB: reachability check and the huggingface_hub fetch
# =============================================================================


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def check_hub_reachable() -> None:
    """Fail in seconds without network: hf_hub_download would retry with back-off for ~25 s."""
    endpoint = hub_endpoint()
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise DownloadError(f"HF_HUB_OFFLINE is set, the hub cannot be used; {OFFLINE_HINT}")
    request = urllib.request.Request(f"{endpoint}/api/datasets/{REPO_ID}", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_SECONDS):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered (perhaps 401/404): reachable, hf_hub_download reports the rest
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot reach the Hugging Face hub at {endpoint} ({reason}); {OFFLINE_HINT}") from None


def hub_fetch(remote: str, staging: Path) -> Path:
    from huggingface_hub import hf_hub_download  # imported by main() first, with a clear error

    try:
        return Path(
            hf_hub_download(
                repo_id=REPO_ID, repo_type="dataset", filename=f"{REMOTE_ROOT}/{remote}", local_dir=staging
            )
        )
    except Exception as err:  # huggingface_hub's error classes differ between its versions
        kind = type(err).__name__
        detail = str(err).strip().splitlines()[0] if str(err).strip() else kind
        if kind == "LocalEntryNotFoundError" or "Connect" in kind or "Timeout" in kind:
            raise DownloadError(f"cannot reach the Hugging Face hub ({detail}); {OFFLINE_HINT}") from None
        if "NotFound" in kind:
            raise DownloadError(f"{REMOTE_ROOT}/{remote} not found in the dataset repo {REPO_ID} ({kind})") from None
        raise DownloadError(f"downloading {REMOTE_ROOT}/{remote} failed ({kind}: {detail})") from None


# =============================================================================
# COMMAND LINE
# =============================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=f"Download the official Parameter Golf FineWeb shards and tokenizer from {REPO_ID}.",
        epilog=f"No network? {OFFLINE_HINT}",
    )
    parser.add_argument("--variant", required=True, choices=sorted(VARIANTS), help="tokenizer family")
    parser.add_argument(
        "--train-shards", type=int, default=None,
        help=f"number of train shards (100M tokens each) to fetch (default: {DEFAULT_TRAIN_SHARDS}, "
        "the challenge's default, or all when fewer exist)",
    )
    parser.add_argument(
        "--output-root", type=Path, default=DEFAULT_OUTPUT_ROOT,
        help="folder that receives datasets/ and tokenizers/ (default: this script's folder, data/)",
    )
    args = parser.parse_args(argv)
    if args.train_shards is not None and args.train_shards < 0:
        parser.error(f"--train-shards {args.train_shards}: must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name, value in HUB_TIMEOUT_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    try:
        import huggingface_hub  # noqa: F401  (only this script needs it)
    except ImportError:
        print(f"error: huggingface_hub is not installed: pip install huggingface_hub ({OFFLINE_HINT})", file=sys.stderr)
        return 2
    try:
        check_hub_reachable()
        download(args.variant, args.train_shards, args.output_root, hub_fetch)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err.filename or 'file system'}: {err.strerror or err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
