# The README's commands. Everything a fresh machine needs is installed from here.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.requirements-installed
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: venv build test demo generate study bench clean

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

# The second command: a prior over the demo tokenizer's codes (the tokenizer is trained first if
# runs/sample has none), then its held-out bits against the baselines and 16 samples.
generate: export KEPLER_SKIP_CUDA_BUILD ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,1)
generate: build
	test -f runs/sample/checkpoints/last.pt || $(PY) -m kepler train sample --overwrite
	$(PY) -m kepler prior train prior_sample --overwrite
	$(PY) -m kepler prior eval runs/prior_sample/checkpoints/last.pt
	$(PY) -m kepler sample runs/prior_sample/checkpoints/last.pt --num 16 --seed 0 --out runs/prior_sample/samples

study: build
	$(PY) -m kepler study study_sample

bench: build
	mkdir -p bench_results
	$(PY) -m pytest benchmarks -m "not gpu" --benchmark-json=bench_results/cpu.json

clean:
	rm -rf build kepler/_C*.so *.egg-info
