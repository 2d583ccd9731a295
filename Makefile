# Quickstart: `make demo` (build the local corpus, train the tiny preset) and `make test`.
PYTHON ?= python3
# torch build installed when none is present: the CPU wheel of this version, which avoids
# pulling gigabytes of CUDA packages onto CPU-only machines.
TORCH_VERSION ?= 2.13.0
# Test workers (pytest-xdist): CI has 2 cores. Each test file runs whole on one worker.
TEST_WORKERS ?= 2

.PHONY: install test demo

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	@$(PYTHON) -m pip install -q -r requirements.txt pytest pytest-xdist

test: install
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

demo: install
	@test -f data/datasets/local_sp1024/manifest.json || $(PYTHON) data/build_local_corpus.py
	PRESET=tiny $(PYTHON) train_gpt_jepa.py
