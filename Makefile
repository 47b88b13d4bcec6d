# One entry point: every target creates the virtual environment when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv test demo blind bench flickr8k clean

venv: $(VENV)/.installed

# -qq: errors only (pip otherwise warns about every index location a local pip.conf names).
$(VENV)/.installed: setup.cfg pyproject.toml
	@echo "setting up $(VENV): torch, torchvision, dvc, ... (a few minutes, once)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -e '.[test]'
	touch $@

test: venv
	$(BIN)/ruff check pipeline tests
	$(BIN)/python -m pytest -q tests

# The whole pipeline on generated demo data (no download): dvc repro, metrics, captions, HTML page.
demo: venv
	$(BIN)/pipeline demo-data data/demo
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc metrics show
	set -o pipefail; $(BIN)/pipeline --params params.yaml caption data/demo/test --checkpoint checkpoints/scst/best.pt \
		--html results/demo.html --json results/demo_captions.json | head -n 8
	@echo "captions page: results/demo.html    curves: metrics/train/train.png, metrics/scst/scst.png"

# The demo's decoder against an image-blind one trained the same way (params.yaml), on the test split.
blind: venv
	$(BIN)/pipeline --params params.yaml bench blind --cache-dir cache

bench: venv
	$(BIN)/python -m pipeline bench extract --arch resnet18 --weights none
	$(BIN)/python -m pipeline bench train
	$(BIN)/python -m pipeline --params params.yaml bench scst --cache-dir cache

# Real photos through a pretrained EfficientNet-Lite0: the whole pipeline on a Flickr8k folder, beside an
# image-blind decoder and the published figures (FLICKR8K=data/flickr8k after `pipeline download flickr8k`).
FLICKR8K ?= ../shared/data/flickr8k
flickr8k: venv
	$(BIN)/pipeline bench quality $(FLICKR8K) --recipe configs/flickr8k.yaml --work runs/flickr8k

clean:
	rm -rf cache checkpoints metrics results data/demo dvc_plots
