# One entry point: every target creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv test demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q tests

demo: venv
	$(BIN)/python -m pipeline demo

bench: venv
	$(BIN)/python -m pipeline bench extract --arch resnet18 --weights none
	$(BIN)/python -m pipeline bench train

clean:
	rm -rf cache checkpoints metrics results
