"""scripts/check_record.py: valid record folders pass, tampered ones fail naming the problem.

Every folder here is synthetic, written by the test in one of three shapes: ours (what
scripts/make_record.py writes: an lzma+base85 wrapper, train_seed<N>.log opening with the source
and the resolved configuration, submission.json with score_line), the challenge's older records
(plain train_gpt.py, train.log, final_int8_zlib_roundtrip_exact lines, a top-level val_bpb) and
its recent ones (an exec(lzma.decompress(...)) wrapper with raw-LZMA options, a Hyperparameters
block, quantized_ttt_phased scores, seed_results keyed by seed). Nothing is trained.
"""

from __future__ import annotations

import base64
import json
import lzma
import statistics
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import check_record  # noqa: E402

SCRIPT = REPO_ROOT / "scripts" / "check_record.py"
SEPARATOR = "=" * 100

# A stand-in trainer: small, but real Python (the wrapper's payload must compile once decoded).
TRAINER_SOURCE = '''"""A stand-in trainer for the record validator's tests."""
import os


def main() -> None:
    seed = int(os.environ.get("SEED", "1337"))
    print(f"seed:{seed}")


if __name__ == "__main__":
    main()
'''

# seed -> (val_loss, val_bpb, compressed model bytes): three runs of one arm.
OUR_SEEDS = {1: (3.40725503, 1.91886592, 562_076), 2: (3.41313457, 1.92217710, 562_564),
             3: (3.40655955, 1.91847425, 561_984)}
SCORE_LINE = "final_int6_brotli_roundtrip_exact"


# -----------------------------------------------------------------------------
# Writing folders
# -----------------------------------------------------------------------------

def wrap_assignment(source: str) -> str:
    """Our wrapper: TRAINER_SOURCE = lzma.decompress(base64.b85decode("...")) and exec(compile(...))."""
    payload = base64.b85encode(lzma.compress(source.encode("utf-8"), preset=9)).decode("ascii")
    return ("# generated record trainer\n"
            "import base64, lzma\n"
            f'TRAINER_SOURCE = lzma.decompress(base64.b85decode("{payload}")).decode("utf-8")\n'
            'exec(compile(TRAINER_SOURCE, "train_gpt.decoded.py", "exec"))\n')


def wrap_inline_raw_lzma(source: str) -> str:
    """The challenge's recent form: aliased modules, raw LZMA2 with its options as keywords."""
    filters = [{"id": lzma.FILTER_LZMA2}]
    payload = base64.b85encode(lzma.compress(source.encode("utf-8"), format=lzma.FORMAT_RAW, filters=filters))
    return ("import lzma as L,base64 as B\n"
            f'exec(L.decompress(B.b85decode("{payload.decode("ascii")}"),format=L.FORMAT_RAW,'
            'filters=[{"id":L.FILTER_LZMA2}]))\n')


def wrap_zlib_base64(source: str) -> str:
    payload = base64.b64encode(zlib.compress(source.encode("utf-8"))).decode("ascii")
    return f'import base64, zlib\nexec(zlib.decompress(base64.b64decode("{payload}")).decode())\n'


def our_log(seed: int, val_loss: float, val_bpb: float, model_bytes: int, source: str = TRAINER_SOURCE,
            settings: dict[str, str] | None = None, ttt: str = "none") -> str:
    """A log in our trainer's form: source, separator, resolved configuration, run lines, finals.
    ttt: "none", "ran" (TTT=1 and its final line), "missing" (TTT=1 but no final TTT line)."""
    config = {"PRESET": "tiny", "JEPA_WEIGHT": "0.1", "DATA_PATH": "./data/datasets/local_sp1024",
              "TTT": "0" if ttt == "none" else "1", **(settings or {})}
    code_bytes = len(source.encode("utf-8"))
    lines = [source.rstrip("\n"), SEPARATOR, "Running Python 3.11.7, PyTorch 2.5.0, device cpu",
             "resolved configuration:", f"  SEED={seed}", f"  RUN_ID=tiny_s{seed}",
             *(f"  {name}={value}" for name, value in config.items()), SEPARATOR,
             f"run_id:tiny_s{seed} log:logs/tiny_s{seed}.txt",
             f"train_batch_tokens:8192 train_seq_len:256 iterations:100 final_ema:False seed:{seed}",
             "step:100/100 val_loss:3.3000 val_bpb:1.9000 train_time:1000ms step_avg:10.00ms",
             f"Serialized model int6+brotli: {model_bytes} bytes",
             f"Code size: {code_bytes} bytes",
             f"Total submission size int6+brotli: {model_bytes + code_bytes} bytes (budget 16000000, "
             f"headroom {16_000_000 - model_bytes - code_bytes})",
             f"final_int6_brotli_roundtrip val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:5ms",
             f"final_int6_brotli_roundtrip_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}",
             f"final_sliding val_loss:{val_loss - 0.01:.8f} val_bpb:{val_bpb - 0.006:.8f} stride:64 eval_time:9ms"]
    if ttt != "none":
        lines.append("ttt: 4 chunks of ~32768 tokens, epochs:1 lr:0.002 sgd")
    if ttt == "ran":
        lines += [f"final_ttt val_loss:{val_loss - 0.02:.4f} val_bpb:{val_bpb - 0.012:.4f} eval_time:20ms",
                  f"final_ttt_exact val_loss:{val_loss - 0.02:.8f} val_bpb:{val_bpb - 0.012:.8f}"]
    return "\n".join(lines) + "\n"


