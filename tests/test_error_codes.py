"""Every ERROR code is proven by a test that induces the failure for real, and asserts the code.

Each test below makes one check fire through the code path users take (the CLI, the Python API, or
the module function that owns the check), on real tiny models, real adapters, real engines and
really broken artefacts: nothing the test claims to exercise is mocked. The last test keeps it so:
it fails when an ERROR code registered anywhere in gemma4_tune is not named as a string literal
(``"G4T601"``) by some ``tests/test_*.py``, unless ``EXEMPT`` says why it cannot be induced, and it
fails when an exemption has gone stale.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma4_tune.engines import llamacpp_env
from gemma4_tune.engines import vllm_env as engine_env
from gemma4_tune.findings import REGISTRY, FindingError, Severity
from tests.lora_helpers import random_lora
from tests.test_findings import _import_all

CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]
REQUIRE = bool(os.environ.get("GEMMA4_TUNE_REQUIRE_ENGINES"))
needs_vllm = pytest.mark.skipif(engine_env.vllm_python() is None and not REQUIRE,
                                reason="vLLM environment not installed (gemma4-tune engines install vllm); "
                                "set GEMMA4_TUNE_REQUIRE_ENGINES=1 to fail instead")
needs_llamacpp = pytest.mark.skipif(llamacpp_env.llamacpp_install() is None and not REQUIRE,
                                    reason="llama.cpp not installed (gemma4-tune engines install llama.cpp); set "
                                    "GEMMA4_TUNE_REQUIRE_ENGINES=1 to fail instead")

#: ERROR codes no test can induce, with the reason. Keep it empty where possible: a code listed here
#: and named by a test as well fails the meta-test (the exemption is stale).
EXEMPT: dict[str, str] = {
    "G4T311": "internal consistency check: fires only when the processor's ids or the template's rendering disagree "
              "with the toolkit's own rendering (a gemma4-tune or template bug). The one data path that reached it, a "
              "weighted tool result with no tool call before it, is refused at load since (G4T301, "
              "test_formats.py::test_a_tool_result_without_its_tool_call_is_refused)",
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)


def codes(exc: pytest.ExceptionInfo) -> list[str]:
    return [f.code for f in exc.value.findings]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(n: int, user: str = "What is {i} plus {i}?") -> list[dict]:
    return [{"messages": [{"role": "user", "content": user.format(i=i)},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(n)]


LONG_PROMPT = " ".join(f"word{i}" for i in range(60)) + " {i}?"  # ~70 tokens before the answer


@pytest.fixture(scope="module")
def e2b(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["e2b"]


@pytest.fixture(scope="module")
def e2b_adapter(e2b: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text LoRA with random A and B (changes the output), saved by the toolkit."""
    return random_lora(e2b, tmp_path_factory.mktemp("codes-adapter") / "adapter", seed=1)


def _broken_copy(src: Path, out: Path, keep_bytes: int) -> Path:
    """``src`` copied with its model.safetensors cut after ``keep_bytes`` bytes (an interrupted copy)."""
    shutil.copytree(src, out)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    assert len(data) > keep_bytes
    weights.write_bytes(data[:keep_bytes])
    return out


# --------------------------------------------------------------------------- G4T2xx: engine rules


@pytest.mark.slow
def test_g4t205_router_lora_is_refused_for_vllm_in_plan_and_export(tiny_models: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    """A LoRA on the 26B-A4B MoE router (`router.proj`) is outside vLLM's LoRA module list."""
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_tune.api import export, plan
    from gemma4_tune.plan.adapters import LoraSettings, prepare_model, save_adapter

    base = tiny_models["26b-a4b"]
    spec = r"re:.*\.router\.proj"
    _, target_plan, _ = plan(base, spec, rank=8)
    planned = [f for f in target_plan.findings if f.code == "G4T205"]
    assert len(planned) == 1 and "vLLM refuses LoRA on proj" in planned[0].message
    # the adapter on disk, as export judges it
    model = Gemma4ForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32)
    peft_model, lora_plan = prepare_model(model, spec, LoraSettings(rank=8))
    adapter = save_adapter(peft_model, tmp_path / "adapter", plan=lora_plan)
    report = export(base, adapter, engines=("vllm",))
    exported = [f for f in report["findings"] if f.code == "G4T205"]
    assert len(exported) == 1 and "proj" in exported[0].message
    assert report["adapter_summary"]["text_modules"] == ["proj"]


