# Two set-up commands on a fresh machine:  `make demo`  and  `make test`.
# torch==2.13.0 is installed first, alone, and pinned through constraints.txt
# for everything after it, so nothing after it pulls in another torch. Which build
# that first install gets is the pip index's: PyPI serves the CUDA build on Linux,
# so there pass TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU one.
PY ?= python3
TORCH_INDEX ?=
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/jointcompress demo

# the suite in one worker process per core (at most 4), whole files per worker: about half the
# serial time on 2 cores; `$(BIN)/python -m pytest` alone still runs it in one process
test: install
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
