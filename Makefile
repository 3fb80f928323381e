# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: setup engines browser demo test test-fast clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	@touch $(STAMP)

# vLLM lives in its own virtual environment (it pins an older torch and transformers), cached
# outside the repository in ~/.cache/gemma4-tune/engines; installing it is idempotent.
engines: setup
	$(BIN)/gemma4-tune engines install vllm

# The report test renders report.html in Debian's headless chromium (driven through chromedriver).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

demo: setup
	$(BIN)/gemma4-tune demo --out $(DEMO_OUT)

# The engine and browser tests must run, not skip: GEMMA4_TUNE_REQUIRE_ENGINES turns a missing one into a failure.
test: setup engines browser
	GEMMA4_TUNE_REQUIRE_ENGINES=1 $(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not engine"

# Benchmarks (issue #8): side-by-side ratios written to bench/results/*.json and docs/performance.md.
# The GPU section runs only where CUDA is present (GEMMA4_BENCH_MODEL=<dir> for real sizes).
bench: setup
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/clippable_lora.py
	$(BIN)/python bench/merge_memory.py
	$(BIN)/python bench/preflight_verify.py
	$(BIN)/python bench/gpu.py
	$(BIN)/python bench/report.py

clean:
	rm -rf runs .pytest_cache
