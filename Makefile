# Two set-up-and-go targets for a fresh clone (see README.md):
#   make demo   the main job: writes under runs/ only, never a tracked file
#   make test   the test suite
# Both create ./.venv on first use and install the package with its test extras into it.
# Refreshing the checked-in reports is its own command (after the study has run under runs/STUDY):
#   make report-quickstart              reports/quickstart-cpu from runs/quickstart (what `make demo` ran)
#   make report STUDY=caw_ablation      reports/caw_ablation-cpu from runs/caw_ablation
#   make reports-index                  reports/README.md from every report folder

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv clean report report-quickstart reports-index

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The quickstart study (all seven methods on Fashion-MNIST, cpu scale) and its report, both under
# runs/quickstart/; the report command ends by printing where the report is, the ranking at this scale, how
# far the scale is from the paper's budget and how to run the paper scale.
demo: $(STAMP)
	$(BIN)/cawbench study run quickstart --scale cpu --out-dir runs/quickstart
	$(BIN)/cawbench report quickstart --scale cpu --out-dir runs/quickstart

# Re-render a checked-in report from the runs of its study (which must have run: `cawbench study run STUDY
# --scale cpu --out-dir runs/STUDY`), then the index.
STUDY ?= quickstart
report: $(STAMP)
	$(BIN)/cawbench report $(STUDY) --scale cpu --out-dir runs/$(STUDY) --out reports/$(STUDY)-cpu
	$(BIN)/cawbench report --index reports

report-quickstart:
	$(MAKE) report STUDY=quickstart

reports-index: $(STAMP)
	$(BIN)/cawbench report --index reports

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/python -m ruff check . && $(BIN)/python -m ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
