"""Which base an adapter belongs to, and whether it fits a given base checkpoint.

A base checkpoint is fingerprinted without loading it: the canonical ``config.json`` plus the
safetensors headers (names, shapes, dtypes) and a few bytes sampled from every tensor, so a base
with the same shapes but other weights (another seed, ``-it`` vs pretrained) is told apart.
``write_manifest`` stores that fingerprint beside an adapter; ``check_adapter_matches_base``
refuses to combine an adapter with a base it was not trained on (G4T801) or does not fit (G4T802).

``resolve_adapter`` maps every PEFT adapter tensor onto the base tensor it changes, exactly as
PEFT would when loading the adapter onto that base:

* ``base_model.model.<module>.lora_A.weight`` on an ``nn.Linear`` -> ``<module>.weight``; tower
  projections are the inner ``.linear`` of ``Gemma4ClippableLinear``, so
  ``...q_proj.linear.lora_A.weight`` -> ``...q_proj.linear.weight`` (the official layout, row 2).
* ``target_parameters`` (MoE experts, row 16/17): PEFT nests one ``ParamWrapper`` per parameter on
  the owning module, in the module's parameter registration order, each new wrapper outside the
  previous one. For ``Gemma4TextExperts`` (``gate_up_proj`` then ``down_proj``) that gives
  ``...experts.lora_A.weight`` -> ``...experts.down_proj`` and
  ``...experts.base_layer.lora_A.weight`` -> ``...experts.gate_up_proj``. The order is read from
  the real module class (built on the meta device), never guessed from names.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma4_tune.findings import Finding, FindingError, Severity, finding, register
from gemma4_tune.io import write_json
from gemma4_tune.model.quantization import QuantSpec

DIFFERENT_BASE = register("G4T801", Severity.ERROR, "Adapter was trained on a different base")
ADAPTER_DOES_NOT_FIT = register("G4T802", Severity.ERROR, "Adapter does not fit this base checkpoint", (2, 17))
UNSUPPORTED_ADAPTER = register("G4T803", Severity.ERROR, "Adapter uses a feature the merge does not implement")
BASE_UNREADABLE = register("G4T804", Severity.ERROR, "Base checkpoint has no readable safetensors weights")
ADAPTER_INCOMPLETE = register("G4T805", Severity.ERROR, "Adapter directory is incomplete or empty", (23,))
UNWRAPPED_ADAPTER = register("G4T808", Severity.ERROR, "Adapter was made on unwrapped towers", (2,))
NO_MANIFEST = register("G4T807", Severity.INFO, "Adapter has no gemma4-tune manifest: base checked by names and shapes")
TEMPLATE_REVISION_DIFFERS = register("G4T812", Severity.WARNING,
                                     "Served with another chat template revision than it was trained with", (34,))
TEMPLATE_UNKNOWN = register("G4T813", Severity.ERROR, "Served chat template is no official revision", (34,))

MANIFEST_NAME = "gemma4_tune_manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PEFT_PREFIX = "base_model.model."

# Config keys that say how a checkpoint was saved, not what the model is.
_CONFIG_IGNORED = frozenset({"transformers_version", "_name_or_path", "dtype", "torch_dtype"})
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_SAMPLE_BYTES = 32  # per position (start, middle, end) of every tensor

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


# --------------------------------------------------------------------------- safetensors headers


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (absolute byte range), read from the header only."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.start

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return DTYPE_SIZES.get(self.dtype, 1)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and where its data begins; reads no tensor data."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError("it is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"it claims a {length}-byte header: not a safetensors file")
        try:
            header = json.loads(fh.read(length))
        except ValueError as exc:
            raise ValueError(f"its header is not JSON ({exc}): not a safetensors file, or cut short") from exc
    if not isinstance(header, dict):
        raise ValueError("its safetensors header is not a JSON object")
    return header, 8 + length


def tensors_in_file(path: Path) -> list[TensorInfo]:
    """Every tensor of one safetensors file, in data order, once the header proves the file whole.

    Reads the header only: each entry must be well formed, its byte range must hold ``dtype x shape``,
    the ranges must follow each other without gap or overlap, and the last must end where the file
    ends. A file cut short (an interrupted save or copy) or with trailing bytes raises ValueError.
    """
    header, data_start = read_safetensors_header(path)
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the header entry of {name} is malformed ({exc!r})") from exc
        size = math.prod(shape) * DTYPE_SIZES[dtype] if dtype in DTYPE_SIZES else end - begin
        if begin < 0 or end - begin != size:
            raise ValueError(f"tensor {name} ({dtype} {list(shape)}) has the byte range {begin}..{end}, "
                             f"not {size} bytes")
        out.append(TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end))
    out.sort(key=lambda t: (t.start, t.end))
    covered = data_start
    for info in out:
        if info.start != covered:
            raise ValueError(f"tensor {info.name} starts at byte {info.start}, but the previous tensor "
                             f"ends at {covered} (the header's byte ranges leave a gap or overlap)")
        covered = info.end
    actual = path.stat().st_size
    if actual != covered:
        what = "cut short (an interrupted save or copy)" if actual < covered else "followed by trailing bytes"
        raise ValueError(f"it is {actual} bytes but its header describes {covered}: the file is {what}")
    return out


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files that make up a checkpoint (from its index when sharded)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if (model_dir / SINGLE_NAME).is_file():
        return [model_dir / SINGLE_NAME]
    return sorted(p for p in model_dir.glob("*.safetensors") if p.name != ADAPTER_WEIGHTS)


def read_checkpoint(model_dir: Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for a whole checkpoint (headers only), in file then data order.

    Raises G4T804 when there are no safetensors weights or the headers cannot be read.
    """
    model_dir = Path(model_dir)
    fix = ("point at a Hugging Face checkpoint directory with model.safetensors or sharded "
           "model-*.safetensors + model.safetensors.index.json; convert .bin checkpoints with "
           "`model.save_pretrained(out, safe_serialization=True)`")
    if not model_dir.is_dir():
        raise FindingError(finding(BASE_UNREADABLE.code, f"{model_dir} is not a directory", fix))
    files = checkpoint_files(model_dir)
    if not files:
        raise FindingError(finding(BASE_UNREADABLE.code, f"{model_dir} holds no safetensors weights", fix))
    out: dict[str, TensorInfo] = {}
    for path in files:
        try:
            infos = tensors_in_file(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FindingError(finding(BASE_UNREADABLE.code, f"cannot read the safetensors header of {path}: {exc}",
                                       "re-download the checkpoint; the file is missing or truncated")) from exc
        for info in infos:
            if info.name in out:
                raise FindingError(finding(BASE_UNREADABLE.code, f"tensor {info.name} appears in both "
                                           f"{out[info.name].file.name} and {path.name}",
                                           "remove stray safetensors files from the checkpoint directory"))
            out[info.name] = info
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        missing = sorted(k for k, f in weight_map.items() if k not in out or out[k].file.name != f)
        if missing:
            raise FindingError(finding(BASE_UNREADABLE.code, f"{INDEX_NAME} lists {len(missing)} tensors that its "
                                       f"shards do not hold where it says (first: {missing[0]})",
                                       "re-download the checkpoint; the index and shards disagree"))
    return out


# --------------------------------------------------------------------------- fingerprint and manifest


def _strip_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_config(v) for k, v in value.items() if k not in _CONFIG_IGNORED}
    if isinstance(value, list):
        return [_strip_config(v) for v in value]
    return value


