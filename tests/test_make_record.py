"""scripts/make_record.py: a record folder built from the session's tiny A/B (conftest.ab_run),
its train_gpt.py stripped through the syntax tree and wrapped, and running that file reproducing
a seed of the A/B exactly; the folder passes scripts/check_record.py; bad inputs are refused."""

from __future__ import annotations

import ast
import io
import json
import re
import shutil
import subprocess
import sys
import tokenize

import pytest
from conftest import REPO_ROOT, SCALAR_KERNELS_ENVIRONMENT, environment_without_trainer_settings

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import make_record  # noqa: E402

ROUNDTRIP = re.compile(r"final_int\d+_[a-z]+_roundtrip_exact val_loss:\S+ val_bpb:\S+")
SERIALIZED = re.compile(r"Serialized model (\S+): (\d+) bytes")


def build(ab_run: dict, out_name: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_record.py"), "--ab", str(ab_run["out"]),
                           "--out", str(ab_run["root"] / out_name), *extra],
                          capture_output=True, text=True, timeout=120, env=environment_without_trainer_settings())


@pytest.fixture(scope="module")
def record(ab_run) -> dict:
    result = build(ab_run, "record_jepa", "--arm", "jepa", "--author", "A. Golfer", "--github-id", "agolfer")
    assert result.returncode == 0, result.stderr
    return {"folder": ab_run["root"] / "record_jepa", "stdout": result.stdout}


def test_strip_keeps_the_program_and_drops_docstrings_and_comments():
    source = (REPO_ROOT / "train_gpt_jepa.py").read_text(encoding="utf-8")
    stripped = make_record.strip_source(source, {"PRESET": "tiny", "ITERATIONS": "7"})
    comments = [token for token in tokenize.generate_tokens(io.StringIO(stripped).readline)
                if token.type == tokenize.COMMENT]
    assert not comments
    tree = ast.parse(stripped)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
            assert ast.get_docstring(node) is None
    # The same syntax tree as the original with its docstrings removed and the settings baked in.
    original = ast.parse(source)
    original.body = make_record._drop_docstring(original.body)
    for node in ast.walk(original):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            node.body = make_record._drop_docstring(node.body)
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "BAKED_SETTINGS":
            node.value = ast.Dict([ast.Constant("PRESET"), ast.Constant("ITERATIONS")],
                                  [ast.Constant("tiny"), ast.Constant("7")])
    assert ast.dump(tree) == ast.dump(original)
    assert len(stripped) < 0.8 * len(source)


def test_baked_settings_sit_between_the_preset_and_the_environment(monkeypatch):
    import train_gpt_jepa as T

    monkeypatch.setattr(T, "BAKED_SETTINGS", {"PRESET": "tiny", "ITERATIONS": "7", "JEPA_WEIGHT": "0.25"})
    baked = T.load_hyperparameters({})
    assert baked.preset == "tiny" and baked.iterations == 7 and baked.jepa_weight == 0.25
    assert baked.model_dim == T.PRESETS["tiny"]["MODEL_DIM"]  # the baked preset's defaults apply
    overridden = T.load_hyperparameters({"ITERATIONS": "9"})
    assert overridden.iterations == 9 and overridden.jepa_weight == 0.25


