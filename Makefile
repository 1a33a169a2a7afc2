# Two commands on a fresh machine:
#   make demo   - set up .venv and run the built-in demo (1 server + 4 unequal clients, adaptive cuts) into runs/demo/
#   make test   - set up .venv and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The versions CI tests with. To opt out and take the newest releases pyproject.toml allows, set it
# empty on a fresh .venv:   rm -rf .venv && make CONSTRAINTS= setup
CONSTRAINTS ?= constraints.txt

.PHONY: demo test setup lint clean constraints

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	# torch first and pinned: the CPU build; a bare "torch" would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=5 -m launch.train torchrun_configs/demo.yaml
	$(BIN)/python -m launch.report runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# Rewrites constraints.txt from what .venv holds (after upgrading a package there on purpose); it
# installs nothing first, which would put the pinned versions back.
constraints:
	grep '^#' constraints.txt > constraints.txt.new
	$(BIN)/pip freeze --exclude-editable | sed 's/+cpu$$//' >> constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf runs .cache