def canonical_config(model_dir: Path) -> str:
    """``config.json`` as canonical JSON (sorted keys) without save-time noise (version, name, dtype)."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FindingError(finding(BASE_UNREADABLE.code, f"cannot read {path}: {exc}",
                                   "point at a Hugging Face checkpoint directory with a config.json")) from exc
    return json.dumps(_strip_config(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _sample(fh: Any, info: TensorInfo) -> bytes:
    """Up to 3 x 32 bytes of a tensor's data: start, middle, end (everything when it is small)."""
    if info.nbytes <= 3 * _SAMPLE_BYTES:
        fh.seek(info.start)
        return fh.read(info.nbytes)
    parts = []
    for offset in (0, (info.nbytes - _SAMPLE_BYTES) // 2, info.nbytes - _SAMPLE_BYTES):
        fh.seek(info.start + offset)
        parts.append(fh.read(_SAMPLE_BYTES))
    return b"".join(parts)


def base_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """Identity of a base checkpoint, computed from headers and config without loading weights.

    ``config_sha256``: canonical config.json; ``tensors_sha256``: sorted ``name:shape:dtype`` lines;
    ``sample_sha256``: 96 bytes sampled from every tensor (a same-shaped base with other weights
    differs here); ``num_tensors`` and ``total_bytes``.
    """
    model_dir = Path(model_dir)
    tensors = read_checkpoint(model_dir)
    config_sha = hashlib.sha256(canonical_config(model_dir).encode()).hexdigest()
    lines = sorted(f"{t.name}:{json.dumps(list(t.shape), separators=(',', ':'))}:{t.dtype}" for t in tensors.values())
    tensors_sha = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    sample = hashlib.sha256()
    handles: dict[Path, Any] = {}
    try:
        for name in sorted(tensors):
            info = tensors[name]
            fh = handles.get(info.file)
            if fh is None:
                fh = handles[info.file] = open(info.file, "rb")  # noqa: SIM115 - closed below
            sample.update(name.encode() + b"\0" + _sample(fh, info))
    finally:
        for fh in handles.values():
            fh.close()
    return {"config_sha256": config_sha, "tensors_sha256": tensors_sha, "sample_sha256": sample.hexdigest(),
            "num_tensors": len(tensors), "total_bytes": sum(t.nbytes for t in tensors.values())}


def write_manifest(adapter_dir: str | Path, base_dir: str | Path, *, training: dict[str, Any],
                   versions: dict[str, Any], template_revision: str | None = None,
                   quantization: QuantSpec | None = None, data_modalities: dict[str, int] | None = None) -> Path:
    """Write ``gemma4_tune_manifest.json`` beside an adapter: base fingerprint, training settings, versions,
    with ``template_revision`` the chat template it was trained with (its revision and the sha256 of its text),
    with ``quantization`` (QLoRA) exactly how the base it trained against was quantized, and with
    ``data_modalities`` how many of the run's conversations held each modality (``{"text": n, "video": n, ...}``:
    verify compares video only for an adapter trained on it)."""
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    data = {
        "schema": 1,
        "kind": "gemma4_tune.adapter_manifest",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {"path": str(base_dir.resolve()), "fingerprint": base_fingerprint(base_dir)},
        "training": training,
        "versions": versions,
    }
    if template_revision is not None:
        from gemma4_tune.data.chat import OFFICIAL_REVISIONS

        data["chat_template"] = {"revision": template_revision, "sha256": OFFICIAL_REVISIONS[template_revision]}
    if quantization is not None:
        data["quantization"] = quantization.to_dict()
    if data_modalities is not None:
        data["data_modalities"] = {str(k): int(n) for k, n in data_modalities.items()}
    return write_json(adapter_dir / MANIFEST_NAME, data, sort_keys=True)


def read_manifest(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The adapter's manifest, or None when it has none."""
    path = Path(adapter_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise FindingError(finding(ADAPTER_INCOMPLETE.code, f"{path} is not valid JSON: {exc}",
                                   "re-export the adapter, or delete the damaged manifest")) from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("base", {}), dict):
        raise FindingError(finding(ADAPTER_INCOMPLETE.code, f"{path} is not a gemma4-tune manifest (a JSON object "
                                   "with a base section)", "re-export the adapter, or delete the damaged manifest"))
    return manifest


_COMPARED = ("config_sha256", "tensors_sha256", "sample_sha256")


def manifest_quantization(adapter_dir: str | Path) -> QuantSpec | None:
    """How the base of a QLoRA adapter was quantized in training (its manifest's record), None for LoRA on a
    full-precision base or an adapter without a manifest."""
    manifest = read_manifest(adapter_dir)
    section = (manifest or {}).get("quantization")
    if not section:
        return None
    try:
        return QuantSpec.from_dict(section)
    except TypeError as exc:
        raise FindingError(finding(ADAPTER_INCOMPLETE.code, f"{Path(adapter_dir) / MANIFEST_NAME}: its quantization "
                                   f"record cannot be read ({exc})", "re-export the adapter with the gemma4-tune "
                                   "version that trained it")) from exc


def manifest_findings(adapter_dir: Path, base_dir: Path, manifest: dict[str, Any] | None,
                      fingerprint: dict[str, Any] | None = None) -> list[Finding]:
    """G4T801 when the manifest's recorded base differs from ``base_dir``; nothing without a manifest."""
    if manifest is None:
        return []
    recorded = manifest.get("base", {}).get("fingerprint", {})
    actual = fingerprint or base_fingerprint(base_dir)
    differing = [k for k in _COMPARED if k in recorded and recorded[k] != actual.get(k)]
    if not differing:
        return []
    what = {"config_sha256": "config", "tensors_sha256": "tensor names/shapes/dtypes", "sample_sha256": "weights"}
    recorded_path = manifest.get("base", {}).get("path", "?")
    short = ", ".join(f"{k} {recorded.get(k, '?')[:12]}" for k in differing)
    short_actual = ", ".join(f"{k} {str(actual.get(k))[:12]}" for k in differing)
    return [finding(
        DIFFERENT_BASE.code,
        f"adapter {adapter_dir} was trained on {recorded_path} ({short}) but {base_dir} differs in "
        f"{', '.join(what[k] for k in differing)} ({short_actual})",
        f"merge with the base it was trained on ({recorded_path}), or retrain the adapter on {base_dir}",
        recorded_base=recorded_path, recorded_fingerprint=recorded, base=str(Path(base_dir).resolve()),
        base_fingerprint=actual)]


def served_chat_template(model_dir: str | Path) -> str | None:
    """The chat template a tokenizer loaded from ``model_dir`` gets: ``chat_template.jinja`` first (transformers
    prefers it), else the default of ``chat_template.json`` or ``tokenizer_config.json``; None when there is none."""
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            template = json.loads((model_dir / name).read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(template, list):
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if isinstance(template, str):
            return template
    return None


def served_template_findings(adapter_dir: str | Path, model_dir: str | Path,
                             manifest: dict[str, Any] | None) -> list[Finding]:
    """The chat template ``model_dir``'s tokenizer serves against the one the adapter's manifest recorded."""
    put_back = (f"give {model_dir} the {{trained}} template: python -c \"from gemma4_tune.data.chat import "
                f"official_template; open('{Path(model_dir) / 'chat_template.jinja'}', 'w')"
                ".write(official_template('{trained}'))\"")
    return template_findings(adapter_dir, str(model_dir), served_chat_template(model_dir), manifest, put_back)


def template_findings(adapter_dir: str | Path, where: str, served: str | None, manifest: dict[str, Any] | None,
                      put_back: str) -> list[Finding]:
    """The chat template ``served`` by ``where`` against the one the adapter's manifest recorded (catalog row 34).

    G4T812 (warning) when it is another official revision; G4T813 (error) when it is no official revision or
    missing. Nothing when the manifest recorded no template (adapters of other tools, older manifests).
    ``put_back`` is the fix, with ``{trained}`` for the recorded revision.
    """
    from gemma4_tune.data.chat import detect_revision, template_sha256

    recorded = (manifest or {}).get("chat_template")
    if not isinstance(recorded, dict) or not recorded.get("revision"):
        return []
    trained = recorded["revision"]
    if served is not None and template_sha256(served) == recorded.get("sha256"):
        return []
    revision = detect_revision(served) if served is not None else None
    if revision == trained:
        return []
    put_back = put_back.format(trained=trained)
    details = {"trained_revision": trained, "served_revision": revision, "model": where,
               "served_sha256": template_sha256(served) if served is not None else None}
    if revision is None:
        what = "no chat template" if served is None else \
            f"a chat template that is no official Gemma 4 revision (sha256 {template_sha256(served)[:12]})"
        return [finding(TEMPLATE_UNKNOWN.code, f"adapter {adapter_dir} was trained with the official chat template "
                        f"{trained} (sha256 {str(recorded.get('sha256'))[:12]}), but {where} has {what}: prompts "
                        "would be rendered unlike anything it was trained on", f"{put_back}, or serve a checkpoint "
                        f"that has the official {trained} template", **details)]
    return [finding(TEMPLATE_REVISION_DIFFERS.code, f"adapter {adapter_dir} was trained with chat template {trained}, "
                    f"but {where} serves {revision}: tool calls, thinking and turn ends may render unlike training",
                    f"{put_back}, or retrain with --template-revision {revision}", **details)]


def check_served_template(adapter_dir: str | Path, model_dirs: Iterable[str | Path | None]) -> list[Finding]:
    """``served_template_findings`` for each model directory the adapter is served or verified with (None skipped).

    Raises FindingError when one is an error (G4T813); returns the warnings (G4T812).
    """
    manifest = read_manifest(adapter_dir)
    findings = [f for model_dir in model_dirs if model_dir is not None
                for f in served_template_findings(adapter_dir, model_dir, manifest)]
    if any(f.severity is Severity.ERROR for f in findings):
        raise FindingError(*findings)
    return findings


# --------------------------------------------------------------------------- adapter -> base mapping


@dataclass(frozen=True)
class LoraDelta:
    """One LoRA update of one base tensor: ``W += scaling * delta(B, A)`` in PEFT's layout."""

    base_key: str  # checkpoint key of the tensor it changes
    lora_a: str  # adapter tensor keys
    lora_b: str
    kind: str  # "linear" (2-D weight) or "experts" (3-D ParamWrapper parameter)
    rank: int
    alpha: float
    scaling: float
    num_experts: int = 1
    transposed: bool = False  # experts stored (experts, in, out) instead of (experts, out, in)


@dataclass
class AdapterLayout:
    """What an adapter changes in a base checkpoint, and what is wrong with the pairing."""

    adapter_dir: Path
    config: dict[str, Any]
    weights: Path | None
    deltas: dict[str, list[LoraDelta]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def num_deltas(self) -> int:
        """Number of LoRA updates (one per adapted module or parameter)."""
        return sum(len(v) for v in self.deltas.values())


_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _feature_findings(config: dict[str, Any]) -> list[Finding]:
    """G4T803 for every adapter feature a plain ``W + s * B @ A`` merge cannot reproduce."""
    fix = "merge with PEFT's merge_and_unload() on a machine that holds the model, or train a plain LoRA adapter"
    out: list[Finding] = []

    def refuse(what: str) -> None:
        out.append(finding(UNSUPPORTED_ADAPTER.code, f"the adapter uses {what}; the streaming merge does not "
                           "implement it", fix))

    if config.get("peft_type", "LORA") != "LORA":
        refuse(f"peft_type {config.get('peft_type')!r} (only LORA is merged)")
    if config.get("use_dora"):
        refuse("DoRA (use_dora=true)")
    for flag in ("lora_bias", "fan_in_fan_out", "use_qalora", "use_bdlora", "alora_invocation_tokens",
                 "layer_replication", "modules_to_save", "trainable_token_indices", "arrow_config",
                 "megatron_config", "velora_config", "kasa_config", "monteclora_config"):
        if config.get(flag):
            refuse(f"{flag}={config[flag]!r}")
    if config.get("bias", "none") != "none":
        refuse(f"bias={config['bias']!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        refuse(f"init_lora_weights={init!r}, which changes the base weights at initialisation (convert it to a "
               "plain LoRA with PEFT's path_initial_model_for_weight_conversion first)")
    return out


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``key`` at a dot boundary."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _meta_model(base_dir: Path) -> Any:
    """The base's real module tree on the meta device (no weights): the source of parameter order."""
    import warnings

    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(base_dir))
    arch = (getattr(config, "architectures", None) or ["Gemma4ForConditionalGeneration"])[0]
    cls = getattr(transformers, arch, None) or transformers.Gemma4ForConditionalGeneration
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return cls(config)


def checkpoint_names(base_dir: Path) -> Callable[[str], str]:
    """Module-tree key -> the key the checkpoint stores it under: transformers' own renamings of this model
    (the 12B's ``embed_vision.patch_dense`` is ``vision_embedder.patch_dense`` on disk), reversed as
    ``save_pretrained`` reverses them. Legacy load-time renamings are not reversed: saving never applies them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    try:
        renamings = [t.reverse_transform() for t in get_model_conversion_mapping(_meta_model(base_dir),
                                                                                 add_legacy=False)
                     if isinstance(t, WeightRenaming)]
    except Exception:  # noqa: BLE001 - no module tree, no renaming: the key stays as it is
        renamings = []

    def rename(key: str) -> str:
        for renaming in renamings:
            key, _ = renaming.rename_source_key(key)
        return key

    return rename


@dataclass(frozen=True)
class _ParamTargets:
    names: tuple[str, ...]  # targeted parameters of one module, innermost wrapper first
    transposed: bool


def _param_targets(base_dir: Path, target_parameters: Iterable[str]) -> dict[str, _ParamTargets]:
    """Owner module path -> its targeted parameters in PEFT's nesting order (registration order)."""
    targets = set(target_parameters)
    model = _meta_model(base_dir)
    out: dict[str, _ParamTargets] = {}
    for module_name, module in model.named_modules():
        names = []
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if key in targets or any(key.endswith(f".{t}") for t in targets):
                names.append(param_name)
        if names:
            out[module_name] = _ParamTargets(tuple(names), bool(getattr(module, "is_transposed", False)))
    return out


_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<ab>lora_A|lora_B)\.weight$")


def _hint(module: str, base: dict[str, TensorInfo]) -> str:
    if module.endswith(".linear") and f"{module[: -len('.linear')]}.weight" in base:
        return " (the base has no .linear wrapper here: the adapter was made for another model)"
    return ""


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """An adapter directory's ``adapter_config.json`` and the tensors of its weights file, proven whole.

    The one place adapters are read before anything loads them: raises G4T805 naming what is wrong when
    the directory, the config (missing, not JSON, not an object, a non-numeric ``r``/``lora_alpha``) or
    ``adapter_model.safetensors`` (missing, not safetensors, cut short: see ``tensors_in_file``) is not
    a complete adapter. Reads headers only.
    """
    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS

    def incomplete(message: str, fix: str) -> FindingError:
        return FindingError(finding(ADAPTER_INCOMPLETE.code, message, fix))

    if not adapter_dir.is_dir():
        raise incomplete(f"adapter {adapter_dir} is not a directory", "point at a PEFT adapter directory (the "
                         "adapter/ folder of a run, or one saved with save_pretrained)")
    if not cfg_path.is_file():
        raise incomplete(f"{adapter_dir} has no {ADAPTER_CONFIG}",
                         "point at a PEFT adapter directory (saved with save_pretrained)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise incomplete(f"{cfg_path} is not valid JSON: {exc}", "re-save the adapter (or re-copy it: the file "
                         "is damaged or was cut short)") from exc
    if not isinstance(config, dict):
        raise incomplete(f"{cfg_path} holds a JSON {type(config).__name__}, not an object of LoRA settings",
                         "re-save the adapter")
    bad = [key for key in ("r", "lora_alpha") if key in config
           and (isinstance(config[key], bool) or not isinstance(config[key], (int, float)))]
    if bad:
        raise incomplete(f"{cfg_path}: {', '.join(f'{k}={config[k]!r}' for k in bad)} is not a number",
                         "re-save the adapter")
    if not weights.is_file():
        bin_hint = " (found adapter_model.bin: re-save with safe_serialization=True)" \
            if (adapter_dir / "adapter_model.bin").is_file() else ""
        raise incomplete(f"{adapter_dir} has no {ADAPTER_WEIGHTS}{bin_hint}",
                         "save the adapter with PEFT's save_pretrained (safetensors)")
    try:
        tensors = {t.name: t for t in tensors_in_file(weights)}
    except (OSError, ValueError) as exc:
        raise incomplete(f"{weights} is not a complete safetensors file: {exc}",
                         "re-save the adapter (or re-copy it): the file is truncated or not safetensors; a run's "
                         "last complete checkpoint in checkpoints/ holds the same adapter_model.safetensors") from exc
    return config, tensors


def resolve_adapter(adapter_dir: str | Path, base_dir: str | Path,
                    base_tensors: dict[str, TensorInfo] | None = None) -> AdapterLayout:
    """Map every adapter tensor to the base tensor it changes; problems go to ``layout.findings``.

    Checks (G4T802) that each adapted module exists in the base with the shapes the LoRA factors
    need, (G4T803) that the adapter uses nothing beyond plain LoRA/rsLoRA with rank/alpha patterns,
    and (G4T805) that the adapter is complete and not empty.
    """
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    base = base_tensors if base_tensors is not None else read_checkpoint(base_dir)
    config, adapter_tensors = read_adapter(adapter_dir)
    layout = AdapterLayout(adapter_dir, config, adapter_dir / ADAPTER_WEIGHTS)
    layout.findings += _feature_findings(config)
    if not adapter_tensors:
        layout.findings.append(finding(ADAPTER_INCOMPLETE.code, f"{layout.weights} holds no tensors",
                                       "re-save the adapter from the trained model"))
        return layout
    empty = sorted(n for n, t in adapter_tensors.items() if 0 in t.shape)
    if empty:
        layout.findings.append(finding(ADAPTER_INCOMPLETE.code, f"{len(empty)} adapter tensors have no elements "
                                       f"(first: {empty[0]}); a ZeRO-3 save without gathering (row 23)",
                                       "save under deepspeed.zero.GatheredParameters, or re-export from a "
                                       "checkpoint"))
        return layout

    # Group lora_A / lora_B per adapted module path.
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for name, info in adapter_tensors.items():
        local = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        match = _LORA_KEY.match(local)
        if match is None:
            kind = "DoRA magnitude vectors" if "lora_magnitude_vector" in local else \
                "embedding LoRA" if "lora_embedding_" in local else f"the tensor {name}"
            layout.findings.append(finding(UNSUPPORTED_ADAPTER.code, f"the adapter holds {kind}; the streaming merge "
                                           "only merges lora_A/lora_B weights of linear layers and expert "
                                           "parameters", "merge with PEFT's merge_and_unload(), or train a plain "
                                           "LoRA adapter"))
            continue
        pairs.setdefault(match["module"], {})[match["ab"]] = info

    target_parameters = config.get("target_parameters") or []
    param_targets: dict[str, _ParamTargets] = {}
    if target_parameters:
        try:
            param_targets = _param_targets(base_dir, target_parameters)
        except Exception as exc:  # noqa: BLE001 - any failure to build the module tree is reported
            layout.findings.append(finding(BASE_UNREADABLE.code, f"cannot build the module tree of {base_dir} to "
                                           f"place the adapter's target_parameters: {exc}",
                                           "point at a Gemma 4 checkpoint directory whose config.json the "
                                           "installed transformers can read"))
            return layout
    if target_parameters:
        found = {f"{owner}.{n}" for owner, t in param_targets.items() for n in t.names}
        for target in target_parameters:
            if not any(k == target or k.endswith(f".{target}") for k in found):
                layout.findings.append(finding(ADAPTER_DOES_NOT_FIT.code, f"target_parameters entry {target!r} "
                                               f"matches no parameter of the base model in {base_dir}",
                                               "merge into the base the adapter was trained on"))
    rank, alpha = int(config.get("r", 8)), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora"))

    def misfit(message: str) -> None:
        layout.findings.append(finding(ADAPTER_DOES_NOT_FIT.code, message,
                                       "merge into the base the adapter was trained on (adapter_config.json "
                                       f"names {config.get('base_model_name_or_path')!r})"))

    names: list[Callable[[str], str]] = []

    def checkpoint_key(key: str) -> str:
        if not names:
            names.append(checkpoint_names(base_dir))
        return names[0](key)

    unwrapped: list[str] = []
    for module in sorted(pairs):
        ab = pairs[module]
        if set(ab) != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in ab else "lora_A"
            layout.findings.append(finding(ADAPTER_INCOMPLETE.code, f"{module} has no {missing}.weight in "
                                           f"{layout.weights.name}", "re-save the adapter from the trained model"))
            continue
        a, b = ab["lora_A"], ab["lora_B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            layout.findings.append(finding(UNSUPPORTED_ADAPTER.code, f"{module}: LoRA factors of shape "
                                           f"{list(a.shape)} / {list(b.shape)} (convolution LoRA) are not merged",
                                           "merge with PEFT's merge_and_unload()"))
            continue
        if a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
            layout.findings.append(finding(UNSUPPORTED_ADAPTER.code, f"{module}: LoRA factors in {a.dtype}/"
                                           f"{b.dtype}; only float factors are merged", "save the adapter unquantized"))
            continue
        owner, depth = module, 0
        while owner.endswith(".base_layer"):
            owner, depth = owner[: -len(".base_layer")], depth + 1
        num_experts, transposed = 1, False
        if owner in param_targets:
            names = param_targets[owner].names
            if depth >= len(names):
                misfit(f"{module}: nested {depth + 1} ParamWrappers deep, but only {len(names)} parameters of "
                       f"{owner} are targeted")
                continue
            param = names[len(names) - 1 - depth]  # outermost wrapper holds the last registered parameter
            base_key, current_key, kind = f"{owner}.{param}", f"{owner}.{param}", "experts"
            transposed = param_targets[owner].transposed
        elif depth:
            layout.findings.append(finding(UNSUPPORTED_ADAPTER.code, f"{module}: a LoRA layer wrapped in another "
                                           "one is not merged", "merge with PEFT's merge_and_unload()"))
            continue
        else:
            base_key, current_key, kind = f"{module}.weight", module, "linear"
            if base_key not in base:
                base_key = checkpoint_key(base_key)
        info = base.get(base_key)
        if info is None and f"{module}.linear.weight" in base:
            unwrapped.append(module)
            continue
        if info is None:
            misfit(f"the adapter changes {module}, but the base has no tensor {base_key}{_hint(module, base)}")
            continue
        if info.dtype not in FLOAT_DTYPES:
            layout.findings.append(finding(UNSUPPORTED_ADAPTER.code, f"{base_key} is stored as {info.dtype}; merging "
                                           "into quantized base weights is not implemented",
                                           "merge into the unquantized (bf16/fp16/fp32) checkpoint"))
            continue
        r_cfg = int(_pattern_value(rank_pattern, current_key, rank))
        alpha_cfg = _pattern_value(alpha_pattern, current_key, alpha)
        if kind == "experts" and len(info.shape) == 3:
            num_experts = info.shape[0]
            d_in, d_out = (info.shape[1], info.shape[2]) if transposed else (info.shape[2], info.shape[1])
        elif len(info.shape) == 2:
            kind, d_out, d_in = ("linear", info.shape[0], info.shape[1])
        else:
            misfit(f"the adapter changes {module} with 2-D LoRA factors, but base {base_key} has shape "
                   f"{list(info.shape)}")
            continue
        r_a, r_b = a.shape[0], b.shape[1]
        problems = []
        if a.shape[1] != d_in:
            problems.append(f"lora_A {list(a.shape)} needs in-features {a.shape[1]}, base has {d_in}")
        if b.shape[0] != d_out:
            problems.append(f"lora_B {list(b.shape)} needs out-features {b.shape[0]}, base has {d_out}")
        if r_a != r_b or r_a % num_experts:
            problems.append(f"lora_A {list(a.shape)} and lora_B {list(b.shape)} disagree on rank x experts "
                            f"({num_experts} experts)")
        elif r_a // num_experts != r_cfg:
            problems.append(f"factors have rank {r_a // num_experts} but adapter_config.json says {r_cfg}")
        if problems:
            misfit(f"the adapter does not fit {base_key} {list(info.shape)}: " + "; ".join(problems))
            continue
        scaling = alpha_cfg / math.sqrt(r_cfg) if use_rslora else alpha_cfg / r_cfg
        layout.deltas.setdefault(base_key, []).append(LoraDelta(base_key, a.name, b.name, kind, r_cfg,
                                                                float(alpha_cfg), scaling, num_experts, transposed))
    if unwrapped:
        layout.findings.append(finding(
            UNWRAPPED_ADAPTER.code, f"{len(unwrapped)} modules of {adapter_dir} were trained on unwrapped towers (the "
            f"popular row-2 'unwrap' fix): the adapter names them as plain linears (e.g. {unwrapped[0]}) where this "
            "base keeps the Gemma4ClippableLinear and its inner .linear",
            f"repair it exactly (the factors are the inner linear's own): gemma4-tune repair --base {base_dir} "
            f"--adapter {adapter_dir} --out REPAIRED", modules=len(unwrapped)))
    if not layout.deltas and not layout.findings:
        layout.findings.append(finding(ADAPTER_INCOMPLETE.code, f"{layout.weights} holds no LoRA factors",
                                       "re-save the adapter from the trained model"))
    return layout


@dataclass
class CheckedAdapter:
    """An adapter proven to belong to and fit a base: its layout, the base's tensors and fingerprint."""

    layout: AdapterLayout
    base_tensors: dict[str, TensorInfo]
    fingerprint: dict[str, Any]
    manifest: dict[str, Any] | None

    @property
    def notes(self) -> list[Finding]:
        """What the user should know about how the adapter was checked (G4T807 without a manifest)."""
        if self.manifest is not None:
            return []
        return [finding(NO_MANIFEST.code, f"{self.layout.adapter_dir} has no {MANIFEST_NAME} (it was made by stock "
                        "PEFT, Unsloth, Axolotl or another tool): that it belongs to this base is checked by its module "
                        "names and LoRA shapes only, not by the base's fingerprint",
                        "nothing to do if you know the base; adapters trained with gemma4-tune record it")]


def checked_adapter(adapter_dir: str | Path, base_dir: str | Path) -> CheckedAdapter:
    """``check_adapter_matches_base`` that also hands back what it read (the merge builds on it)."""
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    base = read_checkpoint(base_dir)
    fingerprint = base_fingerprint(base_dir)
    manifest = read_manifest(adapter_dir)
    findings = manifest_findings(adapter_dir, base_dir, manifest, fingerprint)
    layout = resolve_adapter(adapter_dir, base_dir, base)
    findings += layout.findings
    if findings:
        raise FindingError(*findings)
    return CheckedAdapter(layout, base, fingerprint, manifest)


def check_adapter_matches_base(adapter_dir: str | Path, base_dir: str | Path) -> list[Finding]:
    """Raise FindingError unless the adapter belongs to (G4T801) and fits (G4T802/803/805) this base.

    G4T801 needs the adapter's manifest; the fit checks (every adapted module exists in the base with
    the shapes its LoRA factors need) run with or without one, and without one G4T807 (info) says so.
    """
    return checked_adapter(adapter_dir, base_dir).notes
