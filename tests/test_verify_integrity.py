"""No vacuous verdict (issue 16): verify and serve never pass on a comparison of nothing, and the stock
runner's independence from gemma4-tune is enforced, not just recorded."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gemma4_tune.api import verify
from gemma4_tune.findings import FindingError
from gemma4_tune.verify.llamacpp import verify_gguf
from gemma4_tune.verify.parity import STOCK_RUNNER

CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]


@pytest.mark.parametrize("engines", ["VLLM", "peft,vlm", ","])
def test_unknown_or_empty_engine_list_is_a_usage_error(engines, tmp_path):
    proc = subprocess.run([*CLI, "verify", "--base", str(tmp_path), "--adapter", str(tmp_path), "--engine", engines],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    said = " ".join(re.sub(r"[│╭╮╰╯─]", " ", proc.stderr).split())  # the usage box, unwrapped
    assert "use a comma list of peft, transformers, vllm, llama.cpp" in said


def test_verify_api_refuses_no_engine_before_loading_anything(tmp_path):
    for engines in ((), ("VLLM",)):
        with pytest.raises(FindingError) as info:
            verify(tmp_path / "missing-base", tmp_path / "missing-adapter", engines=engines)
        assert info.value.findings[0].code == "G4T615"


def test_gguf_directory_with_nothing_recognised_fails(tmp_path):
    (tmp_path / "notes.txt").write_text("no gguf here")
    report = verify_gguf(tmp_path, reference=[np.zeros((2, 8), np.float32)], prompts=[[2, 5]], gguf_type="f32")
    assert not report["ok"]
    assert [f.code for f in report["findings"]] == ["G4T616"]


def test_stock_runner_refuses_a_process_that_imported_gemma4_tune(tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"base": str(tmp_path), "batch": str(tmp_path / "b.pt"), "out": str(tmp_path / "o")}))
    code = ("import sys, runpy, gemma4_tune; sys.argv = [sys.argv[1], sys.argv[2]]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(STOCK_RUNNER), str(request)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "gemma4_tune imported before loading" in proc.stderr and not (tmp_path / "o").exists()


def test_stock_runner_alone_imports_nothing_foreign():
    proc = subprocess.run([sys.executable, "-P", "-c", "import runpy, sys; sys.argv = ['x']; "
                           f"ns = runpy.run_path({str(STOCK_RUNNER)!r}); print(ns['foreign_modules']())"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