@pytest.mark.slow
def test_g4t206_rank_above_vllms_largest_max_lora_rank(e2b: Path) -> None:
    proc = run_cli("plan", "--model", str(e2b), "--rank", "1024", "--json")
    assert proc.returncode == 1, proc.stderr
    found = {f["code"]: f for f in json.loads(proc.stdout)["findings"]}
    assert found["G4T206"]["severity"] == "error"
    assert "rank 1024 is above vLLM's largest --max-lora-rank (512)" in found["G4T206"]["message"]


@pytest.mark.slow
def test_g4t209_unknown_engine_in_export_and_engines_install(e2b: Path, e2b_adapter: Path) -> None:
    from gemma4_tune.api import export

    with pytest.raises(FindingError) as exc:
        export(e2b, e2b_adapter, engines=("vllm", "sglang"))
    assert codes(exc) == ["G4T209"]
    assert "unknown engine(s): sglang" in exc.value.findings[0].message
    proc = run_cli("engines", "install", "sglang")
    assert proc.returncode == 1
    assert "G4T209" in proc.stdout + proc.stderr and "unknown engine 'sglang'" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- G4T3xx / G4T4xx: data and training


@pytest.mark.slow
def test_g4t402_truncation_leaves_no_supervised_token(e2b: Path, tmp_path: Path) -> None:
    from gemma4_tune.api import run_preflight
    from gemma4_tune.config.options import build_config

    data = _write_jsonl(tmp_path / "long.jsonl", _chat(2, LONG_PROMPT))
    with pytest.raises(FindingError) as exc:
        run_preflight(build_config({"model": str(e2b), "data": str(data), "max_seq_len": 32}))
    assert codes(exc) == ["G4T402"]
    assert "truncation to 32 tokens" in exc.value.findings[0].message


@pytest.mark.slow
def test_g4t408_held_out_data_without_a_supervised_token(e2b: Path, tmp_path: Path) -> None:
    from gemma4_tune.api import run_preflight
    from gemma4_tune.config.options import build_config

    train = _write_jsonl(tmp_path / "train.jsonl", _chat(2, "Hi {i}"))
    held_out = _write_jsonl(tmp_path / "eval.jsonl", _chat(2, LONG_PROMPT))
    with pytest.raises(FindingError) as exc:
        run_preflight(build_config({"model": str(e2b), "data": str(train), "eval_data": str(held_out),
                                    "max_seq_len": 32}))
    assert codes(exc) == ["G4T408"]
    assert "the 2 held-out conversations" in exc.value.findings[0].message


@pytest.mark.slow
def test_g4t412_processes_that_do_not_form_the_job_are_refused(e2b: Path, tmp_path: Path) -> None:
    """A launch planned for a GPU node (plan.json ``cpu: false``) run on this CPU machine: the row-27
    patch is not applied, accelerate sees DistributedType.NO, and the run stops before training."""
    from gemma4_tune.config.options import build_config
    from gemma4_tune.train.distributed import LAUNCH_DIR, PLAN_FILE, RUN_FILE, launch, read_plan

    data = _write_jsonl(tmp_path / "chat.jsonl", _chat(4))
    out = tmp_path / "run"
    cfg = build_config({"model": str(e2b), "data": str(data), "out": str(out), "distributed": "ddp", "nproc": 1,
                        "max_steps": 1, "samples": 0})
    assert launch(cfg, dry_run=True, log=lambda _line: None) == 0
    plan_path = out / LAUNCH_DIR / PLAN_FILE
    plan = json.loads(plan_path.read_text())
    assert plan["cpu"] is True
    plan_path.write_text(json.dumps({**plan, "cpu": False}))
    cmd = read_plan(out).command((out / LAUNCH_DIR / RUN_FILE).resolve())
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "G4T412" in output, output[-3000:]
    assert "accelerate sees 1 process(es) of type NO" in output
    assert not (out / "adapter").exists()