def write_our_folder(folder: Path, seeds: dict[int, tuple[float, float, int]] = OUR_SEEDS,
                     wrapper: str | None = None) -> Path:
    """A valid folder in scripts/make_record.py's shape."""
    folder.mkdir(parents=True)
    wrapper = wrapper if wrapper is not None else wrap_assignment(TRAINER_SOURCE)
    (folder / "train_gpt.py").write_text(wrapper)
    code_bytes = len(wrapper.encode("utf-8"))
    for seed, (val_loss, val_bpb, model_bytes) in seeds.items():
        (folder / f"train_seed{seed}.log").write_text(our_log(seed, val_loss, val_bpb, model_bytes))
    losses = [figures[0] for figures in seeds.values()]
    scores = [figures[1] for figures in seeds.values()]
    submission = {
        "author": "A. Golfer", "github_id": "agolfer", "name": "train_gpt_jepa vanilla", "blurb": "test",
        "date": "2026-12-01", "track": "non_record_16mb",
        "val_loss": statistics.fmean(losses), "val_bpb": statistics.fmean(scores),
        "val_loss_std": statistics.stdev(losses), "val_bpb_std": statistics.stdev(scores),
        "seeds": list(seeds),
        "seed_results": {str(seed): {"val_loss": loss, "val_bpb": bpb, "artifact_bytes": model, "steps": 100,
                                     "step_avg_ms": 10.0} for seed, (loss, bpb, model) in seeds.items()},
        "bytes_total": max(figures[2] for figures in seeds.values()) + code_bytes, "bytes_code": code_bytes,
        "hardware": "1 x cpu", "pytorch_version": "2.5.0", "score_line": SCORE_LINE,
    }
    (folder / "submission.json").write_text(json.dumps(submission, indent=2))
    (folder / "README.md").write_text("# A record\n")
    (folder / "requirements.txt").write_text("torch\n")
    return folder


def older_challenge_log(seed: int, val_loss: float, val_bpb: float, model_bytes: int, code_bytes: int) -> str:
    """The challenge's early trainer: torchrun warnings, a seed:N line, the raw and int8+zlib sizes."""
    return "\n".join([
        "W0318 14:37:59.159000 871689 torch/distributed/run.py:792] Setting OMP_NUM_THREADS ...",
        "val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path=./data/tokenizers/fineweb_1024_bpe.model",
        "model_params:17059912", f"seed:{seed}",
        "step:0/20000 val_loss:6.9357 val_bpb:4.1077 train_time:0ms step_avg:0.01ms",
        "step:13780/20000 val_loss:2.0606 val_bpb:1.2204 train_time:600038ms step_avg:43.54ms",
        "Serialized model: 67224983 bytes", f"Code size: {code_bytes} bytes",
        f"Total submission size: {67224983 + code_bytes} bytes",
        f"Serialized model int8+zlib: {model_bytes} bytes (payload:17178912 raw_torch:17224025 payload_ratio:3.91x)",
        f"Total submission size int8+zlib: {model_bytes + code_bytes} bytes",
        f"final_int8_zlib_roundtrip val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:1401ms",
        f"final_int8_zlib_roundtrip_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}",
    ]) + "\n"


OLDER_SEEDS = {1337: (2.0727, 1.2244, 15_815_847), 42: (2.0731, 1.2248, 15_816_102),
               7: (2.0719, 1.2239, 15_815_530)}


