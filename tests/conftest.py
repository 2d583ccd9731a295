"""Shared test fixtures: repository paths and the official challenge tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# The official sp1024 tokenizer: OFFICIAL_TOKENIZER_PATH, else ../shared/tokenizers beside the
# clone (as in CI), else the challenge's own download location inside the repository.
_OFFICIAL_TOKENIZER_CANDIDATES = [
    os.environ.get("OFFICIAL_TOKENIZER_PATH", ""),
    str(REPO_ROOT.parent / "shared" / "tokenizers" / "fineweb_1024_bpe.model"),
    str(REPO_ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"),
]


# ---------------------------------------------------------------------------
# Two workers (make test runs pytest-xdist with --dist loadgroup)
# ---------------------------------------------------------------------------

# Test files that share the session-scoped `ab_run` fixture: one worker takes them all, so the
# tiny A/B trains once. Every other file is a group of its own, so its module-scoped fixtures
# are built once too.
AB_RUN_MODULES = ("test_ab", "test_make_record")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "xdist_group(name): tests that one pytest-xdist worker runs together")
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        use_session_inductor_cache(config)  # the controller (or a run without xdist): workers inherit it
    else:
        # One torch thread per worker (the trainer subprocesses already get OMP_NUM_THREADS=1):
        # two workers of two threads each on two cores spin against each other.
        import torch

        torch.set_num_threads(1)
    use_scalar_compiled_kernels()


# Compiled test runs generate scalar C++ kernels rather than vectorised ones. What these runs
# check (a graph break under fullgraph, a dtype mix under autocast, a recompile after priming, a
# compiled graph that disagrees with eager) is decided before code generation; the vector width
# is the CPU backend's own choice, which a GPU run never makes, and scalar kernels take about a
# quarter less time to generate and build (a compiled span run: 138 s against 180 s). In-process
# through inductor's config; in a trainer subprocess through ATEN_CPU_CAPABILITY=default
# (trainer_env sets it for COMPILE=1 runs).
SCALAR_KERNELS_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "default"}


def use_scalar_compiled_kernels() -> None:
    import torch._inductor.config

    torch._inductor.config.cpp.simdlen = 0  # no vector ISA has width 0: scalar code


def use_session_inductor_cache(config: pytest.Config) -> None:
    """One inductor cache for every compiled run of the session, in-process or in a subprocess, on
    either worker (they inherit the environment of the process that starts them), new in every
    session and removed after it. A later run reuses the kernels an earlier one compiled in this
    session (the backbone's, the evaluation's) but still traces and lowers each of its own graphs,
    which is where graph breaks and dtype errors arise; nothing is served from an old session."""
    import shutil
    import tempfile

    cache = tempfile.mkdtemp(prefix="test_inductor_cache_")
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache

    def remove_cache() -> None:
        shutil.rmtree(cache, ignore_errors=True)
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous

    config.add_cleanup(remove_cache)


# First: pytest-xdist's own hook (on each worker) reads these markers to name the groups.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        item.add_marker(pytest.mark.xdist_group("ab_run" if module in AB_RUN_MODULES else module))


@pytest.fixture(scope="session")
def official_tokenizer_path() -> Path:
    for candidate in _OFFICIAL_TOKENIZER_CANDIDATES:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.skip(
        "official fineweb_1024_bpe.model not found: set OFFICIAL_TOKENIZER_PATH or run "
        "data/cached_challenge_fineweb.py --variant sp1024"
    )


# ---------------------------------------------------------------------------
# A small corpus with a trained tokenizer, shared by the trainer's tests
# ---------------------------------------------------------------------------

TRAINER_PATH = REPO_ROOT / "train_gpt_jepa.py"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """~250k tokens of Python documentation, sp1024 BPE trained on them (a few seconds)."""
    sys.path.insert(0, str(REPO_ROOT / "data"))
    import build_local_corpus

    root = tmp_path_factory.mktemp("corpus")
    documents = build_local_corpus.python_documentation()[:3000]
    build_local_corpus.build_corpus(documents=documents, name="test_sp1024", output_root=root,
                                    vocab_size=1024, val_docs=300, log=lambda message: None)
    return {"data_path": root / "datasets" / "test_sp1024",
            "tokenizer_path": root / "tokenizers" / "test_sp1024_bpe.model"}


def environment_without_trainer_settings() -> dict[str, str]:
    """The caller's environment minus every trainer hyperparameter and PRESET: what a subprocess
    that launches the trainer (directly or through scripts/ab.py) may inherit."""
    import train_gpt_jepa

    ours = {field.upper() for field in train_gpt_jepa.Hyperparameters.__dataclass_fields__}
    return {key: value for key, value in os.environ.items() if key not in ours and key != "PRESET"}


def trainer_env(dataset: dict[str, Path], **overrides: object) -> dict[str, str]:
    """A hermetic environment for a trainer subprocess: the tiny preset shrunk to seconds, no
    stray hyperparameters from the caller's shell, one thread per process."""
    env = environment_without_trainer_settings()
    env.update({
        "PRESET": "tiny", "DATA_PATH": str(dataset["data_path"]), "TOKENIZER_PATH": str(dataset["tokenizer_path"]),
        "ITERATIONS": "8", "MAX_WALLCLOCK_SECONDS": "0", "WARMDOWN_ITERS": "0", "TRAIN_BATCH_TOKENS": "2048",
        "GRAD_ACCUM_STEPS": "1", "VAL_LOSS_EVERY": "0", "VAL_MAX_TOKENS": "4096", "EVAL_STRIDE": "0",
        # One validation batch of 16 windows: the preset's batch of 128 would pad 4,096 tokens out
        # to 32,768 (every batch has one shape, for compile) and score 8x the work for nothing.
        "VAL_BATCH_SIZE": "4096",
        "TRAIN_LOG_EVERY": "1", "JEPA_WARMUP_STEPS": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
    })
    env.update({key: str(value) for key, value in overrides.items()})
    if env.get("COMPILE") == "1":
        env = {**SCALAR_KERNELS_ENVIRONMENT, **env}
    return env