@pytest.mark.slow
def test_g4t413_fsdp_wrap_class_the_model_lacks(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The plan the launcher wrote for the E2B with audio LoRA (it wraps Gemma4AudioLayer), met in a process
    by the 31B, which has no audio tower (run.yaml pointed at another model after the launch files were
    written): refused before accelerate would stop at prepare with `Could not find the transformer layer class`."""
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_tune.config.options import build_config
    from gemma4_tune.plan.adapters import LoraSettings, prepare_model
    from gemma4_tune.train.distributed import check_wrap_classes, launch, read_plan

    out = tmp_path / "run"
    cfg = build_config({"model": str(tiny_models["e2b"]), "data": "unused.jsonl", "out": str(out),
                        "distributed": "fsdp2", "nproc": 2, "targets": "text,audio"})
    assert launch(cfg, dry_run=True, log=lambda _line: None) == 0
    dplan = read_plan(out)  # what every process of the job reads
    assert "Gemma4AudioLayer" in dplan.wrap_classes
    model = Gemma4ForConditionalGeneration.from_pretrained(str(tiny_models["31b"]), dtype=torch.float32)
    peft_model, _ = prepare_model(model, "text", LoraSettings(rank=4))
    with pytest.raises(FindingError) as exc:
        check_wrap_classes(peft_model, dplan)
    assert codes(exc) == ["G4T413"]
    assert "FSDP would wrap Gemma4AudioLayer" in exc.value.findings[0].message


# --------------------------------------------------------------------------- G4T6xx: the saved adapter and verify


def _lora_model(base: Path):  # noqa: ANN202 - (PeftModel, TargetPlan)
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_tune.plan.adapters import LoraSettings, prepare_model

    model = Gemma4ForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32)
    return prepare_model(model, "text", LoraSettings(rank=4))


@pytest.mark.slow
def test_g4t601_adapter_saved_before_the_last_update(e2b: Path, tmp_path: Path) -> None:
    """The adapter is saved, then the LoRA weights move again (as when a save misses the last step):
    the saved adapter no longer reproduces the model in memory, in logits and tensor by tensor."""
    from gemma4_tune.plan.adapters import save_adapter
    from gemma4_tune.ranks import gather_trainable
    from gemma4_tune.verify.parity import fixed_batch
    from gemma4_tune.verify.peft import saved_adapter_parity, saved_tensor_parity

    peft_model, plan = _lora_model(e2b)
    gen = torch.Generator().manual_seed(0)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    adapter = save_adapter(peft_model, tmp_path / "adapter", plan=plan)
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    parity = saved_adapter_parity(adapter, peft_model, fixed_batch(e2b))
    assert [f.code for f in parity.findings()] == ["G4T601"]
    assert "stock PEFT reload differs from the trained model" in parity.findings()[0].message
    tensors = saved_tensor_parity(adapter, peft_model, gather_trainable(peft_model))
    assert [f.code for f in tensors.findings()] == ["G4T601"]
    assert "saved tensors differ from the trained ones" in tensors.findings()[0].message


@pytest.mark.slow
def test_g4t602_adapter_that_never_moved_changes_nothing(e2b: Path, tmp_path: Path) -> None:
    """LoRA as PEFT initialises it (lora_B = 0), saved without an update (row 30: zero gradients)."""
    from gemma4_tune.plan.adapters import save_adapter
    from gemma4_tune.ranks import gather_trainable
    from gemma4_tune.verify.parity import fixed_batch
    from gemma4_tune.verify.peft import saved_adapter_parity, saved_tensor_parity

    peft_model, plan = _lora_model(e2b)
    adapter = save_adapter(peft_model, tmp_path / "adapter", plan=plan)
    parity = saved_adapter_parity(adapter, peft_model, fixed_batch(e2b))
    assert [f.code for f in parity.findings()] == ["G4T602"]
    assert "it changes nothing" in parity.findings()[0].message
    tensors = saved_tensor_parity(adapter, peft_model, gather_trainable(peft_model))
    assert [f.code for f in tensors.findings()] == ["G4T602"]
    assert "every lora_B weight is zero" in tensors.findings()[0].message


@pytest.fixture(scope="module")
def other_merged(e2b: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merged checkpoint exported from another adapter (seed 2) of the same base."""
    from gemma4_tune.api import export

    root = tmp_path_factory.mktemp("codes-merged")
    other = random_lora(e2b, root / "other-adapter", seed=2)
    export(e2b, other, merged=root / "merged", engines=("transformers",))
    return root / "merged"


@pytest.mark.slow
def test_g4t610_merged_checkpoint_of_another_adapter(e2b: Path, e2b_adapter: Path, other_merged: Path,
                                                     tmp_path: Path) -> None:
    from gemma4_tune.api import verify

    report = verify(e2b, e2b_adapter, merged=other_merged, engines=("transformers",), out=tmp_path)
    assert report["ok"] is False
    errors = [f for f in report["findings"] if f.severity is Severity.ERROR]
    assert [f.code for f in errors] == ["G4T610"]
    assert "transformers: logits differ from the trained model" in errors[0].message
    assert "G4T610" in (tmp_path / "verify.md").read_text()


@pytest.mark.slow
def test_g4t613_stock_loader_fails_on_a_truncated_merged_checkpoint(e2b: Path, e2b_adapter: Path,
                                                                    other_merged: Path, tmp_path: Path) -> None:
    from gemma4_tune.api import verify

    size = (other_merged / "model.safetensors").stat().st_size
    broken = _broken_copy(other_merged, tmp_path / "merged", keep_bytes=size // 2)
    report = verify(e2b, e2b_adapter, merged=broken, engines=("transformers",), out=tmp_path / "verify")
    assert report["ok"] is False
    errors = [f for f in report["findings"] if f.severity is Severity.ERROR]
    assert [f.code for f in errors] == ["G4T613"], errors  # the failed row's own, not a second "compared nothing"
    assert "the stock loader failed" in errors[0].message


# --------------------------------------------------------------------------- G4T8xx: export


@pytest.mark.slow
def test_g4t804_base_with_a_truncated_safetensors_header(e2b: Path, e2b_adapter: Path, tmp_path: Path) -> None:
    from gemma4_tune.api import export

    broken = _broken_copy(e2b, tmp_path / "base", keep_bytes=100)  # the 8-byte length + a cut JSON header
    with pytest.raises(FindingError) as exc:
        export(broken, e2b_adapter, engines=("transformers",))
    assert codes(exc) == ["G4T804"]
    assert "cannot read the safetensors header of" in exc.value.findings[0].message


# --------------------------------------------------------------------------- G4T9xx: engines


@pytest.mark.engine
@pytest.mark.slow
@needs_vllm
def test_g4t905_vllm_engine_dies_on_a_tower_lora(e2b: Path, tmp_path: Path) -> None:
    """Row 3: vLLM 0.32 refuses vision-tower LoRA modules; the engine dies and the run says why."""
    from gemma4_tune.verify.vllm import vllm_parity

    adapter = random_lora(e2b, tmp_path / "vision-adapter", seed=1, spec="vision")
    with pytest.raises(FindingError) as exc:
        vllm_parity(e2b, adapter, [[2, 100, 200, 300]], max_tokens=2, timeout_s=600, log=lambda _line: None)
    assert codes(exc) == ["G4T905"]
    message = exc.value.findings[0].message
    assert "vLLM exited with status" in message and "expected target modules in" in message


@pytest.mark.slow
def test_g4t917_gguf_directory_without_a_model_gguf(e2b: Path, e2b_adapter: Path, tmp_path: Path) -> None:
    from gemma4_tune.api import verify

    (tmp_path / "gguf").mkdir()
    with pytest.raises(FindingError) as exc:
        verify(e2b, e2b_adapter, engines=("llama.cpp",), gguf=tmp_path / "gguf", out=tmp_path)
    assert codes(exc) == ["G4T917"]
    assert "holds no model-<type>.gguf" in exc.value.findings[0].message


@pytest.mark.engine
@pytest.mark.slow
@needs_llamacpp
def test_g4t917_llama_cpp_cannot_load_a_truncated_gguf(e2b: Path, e2b_adapter: Path, tmp_path: Path) -> None:
    """A model-f32.gguf cut after its header (it announces a tensor whose description is missing)."""
    import struct

    from gemma4_tune.api import verify

    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "model-f32.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0))
    with pytest.raises(FindingError) as exc:
        verify(e2b, e2b_adapter, engines=("llama.cpp",), gguf=gguf, out=tmp_path, log=lambda _line: None)
    assert codes(exc) == ["G4T917"]
    message = exc.value.findings[0].message
    assert "llama.cpp (exit 1) could not run" in message and "failed to load model" in message


# --------------------------------------------------------------------------- the rule itself

_CODE = re.compile(r"G4T\d{3}")
_META_TEST = "test_every_error_code_is_induced_by_a_test"


def _code_literals(tree: ast.AST, skip: tuple[ast.AST, ...] = ()) -> set[str]:
    """String constants that are exactly one code (``"G4T601"``), outside the ``skip`` subtrees."""
    skipped = {id(n) for s in skip for n in ast.walk(s)}
    return {n.value for n in ast.walk(tree) if id(n) not in skipped and isinstance(n, ast.Constant)
            and isinstance(n.value, str) and _CODE.fullmatch(n.value)}


def _exemption_nodes(tree: ast.Module) -> tuple[ast.AST, ...]:
    """This file's EXEMPT assignment and the meta-test: neither counts as a test naming a code."""
    def is_exempt(node: ast.AST) -> bool:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) else []
        return any(isinstance(t, ast.Name) and t.id == "EXEMPT" for t in targets)

    return tuple(n for n in tree.body if is_exempt(n) or (isinstance(n, ast.FunctionDef) and n.name == _META_TEST))


def test_every_error_code_is_induced_by_a_test() -> None:
    _import_all()
    errors = {code for code, spec in REGISTRY.items() if spec.severity is Severity.ERROR}
    this = Path(__file__).resolve()
    named: dict[str, set[str]] = {}
    for path in sorted(this.parent.glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _exemption_nodes(tree) if path.resolve() == this else ()
        for code in _code_literals(tree, skip):
            named.setdefault(code, set()).add(path.name)
    assert all(reason.strip() for reason in EXEMPT.values()), "every exemption needs its reason"
    unknown = sorted(set(EXEMPT) - errors)
    assert not unknown, f"EXEMPT lists codes that are not registered ERROR codes: {unknown}"
    stale = {code: sorted(named[code]) for code in EXEMPT if code in named}
    assert not stale, f"exempt codes are named by tests, drop their exemption: {stale}"
    missing = sorted(errors - set(named) - set(EXEMPT))
    assert not missing, (f"ERROR codes no test induces (name the code as a string literal in the test that "
                         f"makes it fire, or add it to EXEMPT in {this.name} with the reason): {missing}")
