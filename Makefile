# Two commands on a fresh machine:
#   make demo   - set up .venv and run the built-in demo (1 server + 4 unequal clients, adaptive cuts) into runs/demo/
#   make test   - set up .venv and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first and pinned: the CPU build; a bare "torch" would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
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

clean:
	rm -rf runs .cache