def tiny_hyperparameters(dataset: dict[str, Path], **overrides: object):
    """The same configuration as trainer_env, resolved in-process."""
    import train_gpt_jepa

    env = {key: value for key, value in trainer_env(dataset, **overrides).items()
           if key.upper() in {f.upper() for f in train_gpt_jepa.Hyperparameters.__dataclass_fields__} or key == "PRESET"}
    return train_gpt_jepa.load_hyperparameters(env)


def cpu_runtime(compile: bool = False, autocast_dtype=None):
    import torch
    import train_gpt_jepa

    # MODEL_DTYPE=auto: the embedding tables take the compute dtype, as setup_runtime resolves it.
    return train_gpt_jepa.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                                  autocast_dtype=autocast_dtype, compile=compile,
                                  model_dtype=autocast_dtype or torch.float32)


# ---------------------------------------------------------------------------
# A tiny A/B, run once per session: 2 arms x 2 seeds, 4 steps each (tests of ab.py and make_record.py)
# ---------------------------------------------------------------------------

AB_ARMS = ["--arm", "jepa:JEPA_WEIGHT=0.5", "--arm", "vanilla:JEPA_WEIGHT=0"]
AB_COMMON = ["--budget", "steps", "--env", "ITERATIONS=4 VAL_LOSS_EVERY=2"]


def run_ab(argv: list[str], environ: dict[str, str]) -> tuple[int, str, str]:
    """scripts/ab.py's main in this process, its stdout and stderr captured."""
    import contextlib
    import io

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import ab

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = ab.main(argv, environ)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="session")
def ab_run(tiny_dataset, tmp_path_factory) -> dict:
    import json

    root = tmp_path_factory.mktemp("ab")
    environ = trainer_env(tiny_dataset, LOG_DIR=root / "logs")
    argv = AB_ARMS + AB_COMMON + ["--seeds", "1,2", "--out", str(root / "e2e")]
    code, stdout, stderr = run_ab(argv, environ)
    assert code == 0, stdout + stderr
    summaries = {path.stem: json.loads(path.read_text()) for path in (root / "logs").glob("*.json")}
    return {"root": root, "environ": environ, "argv": argv, "out": root / "e2e", "logs": root / "logs",
            "stdout": stdout, "summaries": summaries}
