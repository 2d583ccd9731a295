"""Re-export one trained model at several quantisation settings and compressors, and score each.

A training run with FLOAT_WEIGHTS_PATH set writes its final unquantised weights, its JEPA head
(when exported) and its GPTQ Hessians (QUANT=gptq). This script exports those same weights once
per (QUANT, MATRIX_BITS, EMBED_BITS), evaluates each roundtrip on the run's validation tokens,
and measures the artifact's bytes under every compressor, so the settings are compared on one
set of weights rather than across runs:

    python3 scripts/export_study.py /path/run.float.pt --quant clip,gptq --matrix-bits 6,5 \
        --embed-bits 8,7 --compressors lzma,brotli,zstd --out campaign/bench/export_study.json

The roundtrip gap is the roundtrip val_bpb minus the unquantised weights' val_bpb, both with
plain (non-sliding) windows as the trainer's roundtrip line. Budgets are not enforced: every
variant is exported as asked, so bytes compare like for like.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train_gpt_jepa as T  # noqa: E402


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("float_weights", type=Path, help="the file a run wrote to FLOAT_WEIGHTS_PATH")
    parser.add_argument("--quant", type=comma_list, default=["clip", "gptq"])
    parser.add_argument("--matrix-bits", type=comma_list, default=["6", "5"])
    parser.add_argument("--embed-bits", type=comma_list, default=["8"])
    parser.add_argument("--compressors", type=comma_list, default=list(T.COMPRESSORS))
    parser.add_argument("--data-path", default=None, help="default: the run's DATA_PATH")
    parser.add_argument("--tokenizer-path", default=None, help="default: the run's TOKENIZER_PATH")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    return parser.parse_args(argv)


def load_run(path: Path, data_path: str | None, tokenizer_path: str | None) -> tuple[T.Hyperparameters, dict]:
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: train with FLOAT_WEIGHTS_PATH={path} first")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    fields = {field.name for field in dataclasses.fields(T.Hyperparameters)}
    stored = {name: value for name, value in payload["hyperparameters"].items() if name in fields}
    hp = T.Hyperparameters(**stored)
    overrides = {"data_path": data_path, "tokenizer_path": tokenizer_path}
    hp = dataclasses.replace(hp, **{name: value for name, value in overrides.items() if value is not None})
    return hp, payload


def study(args: argparse.Namespace) -> dict:
    hp, payload = load_run(args.float_weights, args.data_path, args.tokenizer_path)
    for name in args.compressors:
        T.compressor_module(name)
    runtime = T.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), autocast_dtype=None,
                        compile=False, model_dtype=torch.float32)
    luts = T.build_bpb_luts(T.load_tokenizer(hp), hp.vocab_size, runtime.device)
    val_tokens = T.load_validation_tokens(T.find_shards(hp.data_path, "val"), hp.train_seq_len, hp.vocab_size,
                                          hp.val_max_tokens)
    model = T.build_eval_model(hp, runtime, payload["state_dict"], compiled=False)
    float_loss, float_bpb = T.evaluate_bpb(model, val_tokens, hp.train_seq_len, hp.val_batch_size, luts, runtime)
    print(f"unquantised: val_loss {float_loss:.6f} val_bpb {float_bpb:.6f}", flush=True)
    head = None
    if payload["head_state_dict"]:
        head = T.JepaHead(hp)
        head.load_state_dict(payload["head_state_dict"])
    hessians = payload["hessians"]
    rows = []
    for quant in args.quant:
        if quant == "gptq" and not hessians:
            raise SystemExit("error: the run wrote no Hessians (it trained with QUANT=clip): drop gptq from --quant")
        for matrix_bits in map(int, args.matrix_bits):
            for embed_bits in map(int, args.embed_bits):
                variant = dataclasses.replace(hp, quant=quant, matrix_bits=matrix_bits, embed_bits=embed_bits,
                                              compressor="lzma", artifact_budget_bytes=10**12)
                started = time.perf_counter()
                artifact = T.export_artifact(model, variant, 0, print, hessians if quant == "gptq" else None, head)
                export_seconds = time.perf_counter() - started
                with tempfile.TemporaryDirectory() as folder:
                    artifact_path = Path(folder) / "study.ptz"
                    artifact_path.write_bytes(artifact)
                    stored = T.read_artifact(artifact_path)
                raw = T.decompress_bytes(artifact[T.ARTIFACT_HEADER.size:], "lzma")
                sizes = {name: T.ARTIFACT_HEADER.size + len(T.compress_bytes(raw, name, hp.lzma_preset))
                         for name in args.compressors}
                roundtrip = T.build_eval_model(hp, runtime, stored["state_dict"], compiled=False)
                loss, bpb = T.evaluate_bpb(roundtrip, val_tokens, hp.train_seq_len, hp.val_batch_size, luts, runtime)
                row = {"quant": quant, "matrix_bits": matrix_bits, "embed_bits": embed_bits,
                       "roundtrip_val_loss": loss, "roundtrip_val_bpb": bpb, "gap_bpb": bpb - float_bpb,
                       "artifact_bytes": sizes, "raw_bytes": len(raw), "export_seconds": round(export_seconds, 2)}
                rows.append(row)
                print(f"{quant} int{matrix_bits} embed int{embed_bits}: roundtrip {bpb:.6f} gap {bpb - float_bpb:+.6f} "
                      + " ".join(f"{name} {size:,}" for name, size in sizes.items())
                      + f" (export {export_seconds:.1f}s)", flush=True)
    trainer_sha = hashlib.sha256((REPO_ROOT / "train_gpt_jepa.py").read_bytes()).hexdigest()
    return {"float_weights": str(args.float_weights), "float_val_loss": float_loss, "float_val_bpb": float_bpb,
            "val_tokens": val_tokens.numel() - 1, "jepa_head": head is not None,
            "exporting_trainer_sha256": trainer_sha, "torch": torch.__version__, "rows": rows}


def markdown_table(result: dict) -> str:
    compressors = list(result["rows"][0]["artifact_bytes"]) if result["rows"] else []
    lines = ["| quant | matrices | tables | roundtrip val_bpb | gap | " + " | ".join(compressors) + " |",
             "|---|---|---|---|---|" + "---|" * len(compressors)]
    for row in result["rows"]:
        lines.append(f"| {row['quant']} | int{row['matrix_bits']} | int{row['embed_bits']} | "
                     f"{row['roundtrip_val_bpb']:.4f} | {row['gap_bpb']:+.4f} | "
                     + " | ".join(f"{row['artifact_bytes'][name]:,}" for name in compressors) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = study(args)
    except T.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(result))
    if args.out is not None:
        T.write_atomically(args.out, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
