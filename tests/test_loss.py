"""Issue 18: the loss projects only the supervised positions, in chunks, and is exactly the full computation.

The reference is the model's own full logits (``lm_head`` over every position, the final softcap) and a
cross-entropy over the supervised ones (``tests.lora_helpers.full_logits_sums``). The chunked loss and its
gradients must equal it (fp32: loss rel 1e-6, gradients rel 1e-5 of their norm; float64: 1e-12) on text, image and audio batches, padded and packed, one chunk or
many, and under gradient accumulation (failure-catalog row 26: per token across micro-batches).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma4_tune.model import loss
from tests.lora_helpers import full_logits_sums, random_lora_model


@pytest.fixture(scope="module")
def setup(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """E2B with random LoRA on the text and both towers, its batcher, and demo examples by modality."""
    from transformers import AutoProcessor

    from gemma4_tune.data.collate import Gemma4Batcher
    from gemma4_tune.data.demo_data import write_demo_dataset
    from gemma4_tune.data.records import load_conversations

    base = tiny_models["e2b"]
    model = random_lora_model(base, "text,vision,audio")
    model.eval()  # no dropout: both computations see the same function
    batcher = Gemma4Batcher(AutoProcessor.from_pretrained(str(base)), max_seq_len=256)
    convs, _ = load_conversations(write_demo_dataset(tmp_path_factory.mktemp("loss-data"), n=24))
    examples = [batcher.encode(c) for c in convs]
    def kind(e: dict) -> str:
        return "image" if "pixel_values" in e else "audio" if "input_features" in e else "text"

    kinds = {k: [e for e in examples if kind(e) == k] for k in ("text", "image", "audio")}
    assert all(len(v) >= 2 for v in kinds.values()), {k: len(v) for k, v in kinds.items()}
    return model, batcher, kinds


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _reference(model, inputs, labels) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    model.zero_grad()
    total, count, _ = full_logits_sums(model(**inputs).logits, labels)
    (total / count).backward()
    return total.detach(), int(count), _grads(model)


def _chunked(model, inputs, labels) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    model.zero_grad()
    total, count, _ = loss.batch_sums(model, inputs, labels)
    (total / count).backward()
    return total.detach(), int(count), _grads(model)


#: fp32 bounds. The loss agrees within 1e-6; the gradients within 4.8e-6 of their norm in the worst tensor (the
#: first text layer's q_proj lora_A on the audio batch with 7-position chunks; 0.9e-6 to 1.5e-6 elsewhere):
#: matmuls of another shape sum in another order, and the deepest backward amplifies it. In float64 the two
#: agree to 1e-12 (test below): the difference is rounding, not another computation.
LOSS_REL, GRAD_REL = 1e-6, 1e-5


def _assert_same(ref, ours, loss_rel: float = LOSS_REL, grad_rel: float = GRAD_REL) -> None:
    (ref_total, ref_n, ref_grads), (total, n, grads) = ref, ours
    assert n == ref_n > 0
    assert float(total) == pytest.approx(float(ref_total), rel=loss_rel)
    assert set(grads) == set(ref_grads) and len(grads) > 0
    for name, g in ref_grads.items():  # relative to the gradient's norm
        assert float((grads[name] - g).norm()) <= grad_rel * float(g.norm()), name


@pytest.mark.parametrize("kind", ["text", "image", "audio"])
@pytest.mark.parametrize("chunk_positions", [7, None])  # many chunks, or one
def test_chunked_loss_and_gradients_equal_the_full_logits(setup, monkeypatch, kind, chunk_positions) -> None:
    model, batcher, kinds = setup
    if chunk_positions:
        monkeypatch.setattr(loss, "CHUNK_BYTES", 4 * model.get_output_embeddings().weight.shape[0] * chunk_positions)
    batch = batcher.collate(kinds[kind][:2])
    labels = batch.pop("labels")
    _assert_same(_reference(model, batch, labels), _chunked(model, batch, labels))


@pytest.mark.parametrize("kind", ["text", "image"])  # the audio tower runs in float32 only
def test_in_float64_the_difference_vanishes(setup, monkeypatch, kind) -> None:
    """The same comparison in float64, many chunks: equal to 1e-12."""
    import copy

    model, batcher, kinds = setup
    wide = copy.deepcopy(model).double()
    monkeypatch.setattr(loss, "CHUNK_BYTES", 4 * model.get_output_embeddings().weight.shape[0] * 7)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batcher.collate(kinds[kind][:2]).items()}
    labels = batch.pop("labels")
    _assert_same(_reference(wide, batch, labels), _chunked(wide, batch, labels), 1e-12, 1e-12)


def test_packed_rows_give_the_same_loss_and_gradients(setup, monkeypatch) -> None:
    model, batcher, kinds = setup
    monkeypatch.setattr(loss, "CHUNK_BYTES", 4 * model.get_output_embeddings().weight.shape[0] * 5)
    batch = batcher.collate(batcher.pack(kinds["text"][:4], 256))
    labels = batch.pop("labels")
    _assert_same(_reference(model, batch, labels), _chunked(model, batch, labels))


def test_row26_accumulated_micro_batches_weigh_tokens_like_the_whole_batch(setup) -> None:
    """Two micro-batches divided by the supervised tokens of both (``num_items_in_batch``) give the whole
    batch's per-token loss and gradients; a mean of per-batch means does not."""
    model, batcher, kinds = setup
    a, b = batcher.collate(kinds["text"][:1]), batcher.collate(kinds["image"][:3])
    la, lb = a.pop("labels"), b.pop("labels")
    model.zero_grad()
    ref = [full_logits_sums(model(**x).logits, y)[:2] for x, y in ((a, la), (b, lb))]
    n = int(ref[0][1] + ref[1][1])
    ((ref[0][0] + ref[1][0]) / n).backward()
    want = _grads(model)
    model.zero_grad()
    fn = loss.SupervisedLoss()
    got = []
    for x, y in ((a, la), (b, lb)):
        with fn.capture(model):
            model(**x, logits_to_keep=loss.no_logits(y))
            step = fn(None, y, num_items_in_batch=n)
        step.backward()
        got.append(float(step.detach()))
    assert sum(got) == pytest.approx(float((ref[0][0] + ref[1][0]).detach() / n), rel=1e-6)
    for name, g in want.items():
        assert float((model.get_parameter(name).grad - g).norm()) <= 1e-6 * float(g.norm()), name
    per_batch_mean = float((ref[0][0] / ref[0][1] + ref[1][0] / ref[1][1]).detach()) / 2
    # the two means differ by about 1e-3 of the loss on the random tiny model (both batches near ln(vocab)); float32
    # rounding is about 1e-7: a tolerance of 1e-5 tells the two apart on every run
    assert per_batch_mean != pytest.approx(sum(got), rel=1e-5)