def test_record_folder_holds_what_the_challenge_asks(ab_run, record):
    folder = record["folder"]
    runs = {seed: ab_run["summaries"][f"e2e_jepa_s{seed}"] for seed in (1, 2)}
    assert sorted(path.name for path in folder.iterdir()) == [
        "README.md", "requirements.txt", "submission.json", "train_gpt.py", "train_seed1.log", "train_seed2.log"]
    for seed, summary in runs.items():
        assert (folder / f"train_seed{seed}.log").read_bytes() == (ab_run["logs"] / f"e2e_jepa_s{seed}.txt").read_bytes()
    code = (folder / "train_gpt.py").read_bytes()
    submission = json.loads((folder / "submission.json").read_text())
    assert submission["bytes_code"] == len(code) < 60_000
    assert submission["bytes_total"] == max(s["artifact_bytes"] for s in runs.values()) + len(code)
    assert submission["track"] == "non_record_16mb" and "not 8 GPUs" in submission["track_reason"]
    assert submission["author"] == "A. Golfer" and submission["github_id"] == "agolfer"
    assert submission["seeds"] == [1, 2]
    for seed, summary in runs.items():
        result = submission["seed_results"][str(seed)]
        assert result["val_bpb"] == summary["roundtrip_val_bpb"] and result["steps"] == summary["steps"]
        assert result["artifact_bytes"] == summary["artifact_bytes"]
    assert submission["val_bpb"] == pytest.approx(sum(s["roundtrip_val_bpb"] for s in runs.values()) / 2, abs=1e-15)
    assert submission["score_line"] == runs[1]["roundtrip_line"]
    assert submission["settings"]["JEPA_WEIGHT"] == "0.5" and "SEED" not in submission["settings"]
    assert (folder / "requirements.txt").read_text().split() == ["brotli", "numpy", "sentencepiece", "torch>=2.5"]
    readme = (folder / "README.md").read_text()
    assert "SEED=1 python3 train_gpt.py" in readme and "non_record_16mb" in readme and "| 2 |" in readme