def write_older_challenge_folder(folder: Path, style: str) -> Path:
    """style: "single" (one train.log, val_bpb at the top only), "keyed" (seed_results by seed),
    "list" (seed_results as a list of objects with a seed), with train_seed<N>.log files."""
    folder.mkdir(parents=True)
    (folder / "train_gpt.py").write_text(TRAINER_SOURCE)
    code_bytes = len(TRAINER_SOURCE.encode("utf-8"))
    seeds = {1337: OLDER_SEEDS[1337]} if style == "single" else OLDER_SEEDS
    for seed, (loss, bpb, model) in seeds.items():
        name = "train.log" if style == "single" else f"train_seed{seed}.log"
        (folder / name).write_text(older_challenge_log(seed, loss + 0.00000123, bpb + 0.00000321, model, code_bytes))
    losses = [figures[0] + 0.00000123 for figures in seeds.values()]
    scores = [figures[1] + 0.00000321 for figures in seeds.values()]
    submission: dict = {"author": "Someone", "github_id": "someone", "name": "Older record", "blurb": "test",
                        "date": "2026-03-18T14:56:29Z", "val_bpb": round(statistics.fmean(scores), 4),
                        "bytes_total": max(figures[2] for figures in seeds.values()) + code_bytes,
                        "bytes_code": code_bytes}
    if style == "keyed":
        submission["seed_results"] = {str(seed): {"val_loss": round(loss, 8), "val_bpb": round(bpb, 8)}
                                      for seed, loss, bpb in zip(seeds, losses, scores)}
        submission["val_bpb_std"] = round(statistics.pstdev(scores), 5)  # ddof=0, as some records print it
    elif style == "list":
        submission["seed_results"] = [{"seed": seed, "val_bpb": round(bpb, 8)} for seed, bpb in zip(seeds, scores)]
    (folder / "submission.json").write_text(json.dumps(submission, indent=2))
    (folder / "README.md").write_text("# An older record\n")
    return folder


def recent_challenge_log(seed: int, val_loss: float, val_bpb: float, model_bytes: int) -> str:
    """The challenge's April trainers: epoch-second prefixes, a Hyperparameters block, code counted
    compressed and uncompressed, quantized / sliding / phased-TTT result lines."""
    lines = ["Hyperparameters:", "  compressor: brotli", "  datasets_dir: /data/fineweb10B_sp8192",
             "  matrix_lr: 0.022", f"  run_id: run{seed}", f"  seed: {seed}", "  ttt_enabled: True",
             "step:4900/20000 val_loss:2.7000 val_bpb:1.0800 train_time:596000ms step_avg:121.60ms",
             "Serialized model: 135417533 bytes", "Code size (uncompressed): 120000 bytes",
             "Code size (compressed): 15000 bytes", f"Serialized model quantized+brotli: {model_bytes} bytes",
             f"Total submission size quantized+brotli: {model_bytes + 15000} bytes",
             f"diagnostic quantized val_loss:{val_loss + 0.03:.8f} val_bpb:{val_bpb + 0.012:.8f} eval_time:9000ms",
             "ttt_phased: total_docs:50000 prefix_docs:2500 suffix_docs:47500 num_phases:3",
             f"quantized_ttt_phased val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} eval_time:500000ms"]
    return "\n".join(f"1776143{seed:03d}.{index:03d} {line}" for index, line in enumerate(lines)) + "\n"


def write_recent_challenge_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    wrapper = wrap_inline_raw_lzma(TRAINER_SOURCE)
    (folder / "train_gpt.py").write_text(wrapper)
    seeds = {42: (2.79788378, 1.08314800, 15_975_827), 0: (2.79517119, 1.08209788, 15_974_299),
             1234: (2.79900000, 1.08313564, 15_972_339)}
    for seed, (loss, bpb, model) in seeds.items():
        (folder / f"train_seed{seed}.log").write_text(recent_challenge_log(seed, loss, bpb, model))
    code_bytes = len(wrapper.encode("utf-8"))
    submission = {"author": "Someone", "github_id": "someone", "name": "Recent record", "date": "2026-04-09",
                  "track": "10min_16mb", "val_bpb": round(statistics.fmean(s[1] for s in seeds.values()), 8),
                  "seeds": list(seeds),
                  "seed_results": {str(seed): {"val_bpb": bpb, "val_loss": loss, "artifact_bytes": model + 15000}
                                   for seed, (loss, bpb, model) in seeds.items()},
                  "bytes_total": max(s[2] for s in seeds.values()) + code_bytes, "bytes_code": code_bytes}
    (folder / "submission.json").write_text(json.dumps(submission, indent=2))
    (folder / "README.md").write_text("# A recent record\n")
    return folder


