# One entry point: every target creates the virtual environment when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv test demo demo-table blind bench exp-show flickr8k clean

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

# DVC runs each stage's `pipeline ...` command through PATH: the venv's bin goes first.
DVC := PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc

# The whole pipeline on generated demo data (no download): dvc repro, captions, HTML page, the results table
# (which fails when SCST lowered the share of captions with every attribute right).
demo: venv
	$(BIN)/pipeline demo-data data/demo
	$(DVC) repro
	set -o pipefail; $(BIN)/pipeline --params params.yaml caption data/demo/test --checkpoint checkpoints/scst/best.pt \
		--references data/demo/annotations/captions_test.json --html results/demo.html \
		--json results/demo_captions.json | head -n 8
	@echo "captions page: results/demo.html    curves: metrics/train/train.png, metrics/scst/scst.png"
	$(BIN)/pipeline bench demo

demo-table: venv
	$(BIN)/pipeline bench demo

# The settings people change and the test scores, as a Markdown table (`dvc exp show` alone prints ~150 columns,
# which rich shrinks to "…" in a terminal or a pipe). dvc matches --keep from the column name's start.
EXP_KEEP ?= ^(Experiment|Created)$$|^train\.(lr|epochs|hidden_size|embed_size|dropout|blind|decoder)$$|^scst\.(lr|epochs)$$|^extract\.(arch|features)$$|^metrics/eval(_xe)?\.json:(CIDEr|BLEU-4|attributes\.all_right)$$
exp-show: venv
	$(DVC) exp show --no-pager --md --drop '.*' --keep '$(EXP_KEEP)'

# The demo's decoder against an image-blind one trained the same way, on the test split, with the params.yaml of
# the last commit: `dvc exp run -S ...` leaves its values in params.yaml. BLIND_PARAMS=params.yaml takes yours.
BLIND_PARAMS ?= committed
blind: venv
	@set -e; params="$(BLIND_PARAMS)"; \
	if [ "$$params" = committed ]; then \
		params=$$(mktemp --suffix=.yaml); trap 'rm -f "$$params"' EXIT; \
		git show HEAD:params.yaml > "$$params"; \
		git diff --quiet HEAD -- params.yaml || echo "note: params.yaml differs from the last commit (dvc exp run" \
			"leaves its -S values there): benchmarking the committed one; BLIND_PARAMS=params.yaml takes yours"; \
	fi; \
	echo "bench blind with $(BLIND_PARAMS) params.yaml"; \
	$(BIN)/pipeline --params "$$params" bench blind --cache-dir cache

# Speed benchmarks on the demo (`make demo` first: its images and cache); BENCH_IMAGES=folder for other images.
BENCH_IMAGES ?= data/demo/train
bench: venv
	@test -e $(BENCH_IMAGES) -a -e cache/features.h5 || { echo "make bench: no $(BENCH_IMAGES) or cache/features.h5:" \
		"run make demo first, or pass BENCH_IMAGES=a folder of images"; exit 1; }
	$(BIN)/pipeline bench extract --arch resnet18 --weights none --images $(BENCH_IMAGES)
	$(BIN)/pipeline bench train --cache-dir cache
	$(BIN)/pipeline --params params.yaml bench scst --cache-dir cache

# Real photos through a pretrained EfficientNet-Lite0: the whole pipeline on a Flickr8k folder, beside an
# image-blind decoder and the published figures (FLICKR8K=data/flickr8k after `pipeline download flickr8k`).
# COMPARE=showtell also trains Show-and-Tell from the same cache (timed apart from the 30-minute budget).
FLICKR8K ?= ../shared/data/flickr8k
COMPARE ?=
flickr8k: venv
	$(BIN)/pipeline bench quality $(FLICKR8K) --recipe configs/flickr8k.yaml --work runs/flickr8k \
		$(if $(COMPARE),--compare $(COMPARE))

clean:
	rm -rf cache checkpoints metrics results data/demo dvc_plots
