# Two commands on a fresh machine: `make up` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install up test protos deploy-check clean

# A line per step, then pip's own progress: a first install takes a minute or more.
$(STAMP): pyproject.toml
	@echo "[1/4] virtual environment $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[2/4] pip"
	@$(PY) -m pip install -q --upgrade pip
	@# The CPU build of torch first: with it installed, the project's torch range pulls nothing more.
	@echo "[3/4] torch 2.13.0 (CPU build)"
	@$(PY) -m pip install "torch==2.13.0"
	@echo "[4/4] cast-serve and its dependencies"
	@$(PY) -m pip install -e ".[cpu,dev]"
	@touch $(STAMP)
	@echo "installed into $(VENV)"

install: $(STAMP)

up: $(STAMP)
	$(VENV)/bin/cast up

test: $(STAMP)
	$(PY) -m pytest -q --durations=20

protos: $(STAMP)
	$(PY) -m tools.gen_protos

# deploy/: render and validate every overlay, lint the Dockerfile, run the cpu overlay's commands (tests/deploy/).
deploy-check: $(STAMP)
	$(PY) -m pytest -q tests/deploy

clean:
	rm -rf $(VENV) build