# -----------------------------------------------------------------------------
# Running the validator
# -----------------------------------------------------------------------------

def run_validator(capsys: pytest.CaptureFixture[str], folder: Path, *options: str) -> tuple[int, list[str]]:
    """main() in this process (fast); returns the exit status and the printed lines."""
    status = check_record.main([str(folder), *options])
    return status, capsys.readouterr().out.splitlines()


def lines_starting(lines: list[str], prefix: str) -> list[str]:
    return [line for line in lines if line.startswith(prefix)]


def assert_all_pass(status: int, lines: list[str]) -> None:
    assert lines_starting(lines, "FAIL") == [], "\n".join(lines)
    assert status == 0
    assert lines[-1].startswith("check_record: ") and ", 0 failed," in lines[-1]


# -----------------------------------------------------------------------------
# Valid folders pass
# -----------------------------------------------------------------------------

def test_our_folder_passes_and_decodes_its_wrapper(tmp_path: Path) -> None:
    folder = write_our_folder(tmp_path / "ours")
    result = subprocess.run([sys.executable, str(SCRIPT), str(folder)], capture_output=True, text=True, timeout=60)
    lines = result.stdout.splitlines()
    assert_all_pass(result.returncode, lines)
    code_line = lines_starting(lines, "PASS code")[0]
    assert "lzma+base85 wrapper" in code_line and f"{len(TRAINER_SOURCE.encode()):,} bytes of source" in code_line
    assert len(lines_starting(lines, "PASS score train_seed")) == 3
    assert any(SCORE_LINE in line for line in lines_starting(lines, "PASS score"))
    # The logs count the trainer that ran, the folder ships the wrapper: both figures are shown.
    size_line = lines_starting(lines, "PASS size train_seed1.log")[0]
    assert "the log counts its code as" in size_line and "the folder ships" in size_line
    assert "ddof=1" in lines_starting(lines, "PASS mean val_bpb")[0]
    assert "same as train_gpt.py's source" in lines_starting(lines, "PASS one code")[0]


@pytest.mark.parametrize("wrap", [wrap_inline_raw_lzma, wrap_zlib_base64], ids=["raw-lzma-keywords", "zlib-base64"])
def test_other_wrapper_forms_decode(tmp_path: Path, capsys: pytest.CaptureFixture[str], wrap) -> None:
    folder = write_our_folder(tmp_path / "ours", wrapper=wrap(TRAINER_SOURCE))
    status, lines = run_validator(capsys, folder)
    assert_all_pass(status, lines)
    assert "wrapper around" in lines_starting(lines, "PASS code")[0]


@pytest.mark.parametrize("style", ["single", "keyed", "list"])
def test_older_challenge_folder_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str], style: str) -> None:
    folder = write_older_challenge_folder(tmp_path / style, style)
    status, lines = run_validator(capsys, folder)
    assert_all_pass(status, lines)
    assert "plain source" in lines_starting(lines, "PASS code")[0]
    assert "no requirements.txt (optional)" in lines_starting(lines, "PASS files")[0]
    assert all("final_int8_zlib_roundtrip_exact" in line for line in lines_starting(lines, "PASS score"))
    if style == "keyed":  # a std printed with ddof=0 is accepted and named
        assert "matches ddof=0" in lines_starting(lines, "PASS mean val_bpb")[0]


def test_recent_challenge_folder_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, lines = run_validator(capsys, write_recent_challenge_folder(tmp_path / "recent"))
    assert_all_pass(status, lines)
    assert "lzma+base85 wrapper around" in lines_starting(lines, "PASS code")[0]
    assert all("quantized_ttt_phased" in line for line in lines_starting(lines, "PASS score"))
    assert "the same" in lines_starting(lines, "PASS one code")[0]


# -----------------------------------------------------------------------------
# Tampered folders fail, naming the problem
# -----------------------------------------------------------------------------

def edit_submission(folder: Path, edit) -> None:
    submission = json.loads((folder / "submission.json").read_text())
    edit(submission)
    (folder / "submission.json").write_text(json.dumps(submission, indent=2))


