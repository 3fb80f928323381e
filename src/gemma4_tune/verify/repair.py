"""``gemma4-tune repair``: artefacts made with the popular "unwrap" fix (catalog row 2), put back exactly.

An adapter trained on unwrapped towers names ``...q_proj.lora_A`` where the official model has the
``Gemma4ClippableLinear`` ``...q_proj`` wrapping ``...q_proj.linear``: the LoRA factors are the inner linear's
own, so renaming them onto ``.linear`` is exact. A merged checkpoint saved from unwrapped towers has
``...q_proj.weight`` for ``...q_proj.linear.weight`` and lost the clamp buffers (and, from transformers >= 5.5.2,
the KV-shared layers' k/v keys, row 7): renaming back and taking exactly those missing keys from the base
(which the merge never changes) rebuilds the official layout. Anything else (a key the base does not have, a
missing weight the merge would have changed, a shape that differs) cannot be repaired exactly and is refused.
The result is verified before it is moved into place.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from gemma4_tune.export.gguf import CLIP_BUFFERS
from gemma4_tune.export.manifest import PEFT_PREFIX, read_checkpoint
from gemma4_tune.findings import Finding, FindingError, Severity, finding, register
from gemma4_tune.io import atomic_directory

CANNOT_REPAIR = register("G4T809", Severity.ERROR, "An artefact cannot be repaired exactly", (2,))
NOTHING_TO_REPAIR = register("G4T810", Severity.ERROR, "Nothing to repair", (2,))
REPAIR_UNVERIFIED = register("G4T811", Severity.WARNING, "Repaired checkpoint not compared with the trained model")

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_[AB])\.weight$")
_KV_SHARED_KEY = re.compile(r"\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm)\.")
INDEX = "model.safetensors.index.json"
FROM_BASE = "model-from-base.safetensors"


def _refuse(message: str, fix: str) -> FindingError:
    return FindingError(finding(CANNOT_REPAIR.code, message, fix))


def unwrapped_modules(keys: list[str], base: dict[str, Any]) -> list[str]:
    """Adapter modules named without the ``.linear`` this base keeps (an adapter made on unwrapped towers)."""
    found = []
    for key in keys:
        match = _LORA_KEY.match(key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key)
        if match and f"{match['module']}.weight" not in base and f"{match['module']}.linear.weight" in base:
            found.append(match["module"])
    return sorted(set(found))


def repair_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> dict[str, Any]:
    """A copy of an unwrap-style adapter with its tower factors renamed onto the inner ``.linear``, verified."""
    from safetensors.torch import load_file, save_file

    from gemma4_tune.export.manifest import check_adapter_matches_base, read_adapter
    from gemma4_tune.verify.parity import verify_artefacts
    from gemma4_tune.verify.verdict import report_findings, summarize

    base, adapter, out = Path(base), Path(adapter), Path(out)
    base_tensors = read_checkpoint(base)
    read_adapter(adapter)  # a damaged adapter is G4T805, before anything loads it
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    modules = set(unwrapped_modules(list(tensors), base_tensors))
    if not modules:
        raise FindingError(finding(NOTHING_TO_REPAIR.code, f"{adapter} names no module the way unwrapped towers do",
                                   "nothing to do: check it with `gemma4-tune export --base B --adapter A`"))
    renamed: dict[str, Any] = {}
    for key, value in tensors.items():
        local = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = _LORA_KEY.match(local)
        if match and match["module"] in modules:
            key = f"{PEFT_PREFIX}{match['module']}.linear.{match['factor']}.weight"
        renamed[key] = value.contiguous()
    config = json.loads((adapter / "adapter_config.json").read_text())
    targets = sorted({m["module"] for k in renamed if (m := _LORA_KEY.match(k[len(PEFT_PREFIX):]))})
    config["target_modules"] = targets  # exact module paths: a bare name would also hit the wrapper (row 1)
    with atomic_directory(out) as tmp:
        for item in adapter.iterdir():
            if item.name not in ("adapter_model.safetensors", "adapter_config.json") and item.is_file():
                shutil.copy2(item, tmp / item.name)
        save_file(renamed, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        notes = check_adapter_matches_base(tmp, base)
        rows = verify_artefacts(base, tmp, None, ["peft"])
        if not all(r.ok for r in rows):
            raise FindingError(*report_findings(rows))
    return {"adapter": str(out), "renamed_modules": len(modules), "example": sorted(modules)[0],
            "verify": summarize(rows), "findings": notes}


def _kv_shared_layers(base: Path) -> set[int]:
    from gemma4_tune.model.profile import ModelProfile

    profile = ModelProfile.from_pretrained(base, count_parameters=False)
    return {layer.index for layer in profile.layers if layer.kv_sharing == "reuse"}


def repair_merged(base: str | Path, merged: str | Path, out: str | Path,
                  adapter: str | Path | None = None) -> dict[str, Any]:
    """An unwrap-damaged merged checkpoint rebuilt into the official key layout, verified in stock transformers.

    Renamed keys go back to ``.linear.weight``; the clamp buffers and KV-shared layers' k/v keys it lost come
    from the base. With ``adapter`` (the one it was merged from) the result must reproduce base + adapter.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from gemma4_tune.verify.parity import verify_artefacts
    from gemma4_tune.verify.verdict import report_findings, summarize

    base, merged, out = Path(base), Path(merged), Path(out)
    base_tensors, damaged = read_checkpoint(base), read_checkpoint(merged)
    names: dict[str, str] = {}
    unknown = []
    for key, info in damaged.items():
        target = key
        if key not in base_tensors and key.endswith(".weight") and f"{key[: -len('.weight')]}.linear.weight" in base_tensors:
            target = f"{key[: -len('.weight')]}.linear.weight"
        if target not in base_tensors:
            unknown.append(key)
            continue
        if tuple(base_tensors[target].shape) != tuple(info.shape):
            raise _refuse(f"{key} has shape {list(info.shape)} but the base's {target} is "
                          f"{list(base_tensors[target].shape)}", "repair against the base it was merged from")
        names[key] = target
    if unknown:
        raise _refuse(f"{len(unknown)} keys of {merged} are not in the base, e.g. {unknown[0]}",
                      "repair against the base it was merged from; a key the base lacks cannot be placed exactly")
    renamed = sum(1 for k, v in names.items() if k != v)
    shared = _kv_shared_layers(base)
    missing = sorted(set(base_tensors) - set(names.values()))
    from_base, lost = [], []
    for key in missing:
        kv = (m := _KV_SHARED_KEY.search(key)) is not None and int(m.group(1)) in shared
        (from_base if key.rsplit(".", 1)[-1] in CLIP_BUFFERS or kv else lost).append(key)
    if lost:
        raise _refuse(f"{len(lost)} weights of the base are missing from {merged} and are not ones a merge leaves "
                      f"unchanged, e.g. {lost[0]}: taking them from the base would undo the fine-tune there",
                      "merge again from the adapter with `gemma4-tune export --merged`")
    if not renamed and not from_base:
        raise FindingError(finding(NOTHING_TO_REPAIR.code, f"{merged} already has the official key layout",
                                   "nothing to do: verify it with `gemma4-tune verify --merged`"))
    with atomic_directory(out) as tmp:
        for item in merged.iterdir():
            if item.is_file() and not item.name.endswith(".safetensors") and item.name != INDEX:
                shutil.copy2(item, tmp / item.name)
        weight_map: dict[str, str] = {}
        for file in sorted({info.file for info in damaged.values()}):
            with safe_open(str(file), "pt") as f:
                part = {names[k]: f.get_tensor(k) for k in f.keys() if k in names}
            # a single-file checkpoint becomes a sharded one: transformers reads model.safetensors alone, never
            # the index, so the keys from the base must come through an index
            name = "model-repaired.safetensors" if file.name == "model.safetensors" else file.name
            save_file(part, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        copied = {}
        for key in from_base:
            with safe_open(str(base_tensors[key].file), "pt") as f:
                copied[key] = f.get_tensor(key)
        if copied:
            save_file(copied, str(tmp / FROM_BASE), metadata={"format": "pt"})
            weight_map.update({k: FROM_BASE for k in copied})
        (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))},
                                            indent=2) + "\n")
        findings: list[Finding] = []
        if adapter is not None:
            rows = verify_artefacts(base, Path(adapter), tmp, ["transformers"])
            findings = report_findings(rows)
            verified = summarize(rows)
        else:
            verified = _loads_cleanly(base, tmp)
            findings = verified.pop("findings")
        if any(f.severity is Severity.ERROR for f in findings):
            raise FindingError(*findings)
    return {"merged": str(out), "renamed": renamed, "from_base": len(from_base), "verify": verified,
            "findings": findings}


def _loads_cleanly(base: Path, merged: Path) -> dict[str, Any]:
    """Without the adapter: stock transformers must load every key (empty loading report); parity is not known."""
    from gemma4_tune.verify.parity import MERGED_LOAD_REPORT, run_stock
    from gemma4_tune.verify.prompts import batches

    stock = run_stock(base, None, merged, batches(base))
    info = stock.get("merged_loading_info") or {}
    findings = [finding(REPAIR_UNVERIFIED.code, f"{merged} loads in stock transformers with every key in place; whether it "
                        "behaves like the trained model was not verified", "give --adapter (the one it was merged "
                        "from) to compare it with base + adapter")]
    if any(info.values()):
        findings.append(finding(MERGED_LOAD_REPORT.code, f"the repaired checkpoint still loads with a loading report: "
                                f"{ {k: v[:3] for k, v in info.items() if v} }", "report it with the checkpoint"))
    effect = max(float((stock["transformers"][m] - stock["base"][m]).abs().max()) for m in stock["base"])
    return {"loading_report": info, "differs_from_base_by": effect, "findings": findings}
