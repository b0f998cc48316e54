# All set-up happens here: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install constraints demo demo-data slurm test test-fast fashion-mnist bench-env bench-train clean

install: $(STAMP)

# constraints.txt pins every package to the version the suite was run with (make constraints rewrites it).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt $(TORCH_PINS)
	$(PIP) install --quiet -c constraints.txt -e '.[dev,deepspeed,hf]'
	@PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -c '$(DS_CPU_OPS)' || echo "note: DeepSpeed's CPU ops did not build here; the first DeepSpeed run will try again"
	@touch $(STAMP)

# DeepSpeed compiles its CPU ops with gcc the first time a run needs them (cpu_adam for ZeRO offload, shm_comm for
# its collectives): about 2 minutes on 2 cores, once per machine (~/.cache/torch_extensions). On a machine without a
# GPU they are built at install, so the first DeepSpeed run (and the suite) does not wait for the compiler; a GPU
# machine builds its own ops when it first needs them. With the venv's `ninja` first on PATH, as in the runs: Debian's
# older ninja hashes its build log differently, and a run using the other one would build the op again.
DS_CPU_OPS := from deepspeed.accelerator import get_accelerator; a = get_accelerator(); \
	[a.create_op_builder(n).load(verbose=False) for n in ("CPUAdamBuilder", "ShareMemCommBuilder") if a.device_name() == "cpu"]

# The demo needs less than the tests (no DeepSpeed, HF datasets, trackers or S3 tools): a shorter first run.
$(DEMO_STAMP): pyproject.toml constraints.txt
	@if [ -f $(STAMP) ] && [ $(STAMP) -nt pyproject.toml ] && [ $(STAMP) -nt constraints.txt ]; then touch $@; else \
	  set -e; test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	  $(PIP) install --quiet --upgrade pip; $(PIP) install --quiet -c constraints.txt $(TORCH_PINS); \
	  $(PIP) install --quiet -c constraints.txt -e '.[demo]'; touch $@; fi

# The demo's images arrive in Debian packages: OpenClipart (openclipart-png, 131 MB), else Fashion-MNIST
# (dataset-fashion-mnist), else scikit-learn's digits. Installed only where root and apt-get are available.
OCLIP  := /usr/share/openclipart/png
APT    := apt-get install -y -qq --no-install-recommends

demo-data:
	@if [ ! -d $(OCLIP) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && $(APT) openclipart-png) >/dev/null 2>&1 \
	      || echo "note: could not install openclipart-png; the demo will use Fashion-MNIST"; \
	  else echo "note: not root or no apt-get; the demo needs openclipart-png, it will try Fashion-MNIST"; fi; \
	fi
	@if [ ! -d $(OCLIP) ] && [ ! -f $(FMNIST) ]; then $(MAKE) --no-print-directory fashion-mnist; fi

fashion-mnist:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && $(APT) dataset-fashion-mnist) >/dev/null 2>&1 \
	      || echo "note: could not install dataset-fashion-mnist; the demo will use scikit-learn digits"; \
	  else echo "note: not root or no apt-get; the demo will use scikit-learn digits"; fi; \
	fi

# The main job: DINO from scratch and FD from a real ImageNet teacher into the same small network,
# compared with raw pixels, random init and the teacher (python -m selfdistill.demo --help).
demo: $(DEMO_STAMP) demo-data
	$(PY) -m selfdistill.demo

# The real two-node SLURM cluster of tests/test_slurm_cluster.py needs Debian's SLURM and munge (no service is
# started by installing them; the tests start and stop their own daemons). Elsewhere those tests skip, saying why.
slurm:
	@if ! command -v slurmd >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && $(APT) slurmctld slurmd slurm-client munge iproute2) >/dev/null 2>&1 \
	      || echo "note: could not install slurmctld slurmd slurm-client munge; the SLURM cluster tests will skip"; \
	  else echo "note: not root or no apt-get; the SLURM cluster tests will skip"; fi; \
	fi

# Two pytest-xdist workers, each taking whole test files (a module's fixtures are built once; the real SLURM
# cluster of tests/test_slurm_cluster.py has one owner); TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile)

test: install slurm
	$(PY) -m pytest -q $(XDIST) tests

test-fast: install
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests

# The lightly baseline of benchmarks/train_throughput.py, beside (not in) the venv, without dependencies:
# torch stays the pinned one. The benchmark scripts put .bench-env/ on their path.
bench-env: install
	$(PIP) install --quiet --no-deps --upgrade --target .bench-env -r benchmarks/requirements.txt

bench-train: bench-env
	$(PY) benchmarks/train_throughput.py --suite --out benchmarks/results/train_cpu.json

# After a dependency change: install it, run the suite, then pin what it ran with.
constraints: install
	@{ sed -n '1,2p' constraints.txt; $(PIP) freeze --exclude-editable; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .bench-env runs
