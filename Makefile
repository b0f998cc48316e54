# All set-up happens here: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install demo test test-fast fashion-mnist bench-env bench-train clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PINS)
	$(PIP) install --quiet -e '.[dev,deepspeed,hf]'
	@touch $(STAMP)

# Fashion-MNIST arrives in a Debian package; fall back to scikit-learn digits if it cannot be installed.
fashion-mnist:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq --no-install-recommends dataset-fashion-mnist) >/dev/null 2>&1 \
	      || echo "note: could not install dataset-fashion-mnist; the demo will use scikit-learn digits"; \
	  else echo "note: not root or no apt-get; the demo will use scikit-learn digits"; fi; \
	fi

demo: install fashion-mnist
	$(PY) run_pretrain.py --config configs/demo.yaml --demo

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

# The lightly baseline of benchmarks/train_throughput.py, beside (not in) the venv, without dependencies:
# torch stays the pinned one. The benchmark scripts put .bench-env/ on their path.
bench-env: install
	$(PIP) install --quiet --no-deps --upgrade --target .bench-env -r benchmarks/requirements.txt

bench-train: bench-env
	$(PY) benchmarks/train_throughput.py --suite --out benchmarks/results/train_cpu.json

clean:
	rm -rf $(VENV) .bench-env runs