def test_the_vocabulary_projection_runs_only_at_supervised_positions(setup) -> None:
    """What saves the memory: lm_head sees exactly the positions that carry a label, no others."""
    model, batcher, kinds = setup
    batch = batcher.collate(kinds["image"][:2])
    labels = batch.pop("labels")
    seen: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda _m, inputs, _o: seen.append(inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]))
    try:
        with torch.no_grad():
            _, count, _ = loss.batch_sums(model, batch, labels)
    finally:
        handle.remove()
    positions = labels.numel()
    assert sum(seen) == int(count) < positions / 4, (seen, int(count), positions)


def test_the_reload_check_gives_the_same_figures_a_chunk_of_positions_at_a_time(tiny_models, monkeypatch, tmp_path):
    """verify.peft computes the probe batch's logits in chunks too (no full-vocabulary peak after training)."""
    from peft import PeftModel
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_tune.verify.parity import fixed_batch
    from gemma4_tune.verify.peft import saved_adapter_parity
    from tests.lora_helpers import random_lora

    base = tiny_models["e2b"]
    adapter = random_lora(base, tmp_path / "adapter", seed=2, spec="text,vision")
    trained = PeftModel.from_pretrained(Gemma4ForConditionalGeneration.from_pretrained(str(base),
                                                                                      dtype=torch.float32), adapter)
    batch = fixed_batch(base)
    whole = saved_adapter_parity(adapter, trained, batch)
    vocab = trained.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(loss, "CHUNK_BYTES", 4 * vocab * 9)
    chunked = saved_adapter_parity(adapter, trained, batch)
    assert whole.ok and chunked.ok and chunked.values == whole.values == int(batch["attention_mask"].sum()) * vocab
    assert chunked.adapter_effect == whole.adapter_effect > 1e-2 and chunked.greedy_agreement == 1.0