def test_edited_val_bpb_names_the_seed_and_both_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_our_folder(tmp_path / "ours")
    edit_submission(folder, lambda submission: submission["seed_results"]["2"].update(val_bpb=1.9121771))
    status, lines = run_validator(capsys, folder)
    assert status == 1
    (failure,) = lines_starting(lines, "FAIL score train_seed2.log")
    assert "seed 2" in failure and "1.9121771" in failure and "1.92217710" in failure
    assert lines_starting(lines, "FAIL mean val_bpb"), "the mean no longer matches either"


def test_missing_log_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_our_folder(tmp_path / "ours")
    (folder / "train_seed3.log").unlink()
    status, lines = run_validator(capsys, folder)
    assert status == 1
    (failure,) = lines_starting(lines, "FAIL score seed 3")
    assert "no train log of that seed" in failure
    assert "seed 3" in lines_starting(lines, "FAIL seeds")[0]


def test_code_padding_over_the_budget_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    heavy = {seed: (loss, bpb, 15_950_000 + seed) for seed, (loss, bpb, _) in OUR_SEEDS.items()}
    folder = write_our_folder(tmp_path / "ours", seeds=heavy)
    status, lines = run_validator(capsys, folder)
    assert status == 0, "\n".join(lines)  # fits before the padding
    with (folder / "train_gpt.py").open("a") as code:
        code.write("# " + "x" * 60_000 + "\n")
    status, lines = run_validator(capsys, folder)
    assert status == 1
    over = lines_starting(lines, "FAIL size train_seed")
    assert len(over) == 3 and all("> 16,000,000" in line for line in over)
    assert "bytes_code" in lines_starting(lines, "FAIL size submission.json")[0]


def test_a_run_counted_under_two_seeds_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_our_folder(tmp_path / "ours")
    copied = (folder / "train_seed1.log").read_text()
    (folder / "train_seed2.log").write_text(copied)  # seed 1's run under seed 2's name
    status, lines = run_validator(capsys, folder)
    assert status == 1
    assert "named for seed 2 but ran seed 1" in lines_starting(lines, "FAIL seeds")[0]
    # The same copy with its seed lines edited to agree with the name: the figures give it away.
    (folder / "train_seed2.log").write_text(copied.replace("SEED=1\n", "SEED=2\n").replace("seed:1\n", "seed:2\n"))
    status, lines = run_validator(capsys, folder)
    assert status == 1
    assert "one run counted under two seeds" in lines_starting(lines, "FAIL seeds")[0]


def test_seed_listed_twice_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_our_folder(tmp_path / "ours")
    edit_submission(folder, lambda submission: submission.update(seeds=[1, 2, 2]))
    status, lines = run_validator(capsys, folder)
    assert status == 1
    assert "lists seed 2 more than once" in lines_starting(lines, "FAIL seeds")[0]


def test_corrupt_wrapper_payload_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrapper = wrap_assignment(TRAINER_SOURCE)
    start = wrapper.index('b85decode("') + len('b85decode("') + 40
    corrupt = wrapper[:start] + ("0" * 20) + wrapper[start + 20:]  # still base85, no longer LZMA
    folder = write_our_folder(tmp_path / "ours", wrapper=corrupt)
    status, lines = run_validator(capsys, folder)
    assert status == 1
    assert "payload does not decode" in lines_starting(lines, "FAIL code")[0]


def test_logs_of_different_code_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_our_folder(tmp_path / "ours")
    loss, bpb, model = OUR_SEEDS[2]
    edited_source = TRAINER_SOURCE.replace('"1337"', '"7"')
    (folder / "train_seed2.log").write_text(our_log(2, loss, bpb, model, source=edited_source))
    status, lines = run_validator(capsys, folder)
    assert status == 1
    assert "different source" in lines_starting(lines, "FAIL one code")[0]
    # The same source but another setting: the settings differ (seed, run id and paths aside).
    (folder / "train_seed2.log").write_text(our_log(2, loss, bpb, model, settings={"JEPA_WEIGHT": "0.3"}))
    status, lines = run_validator(capsys, folder)
    assert status == 1
    assert "JEPA_WEIGHT=0.1" in lines_starting(lines, "FAIL one code")[0]


