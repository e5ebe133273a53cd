# Two set-up-and-go targets for a fresh clone (see README.md):
#   make demo   the main job
#   make test   the test suite
# Both create ./.venv on first use and install the package with its test extras into it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The quickstart study (all seven methods on Fashion-MNIST, cpu scale) and its report.
demo: $(STAMP)
	$(BIN)/cawbench study run quickstart --scale cpu --out-dir runs/quickstart
	$(BIN)/cawbench report quickstart --scale cpu --out-dir runs/quickstart --out reports/quickstart-cpu

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/python -m ruff check . && $(BIN)/python -m ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
