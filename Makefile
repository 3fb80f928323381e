# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: setup engines demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	@touch $(STAMP)

# vLLM lives in its own virtual environment (it pins an older torch and transformers), cached
# outside the repository in ~/.cache/gemma4-tune/engines; installing it is idempotent.
engines: setup
	$(BIN)/gemma4-tune engines install vllm

demo: setup
	$(BIN)/gemma4-tune demo --out $(DEMO_OUT)

# The engine tests must run, not skip: GEMMA4_TUNE_REQUIRE_ENGINES turns a missing engine into a failure.
test: setup engines
	GEMMA4_TUNE_REQUIRE_ENGINES=1 $(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not engine"

clean:
	rm -rf runs .pytest_cache
