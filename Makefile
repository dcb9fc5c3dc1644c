# knl-train: two commands. `make demo` (the main job) and `make test`. Both bootstrap first.
SHELL := /bin/bash
VENV ?= .venv
KT := $(VENV)/bin/knl-train
PY := $(VENV)/bin/python

# make demo NP=4 DATA=... RUN=...
NP ?= 2
DATA ?= data/demo
RUN ?= runs/demo
DEMO_CONFIG ?= jobs/train/demo.yaml
# More ranks than cores here: share the cores instead of failing (a demo, not a benchmark).
OVERSUBSCRIBE := $(shell [ "$(NP)" -gt "$$(nproc)" ] 2>/dev/null && echo --oversubscribe)

PYTEST_ARGS ?=

.PHONY: help env demo test clean

help:
	@echo "make demo   generate the demo dataset if absent, train on NP=$(NP) ranks with mpirun"
	@echo "make test   run the test suite (real mpirun and Horovod)"
	@echo "make env    bootstrap .venv (Open MPI, TensorFlow 2.15, Horovod built from source)"

env:
	@bash scripts/bootstrap.sh

demo: env
	$(KT) data make-demo --out $(DATA) --classes 40 --train-per-class 260 --val-per-class 50 --size 32 --seed 0
	$(KT) launch -np $(NP) $(OVERSUBSCRIBE) -- $(KT) train --fresh --config $(DEMO_CONFIG) --set data.path=$(DATA) --set run_dir=$(RUN)
	@echo "summary: $(RUN)/summary.json"; cat $(RUN)/summary.json

# make test PYTEST_ARGS="-m 'not slurm'" selects by marker (mpi, slurm, slow: see setup.cfg);
# PYTEST_ARGS reaches the shell unquoted, so its inner quotes group the expression.
test: env
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
