# The README's commands. Everything a fresh machine needs is installed from here.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.requirements-installed
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: venv build test demo study bench clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements.txt
	touch $(STAMP)

# Builds kepler._C in place (C++ CPU kernels always; CUDA kernels when a toolkit is found).
build: venv
	$(PIP) install --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest tests

# The main job: train the sample Kepler tokenizer on the embedded photos, then evaluate it.
# Without a GPU the demo runs on the CPU, so it skips compiling CUDA kernels it would not use
# (minutes of nvcc); target-specific, so it reaches `build` for this target only.
demo: export KEPLER_SKIP_CUDA_BUILD ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,1)
demo: build
	$(PY) -m kepler train sample --overwrite
	$(PY) -m kepler eval runs/sample/checkpoints/last.pt --data sample --out runs/sample

study: build
	$(PY) -m kepler study study_sample

bench: build
	mkdir -p bench_results
	$(PY) -m pytest benchmarks -m "not gpu" --benchmark-json=bench_results/cpu.json

clean:
	rm -rf build kepler/_C*.so *.egg-info
