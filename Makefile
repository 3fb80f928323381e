# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: setup engines distributed browser demo test test-fast clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	@touch $(STAMP)

# vLLM lives in its own virtual environment (it pins an older torch and transformers), and llama.cpp
# (converters from the llama-cpp-python sdist, a prebuilt libllama; about 15 s) beside it, cached
# outside the repository in ~/.cache/gemma4-tune/engines; installing it is idempotent.
engines: setup
	$(BIN)/gemma4-tune engines install vllm
	$(BIN)/gemma4-tune engines install llama.cpp

# DeepSpeed for --distributed zero2/zero3 (the extra `distributed` in pyproject.toml). Its setup.py imports
# torch, so it is installed without build isolation after its other requirements; about 30 s.
distributed: $(VENV)/.distributed

$(VENV)/.distributed: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "hjson>=3.1,<3.2" "msgpack>=1.2,<1.3" \
		"py-cpuinfo>=9,<10" "einops>=0.8,<0.9"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-build-isolation "deepspeed==0.19.8"
	@touch $@

# The report test renders report.html in Debian's headless chromium (driven through chromedriver).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

demo: setup
	$(BIN)/gemma4-tune demo --out $(DEMO_OUT)

# The engine, DeepSpeed and browser tests must run, not skip: GEMMA4_TUNE_REQUIRE_ENGINES turns a missing one into a failure.
# Two pytest-xdist workers: much of the suite waits on one core (process starts, engine start-up), so two
# tests run side by side; TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 2
test: setup engines distributed browser
	GEMMA4_TUNE_REQUIRE_ENGINES=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal --durations=30

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not engine"

# Benchmarks (issue #8): side-by-side ratios written to bench/results/*.json and docs/performance.md.
# The GPU section runs only where CUDA is present (GEMMA4_BENCH_MODEL=<dir> for real sizes).
bench: setup
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/real_vocab.py --profile
	$(BIN)/python bench/dpo_throughput.py
	$(BIN)/python bench/qlora.py
	$(BIN)/python bench/clippable_lora.py
	$(BIN)/python bench/merge_memory.py
	$(BIN)/python bench/export_real_size.py
	$(BIN)/python bench/qlora_real_size.py --variant 12b
	$(BIN)/python bench/preflight_verify.py
	$(BIN)/python bench/verify_tolerances.py
	$(BIN)/python bench/under_load.py
	$(BIN)/python bench/under_load.py --demo --timeout 600
	$(BIN)/python bench/gpu.py
	$(BIN)/python bench/report.py

clean:
	rm -rf runs .pytest_cache
