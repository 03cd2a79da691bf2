# Idempotent set-up and run targets. `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch: on these machines pip takes it from local disk. Elsewhere use
#   make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.latentrt-installed

.PHONY: setup test test-fast demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[export,dev,bench,cpu-fast]"
	# The real CLIP BPE vocabulary ships as a data file in this wheel; it is read as a file,
	# never imported (open_clip itself needs torchvision).
	$(BIN)/python -m pip install -q --no-deps open_clip_torch
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	$(BIN)/latentrt demo

bench: $(STAMP)
	$(BIN)/latentrt bench --config benchmarks/scenarios/sd15_lcm_cpu.toml

clean:
	rm -rf $(VENV) .pytest_cache demo-out
