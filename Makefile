# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: setup engines browser demo test test-fast clean

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

clean:
	rm -rf runs .pytest_cache