def test_ttt_that_ran_needs_its_final_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_our_folder(tmp_path / "ours")
    loss, bpb, model = OUR_SEEDS[1]
    (folder / "train_seed1.log").write_text(our_log(1, loss, bpb, model, ttt="ran"))
    status, lines = run_validator(capsys, folder)
    assert status == 1  # seed 1's settings now differ (TTT=1): the score line itself passes
    assert "final_ttt_exact" in lines_starting(lines, "PASS score train_seed1.log")[0]
    (folder / "train_seed1.log").write_text(our_log(1, loss, bpb, model, ttt="missing"))
    status, lines = run_validator(capsys, folder)
    assert "TTT ran but the log has no final TTT line" in lines_starting(lines, "FAIL score train_seed1.log")[0]


def test_malformed_submission_is_a_fail_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_our_folder(tmp_path / "ours")
    (folder / "submission.json").write_text('{"val_bpb": 1.2,')
    status, lines = run_validator(capsys, folder)
    assert status == 1
    assert "not valid JSON" in lines_starting(lines, "FAIL files")[0]


# -----------------------------------------------------------------------------
# The challenge's rule: >= 0.005 nats better at p < 0.01
# -----------------------------------------------------------------------------

def test_clearly_better_set_passes_the_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_our_folder(tmp_path / "ours")
    status, lines = run_validator(capsys, folder, "--reference-bpb", "1.95", "--reference-loss", "3.47")
    assert_all_pass(status, lines)
    (rule,) = lines_starting(lines, "PASS rule")
    assert "on per-seed val_loss" in rule and "< 0.01" in rule
    # Without the reference loss the bar is converted to bpb with the submission's own ratio.
    status, lines = run_validator(capsys, folder, "--reference-bpb", "1.95")
    (rule,) = lines_starting(lines, "PASS rule")
    assert "bpb/nat" in rule and status == 0


def test_marginal_set_fails_the_rule_with_its_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_our_folder(tmp_path / "ours")
    mean_loss = statistics.fmean(figures[0] for figures in OUR_SEEDS.values())
    reference_loss = mean_loss + 0.006  # 0.006 nats better on average, but three noisy seeds
    status, lines = run_validator(capsys, folder, "--reference-bpb", "1.93", "--reference-loss", f"{reference_loss:.6f}")
    assert status == 1
    (rule,) = lines_starting(lines, "FAIL rule")
    for figure in ("mean improvement 0.0060", "t = ", "df = 2", "p = ", "not shown"):
        assert figure in rule


def test_fallback_t_distribution_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for t in (-3.0, -0.4, 0.0, 0.7, 2.5, 9.0):
        for df in (1, 2, 5, 30):
            assert check_record.student_t_cdf(t, df) == pytest.approx(float(stats.t.cdf(t, df)), abs=1e-10)


def test_fallback_test_without_scipy_equals_ab_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("scipy")
    values, reference, bar = [3.40725503, 3.41313457, 3.40655955], 3.47, 0.005
    with_scipy = check_record.one_sample_test(values, reference, bar)
    monkeypatch.setitem(sys.modules, "ab_stats", None)  # import ab_stats now raises ImportError
    without_scipy = check_record.one_sample_test(values, reference, bar)
    assert (without_scipy.t, without_scipy.df) == pytest.approx((with_scipy.t, with_scipy.df))
    assert without_scipy.p_value == pytest.approx(with_scipy.p_value, rel=1e-8)
    assert with_scipy.mean_improvement == pytest.approx(reference - statistics.fmean(values))


def test_printed_digits_set_the_tolerance() -> None:
    printed = check_record.PrintedFloat
    assert check_record.figures_agree(printed("1.0728"), printed("1.07280123"))
    assert check_record.figures_agree(printed("1.0728"), printed("1.07284999"))
    assert not check_record.figures_agree(printed("1.0728"), printed("1.07290000"))
    assert not check_record.figures_agree(printed("1.91886592"), printed("1.91886594"))


# -----------------------------------------------------------------------------
# Usage errors: one line, exit status 2, no traceback
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("arguments", [["/no/such/folder"], [], ["{folder}", "--reference-bpb", "abc"],
                                       ["{folder}", "--reference-loss", "-1"], ["{folder}", "--nope"]],
                         ids=["missing-folder", "no-folder", "bad-number", "negative", "unknown-flag"])
def test_usage_errors_exit_2_with_one_line(tmp_path: Path, arguments: list[str]) -> None:
    folder = write_our_folder(tmp_path / "ours")
    command = [sys.executable, str(SCRIPT), *(argument.format(folder=folder) for argument in arguments)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("check_record: error:")