def test_check_record_passes_on_the_folder_and_fails_on_a_tampered_copy(ab_run, record):
    checker = [sys.executable, str(REPO_ROOT / "scripts" / "check_record.py")]
    result = subprocess.run(checker + [str(record["folder"])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    tampered = ab_run["root"] / "record_tampered"
    shutil.copytree(record["folder"], tampered)
    submission = json.loads((tampered / "submission.json").read_text())
    submission["seed_results"]["2"]["val_bpb"] -= 0.01
    (tampered / "submission.json").write_text(json.dumps(submission))
    result = subprocess.run(checker + [str(tampered)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "seed 2" in result.stdout


def test_the_folders_train_gpt_reproduces_a_seed(ab_run, record, tmp_path):
    # Nothing but SEED set: the A/B's settings (data paths included) are baked into the file.
    environment = {**environment_without_trainer_settings(), "SEED": "1", "OMP_NUM_THREADS": "1"}
    shutil.copy(record["folder"] / "train_gpt.py", tmp_path / "train_gpt.py")
    result = subprocess.run([sys.executable, "train_gpt.py"], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    original = (ab_run["logs"] / "e2e_jepa_s1.txt").read_text()
    assert ROUNDTRIP.search(result.stdout).group(0) == ROUNDTRIP.search(original).group(0)
    assert SERIALIZED.search(result.stdout).groups() == SERIALIZED.search(original).groups()
    wrapper_bytes = (tmp_path / "train_gpt.py").stat().st_size
    assert f"Code size: {wrapper_bytes} bytes" in result.stdout
    log = next((tmp_path / "logs").glob("*.txt")).read_text()
    decoded = log.split("=" * 100, 1)[0]
    assert "BAKED_SETTINGS: dict[str, str] = {" in decoded and "b85decode" not in decoded


def test_compiled_bf16_runs_agree_between_trainer_and_record_file(tiny_dataset, tmp_path):
    settings = {"PRESET": "tiny", "DATA_PATH": str(tiny_dataset["data_path"]),
                "TOKENIZER_PATH": str(tiny_dataset["tokenizer_path"]), "ITERATIONS": "2", "WARMUP_STEPS": "1",
                "TRAIN_BATCH_TOKENS": "1024", "NUM_LAYERS": "2", "XSA_LAST_N": "1", "VAL_LOSS_EVERY": "0",
                "VAL_MAX_TOKENS": "1024", "EVAL_STRIDE": "0", "MAX_WALLCLOCK_SECONDS": "0", "QAT_START_FRACTION": "0",
                "COMPILE": "1", "COMPUTE_DTYPE": "bfloat16", "COMPRESSOR": "lzma", "GRAD_ACCUM_STEPS": "1"}
    source = (REPO_ROOT / "train_gpt_jepa.py").read_text(encoding="utf-8")
    (tmp_path / "train_gpt.py").write_text(make_record.wrap_source(make_record.strip_source(source, settings), "t"))
    # The session's inductor cache (tests/conftest.py) comes with the environment.
    environment = {**environment_without_trainer_settings(), **SCALAR_KERNELS_ENVIRONMENT, "SEED": "3",
                   "OMP_NUM_THREADS": "1"}
    outputs = []
    for script in (tmp_path / "train_gpt.py", REPO_ROOT / "train_gpt_jepa.py"):
        extra = {} if script.name == "train_gpt.py" else settings
        result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env={**environment, **extra},
                                capture_output=True, text=True, timeout=480)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout)
    assert "compile:True" in outputs[0] and "final_int6_lzma_roundtrip_exact" in outputs[0]
    assert ROUNDTRIP.search(outputs[0]).group(0) == ROUNDTRIP.search(outputs[1]).group(0)
    assert SERIALIZED.search(outputs[0]).groups() == SERIALIZED.search(outputs[1]).groups()


@pytest.mark.parametrize("extra, message", [
    (["--arm", "nope", "--author", "a", "--github-id", "b"], "not an arm"),
    (["--arm", "jepa", "--author", "a"], "--github-id"),
])
def test_refusals_are_one_line_and_write_nothing(ab_run, extra, message):
    result = build(ab_run, "refused", *extra)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and not (ab_run["root"] / "refused").exists()


def test_refuses_runs_of_another_trainer_and_a_used_folder(ab_run, record):
    result = build(ab_run, "record_jepa", "--arm", "jepa", "--draft")
    assert result.returncode == 2 and "not an empty folder" in result.stderr
    copy = ab_run["root"] / "foreign_ab"
    shutil.copytree(ab_run["out"], copy)
    logs = ab_run["root"] / "foreign_logs"
    shutil.copytree(ab_run["logs"], logs)
    plan = json.loads((copy / "plan.json").read_text())
    plan["log_dir"] = str(logs)
    (copy / "plan.json").write_text(json.dumps(plan))
    summary = json.loads((logs / "e2e_jepa_s2.json").read_text())
    summary["code_sha256"] = "0" * 64
    (logs / "e2e_jepa_s2.json").write_text(json.dumps(summary))
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_record.py"), "--ab", str(copy),
                             "--arm", "jepa", "--draft", "--out", str(ab_run["root"] / "foreign_record")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "0" * 64 in result.stderr
    assert not (ab_run["root"] / "foreign_record").exists()


def test_track_is_the_record_track_only_on_eight_gpus_within_ten_minutes():
    def run(**summary):
        base = {"world_size": 8, "device": "cuda NVIDIA H100 80GB HBM3", "train_time_ms": 590_000.0,
                "roundtrip_eval_time_ms": 100_000.0}
        return make_record.ab.Run("a", 1, "r", {}, {}, {**base, **summary}, "ran")

    assert make_record.track_of([run()])[0] == "10min_16mb"
    assert make_record.track_of([run(world_size=1)])[0] == "non_record_16mb"
    track, reason = make_record.track_of([run(), run(train_time_ms=610_000.0)])
    assert track == "non_record_16mb" and "trained 610 s" in reason
    assert make_record.track_of([run(roundtrip_eval_time_ms=700_000.0)])[0] == "non_record_16mb"


def test_the_projects_own_entry_is_a_checked_record_folder():
    # The top-level submission.json and logs/ are make_record.py's --entry output for the record
    # folder kept beside its A/B: the same bytes, exactly the cited logs, and the folder validates.
    submission = json.loads((REPO_ROOT / "submission.json").read_text())
    folder = REPO_ROOT / submission["record_folder"]
    assert (folder / "submission.json").read_bytes() == (REPO_ROOT / "submission.json").read_bytes()
    cited = sorted(f"train_seed{seed}.log" for seed in submission["seeds"])
    assert sorted(path.name for path in (REPO_ROOT / "logs").iterdir()) == cited
    for name in cited:
        assert (REPO_ROOT / "logs" / name).read_bytes() == (folder / name).read_bytes()
    assert submission["bytes_code"] == (folder / "train_gpt.py").stat().st_size
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "check_record.py"), str(folder)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
