# Every target sets up what it needs: `make train` and `make test` work on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from PATH, else a private copy installed with pip into .tools/ (works where the system
# Python is "externally managed", since pip --target leaves it alone).
UV_HOME := $(CURDIR)/.tools/uv
UV := $(or $(shell command -v uv 2>/dev/null),$(UV_HOME)/bin/uv)
UV_RUN := $(UV) run --frozen
ARGS ?=
SWEEP ?= hparams_search=beta_latent
RUN ?=
PORT ?= 6006
TEST_WORKERS ?= auto
FASHION_MNIST := /usr/share/datasets/fashion-mnist
ICONS := /usr/share/icons/oxygen/base/64x64

.PHONY: help install fashion-mnist icons train evaluate generate export features summarize test test-fast lint notebook tensorboard \
	sweep bench-data bench-train bench-quality bench-startup clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(UV_HOME)/bin/uv:
	@python3 -m pip --version >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq python3-pip; }
	python3 -m pip install --quiet --disable-pip-version-check --target $(UV_HOME) uv

install: $(if $(shell command -v uv 2>/dev/null),,$(UV_HOME)/bin/uv) .venv/.bytecode  ## uv (if missing) and the locked environment in .venv
	@$(UV) sync --frozen
	@echo "environment ready: run commands as .venv/bin/python -m cvae.train ... (or source .venv/bin/activate)"

# Compiled once per lock file (about a minute of CPU): where PYTHONDONTWRITEBYTECODE is set
# (containers, CI images) every command would otherwise compile torch and Lightning again,
# about 10 s of CPU per start.
.venv/.bytecode: uv.lock
	$(UV) sync --frozen --compile-bytecode --quiet
	@touch $@

fashion-mnist:  ## the Debian package dataset-fashion-mnist (the default data), where apt is available
	@if [ -d $(FASHION_MNIST) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq dataset-fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } \
		|| echo "dataset-fashion-mnist not installed: cvae will look in data/ or download"; \
	else echo "no apt as root: cvae will look for Fashion-MNIST in data/ or download it"; fi

icons: install  ## the Debian package oxygen-icon-theme: colour icons for data=icons (as root, with apt)
	@if [ ! -d $(ICONS) ]; then \
		if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
			echo "make icons: installing oxygen-icon-theme needs apt-get as root (sudo apt-get install oxygen-icon-theme)" >&2; exit 1; fi; \
		echo "installing the Debian package oxygen-icon-theme (32 MB download)"; \
		apt-get install -y -qq -o Dpkg::Use-Pty=0 oxygen-icon-theme >/dev/null 2>&1 \
			|| { apt-get update -qq && apt-get install -y -qq -o Dpkg::Use-Pty=0 oxygen-icon-theme >/dev/null; } \
			|| { echo "make icons: apt-get could not install oxygen-icon-theme" >&2; exit 1; }; \
	fi; \
	[ -d $(ICONS) ] || { echo "make icons: oxygen-icon-theme installed no $(ICONS)" >&2; exit 1; }; \
	echo "icons ready in $(ICONS): train with .venv/bin/python -m cvae.train data=icons"

train: install fashion-mnist  ## train (default: Fashion-MNIST 64x64); extra Hydra overrides in ARGS="..."
	$(UV_RUN) python -m cvae.train $(ARGS)

evaluate: install  ## metrics of a checkpoint; ARGS="ckpt_path=last ..." (last: the newest run)
	$(UV_RUN) python -m cvae.evaluate $(ARGS)

generate: install  ## samples, reconstructions, interpolations, traversals; ARGS="ckpt_path=last mode=sample"
	$(UV_RUN) python -m cvae.generate $(ARGS)

export: install  ## TorchScript or ONNX encoder and decoder; ARGS="ckpt_path=last format=onnx"
	$(UV_RUN) python -m cvae.export $(ARGS)

features: install fashion-mnist  ## a classifier's TorchScript features for in-domain FID (eval.fid_features); ARGS="data=..."
	$(UV_RUN) python -m cvae.train_features $(ARGS)

summarize: install  ## the table of a sweep; ARGS="outputs/train/multiruns/<time>"
	$(UV_RUN) python -m cvae.summarize $(ARGS)

test: install  ## the test suite (CPU, a few minutes; a pytest-xdist worker per core)
	$(UV_RUN) pytest -n $(TEST_WORKERS) $(ARGS)

test-fast: install  ## the edit loop's subset: every test not marked slow (about a minute)
	$(UV_RUN) pytest -n $(TEST_WORKERS) -m "not slow" $(ARGS)

lint: install  ## ruff check and format check
	$(UV_RUN) ruff check .
	$(UV_RUN) ruff format --check .

notebook: install  ## JupyterLab on notebooks/ (jupyterlab fetched into uv's cache on first use)
	$(UV) run --frozen --with jupyterlab jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

tensorboard: install  ## TensorBoard on the newest run or sweep, or RUN=<folder>, opening on the losses (PORT=6007)
	$(UV_RUN) python -m cvae.dashboard $(or $(RUN),outputs) --port $(PORT)

sweep: install fashion-mnist  ## a Hydra multirun over SWEEP="..." (default: beta x latent_dim)
	$(UV_RUN) python -m cvae.train -m $(SWEEP) $(ARGS)

bench-data: install  ## images/s of ImageDataModule (cold and warm cache) vs torchvision ImageFolder; ARGS="--root DIR"
	$(UV_RUN) python benchmarks/data_throughput.py $(ARGS)

bench-train: install  ## training images/s, FLOP utilisation, Lightning vs a bare loop; ARGS="--ablation"
	$(UV_RUN) python benchmarks/train_throughput.py $(ARGS)

bench-quality: install fashion-mnist  ## time for cvae's default to reach a textbook VAE's 4-minute test loss
	$(UV_RUN) python benchmarks/time_to_quality.py $(ARGS)

bench-startup: install  ## start-up time of the commands (summarize, --help) against bare Python
	$(UV_RUN) python benchmarks/startup.py $(ARGS)

clean:  ## remove run outputs and caches (keeps .venv)
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './.venv/*' -exec rm -rf {} +
