# The two commands of the README: `make demo` and `make test`.
PY        ?= python3
VENV      ?= .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
DATA_DIR  := /usr/share/datasets/fashion-mnist

.PHONY: demo test setup data clean bench lint format mutate

demo: setup data            ## set everything up and run the full pipeline on Fashion-MNIST
	$(VENV)/bin/norm-pipeline run -c pipeline.yaml

test: setup data lint       ## set everything up, lint, and run the test suite
	$(VPY) -m pytest -q

lint: setup                 ## ruff (pyflakes, pycodestyle, import order, bugbear); mypy on models/ and pipeline/
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: setup               ## sort imports (ruff's isort rules); `ruff format` is not adopted yet: see docs/development.md
	$(VENV)/bin/ruff check --select I --fix .

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

data:                       ## Debian's dataset-fashion-mnist, the embedded default dataset
	@bash scripts/install_data.sh

bench: setup data
	$(VPY) benchmarks/train_step.py

mutate: setup data          ## mutation testing (slow, not part of `make test`): MUTATE_ARGS="io graph- -j 2" selects
	$(VPY) scripts/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf runs .pytest_cache
