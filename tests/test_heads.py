"""Heads and input adapters: shapes and numerics, losses by problem type, masked queries, tying, save/load, bad input,
pipelines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PerceiverTokenizer,
    ViTImageProcessor,
    pipeline,
)

from hf_flash_perceiver import (
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    PerceiverIOForRegression,
    PerceiverIOModel,
    PerceiverModel,
)
from hf_flash_perceiver.input_adapters import fourier_position_features

from heads_common import assert_close_outputs, assert_same_weights, assert_same_weights_and_close_outputs, perturbed, tiny


def image_batch(batch=3, channels=3, size=8, seed=0):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def token_batch(batch=3, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 262, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 7:] = 0
    return ids, mask


# ------------------------------------------------------------------ input adapters


def test_fourier_position_features_formula():
    shape, bands, res = (3, 4), 2, (6, 8)
    got = fourier_position_features(shape, bands, res)
    rows = []
    for y in np.linspace(-1, 1, 3):
        for x in np.linspace(-1, 1, 4):
            fy, fx = np.linspace(1, 3, bands), np.linspace(1, 4, bands)
            ang = np.concatenate([np.pi * fy * y, np.pi * fx * x])
            rows.append(np.concatenate([[y, x], np.sin(ang), np.cos(ang)]))
    torch.testing.assert_close(got, torch.tensor(np.array(rows), dtype=torch.float32), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_patchify_layout(patch):
    adapter = PerceiverForImageClassification(tiny(patch_size=patch)).input_adapter
    x = image_batch(2)
    tokens = adapter.patchify(x)
    grid = 8 // patch
    assert tokens.shape == (2, grid * grid, 3 * patch * patch)
    for i in range(grid):
        for j in range(grid):
            block = x[:, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].reshape(2, -1)
            torch.testing.assert_close(tokens[:, i * grid + j], block, rtol=0, atol=0)


def test_fourier_image_adapter_reads_other_sizes_learned_does_not():
    fourier = PerceiverForImageClassification(tiny(num_labels=3)).eval()
    assert fourier.forward_features(image_batch(size=12)).last_hidden_state.shape == (3, 4, 16)
    learned = PerceiverForImageClassification(tiny(num_labels=3, num_fourier_bands=0)).eval()
    assert learned(image_batch()).logits.shape == (3, 3)
    with pytest.raises(ValueError, match=r"need 8x8 images.*got 12x12"):
        learned(image_batch(size=12))


def test_image_positions_matter():
    # A position-blind model would give the same output for an image and its transpose.
    for bands in (3, 0):
        model = perturbed(PerceiverForImageClassification(tiny(num_labels=3, num_fourier_bands=bands)))
        x = image_batch()
        assert not torch.allclose(model(x).logits, model(x.transpose(2, 3)).logits, atol=1e-4)


def test_text_adapter_embeds_tokens_and_positions():
    model = perturbed(PerceiverForMaskedLM(tiny()))
    ids, _ = token_batch(length=6)
    adapter = model.input_adapter
    expected = adapter.token_embeddings.weight[ids] + adapter.position_embeddings.weight[:6]
    torch.testing.assert_close(adapter(ids), expected)


# ------------------------------------------------------------------ classification


@pytest.mark.parametrize("pooling", ["average", "first", "concat", "query"])
@pytest.mark.parametrize("head", ["image", "sequence"])
def test_classifier_pooling_shapes_and_gradients(head, pooling):
    cfg = tiny(num_labels=5, pooling=pooling, **({"input_dim": 6} if head == "sequence" else {}))
    if head == "image":
        model, inputs = PerceiverForImageClassification(cfg), {"pixel_values": image_batch()}
    else:
        model, inputs = PerceiverForSequenceClassification(cfg), {"inputs": torch.randn(3, 7, 6)}
    out = model(**inputs, labels=torch.tensor([0, 4, 2]))
    assert out.logits.shape == (3, 5) and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_hidden_states_and_attentions_through_heads():
    cfg = tiny(num_labels=2, self_per_cross_attn=2)
    out = PerceiverForImageClassification(cfg)(image_batch(), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 1 + 2 * 3 and len(out.attentions) == 2 * 3
    assert out.attentions[0].shape == (3, 2, 4, 16)  # (batch, cross_heads, latents, 4x4 patches)


def _seq_model(num_labels, **kw):
    torch.manual_seed(0)
    return PerceiverForSequenceClassification(tiny(input_dim=6, num_labels=num_labels, **kw)).eval()


@pytest.mark.parametrize(
    "num_labels, labels, problem_type, expected",
    [
        (3, torch.tensor([0, 2, 1, 2]), "single_label_classification", lambda z, y: F.cross_entropy(z, y)),
        (3, torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]]), "multi_label_classification",
         lambda z, y: F.binary_cross_entropy_with_logits(z, y)),
        (1, torch.tensor([0.5, -1.0, 2.0, 0.0]), "regression", lambda z, y: F.mse_loss(z.squeeze(-1), y)),
        (2, torch.tensor([[0.5, 1.0], [-1.0, 0], [2.0, 2], [0.0, 1]]), "multi_label_classification", None),
    ],
)
def test_loss_by_problem_type(num_labels, labels, problem_type, expected):
    model = _seq_model(num_labels)
    x = torch.randn(4, 5, 6)
    if expected is None:
        # float labels with >1 label infer multi-label, as transformers does; values outside [0, 1] are refused
        with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
            model(x, labels=labels)
        assert model.config.problem_type is None  # nothing remembered from a refused batch
        return
    out = model(x, labels=labels)
    assert model.config.problem_type == problem_type
    torch.testing.assert_close(out.loss, expected(out.logits, labels))


def test_regression_with_explicit_problem_type_and_several_targets():
    model = _seq_model(2, problem_type="regression")
    labels = torch.randn(4, 2)
    out = model(torch.randn(4, 5, 6), labels=labels)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits, labels))


def test_ignored_labels():
    model = _seq_model(3)
    x, labels = torch.randn(4, 5, 6), torch.tensor([0, -100, 2, -100])
    out = model(x, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[[0, 2]], labels[[0, 2]]))
    everything_ignored = model(x, labels=torch.full((4,), -100))
    assert everything_ignored.loss.item() == 0.0  # not 0/0 = NaN


@pytest.mark.parametrize(
    "num_labels, problem_type, labels, match",
    [
        (3, None, torch.tensor([0.0, 1.0, 2.0, 1.0]), r"float multi-hot \(0/1\) of shape \(4, 3\), got dtype torch.float32 of shape \(4,\)"),
        (3, None, torch.zeros(4, 3, dtype=torch.long), r"integer class ids \(torch.long\) of shape \(4,\), got dtype torch.int64 of shape \(4, 3\)"),
        (3, "single_label_classification", torch.tensor([0.0, 1.0, 2.0, 1.0]), r"integer class ids .*got dtype torch.float32"),
        (1, None, torch.tensor([0, 1, 1, 0]), r"Regression labels must be floating point of shape \(4, 1\) or \(4,\), got dtype torch.int64"),
        (2, "regression", torch.randn(2, 4), r"shape \(4, 2\), got dtype torch.float32 of shape \(2, 4\)"),
        (3, None, torch.tensor([0, 1, 3, 1]), r"must be in \[0, 3\) or -100 \(ignored\), got \[3\]"),
        (3, None, torch.tensor([0, 1, -5, 1]), r"got \[-5\]"),
        (3, None, [0, 1, 2, 1], "must be a tensor"),
    ],
)
def test_bad_labels(num_labels, problem_type, labels, match):
    model = _seq_model(num_labels, problem_type=problem_type)
    with pytest.raises((ValueError, TypeError), match=match):
        model(torch.randn(4, 5, 6), labels=labels)
    assert model.config.problem_type == problem_type


def test_label_values_are_checked_before_the_forward(monkeypatch):
    """Each head starts its labels' value check before the encoder runs (on CUDA the host then reads the answer at the
    loss without waiting for the forward), and the loss reads that answer instead of checking again; bad values are
    refused with the same error either way."""
    from hf_flash_perceiver import losses
    from hf_flash_perceiver.encoder import PerceiverEncoder

    order = []
    made, encoder_forward = losses.EarlyCheck.__init__, PerceiverEncoder.forward
    monkeypatch.setattr(losses.EarlyCheck, "__init__", lambda self, bad: (order.append("check"), made(self, bad))[1])
    monkeypatch.setattr(PerceiverEncoder, "forward",
                        lambda self, *a, **k: (order.append("encoder"), encoder_forward(self, *a, **k))[1])
    checks = []
    bad_ids = losses._bad_class_ids
    monkeypatch.setattr(losses, "_bad_class_ids", lambda *a: (checks.append(1), bad_ids(*a))[1])
    torch.manual_seed(0)
    mlm = PerceiverForMaskedLM(tiny())
    ids = torch.randint(0, mlm.config.vocab_size, (2, 7))
    # (model, inputs, good labels, bad labels, class-id checks per call: one for class ids, none for multi-hot targets)
    cases = [
        (_seq_model(3), dict(inputs=torch.randn(4, 5, 6)), torch.tensor([0, 2, -100, 1]),
         torch.tensor([0, 3, 1, 1]), 1),
        (_seq_model(3), dict(inputs=torch.randn(4, 5, 6)), torch.tensor([[1.0, 0, 1]] * 4),
         torch.tensor([[1.0, 0, 2]] * 4), 0),
        (PerceiverForImageClassification(tiny(num_labels=2)), dict(pixel_values=image_batch()), torch.tensor([0, 1, 1]),
         torch.tensor([0, 1, 2]), 1),
        (mlm, dict(input_ids=ids, attention_mask=torch.ones(2, 7, dtype=torch.long)), ids,
         ids.masked_fill(ids == ids[0, 0], 300), 1),
    ]
    for model, kwargs, good, bad, class_id_checks in cases:
        order.clear()
        checks.clear()
        assert model(**kwargs, labels=good).loss is not None
        assert order == ["check", "encoder"], (type(model).__name__, order)
        assert len(checks) == class_id_checks  # the early check's own, none again at the loss
        with pytest.raises(ValueError, match=r"must (be in|lie in) \["):
            model(**kwargs, labels=bad)


# ------------------------------------------------------------------ gradient accumulation


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _accumulation_case(kind):
    torch.manual_seed(0)
    if kind == "single_label":
        model = PerceiverForSequenceClassification(tiny(input_dim=6, num_labels=3))
        batch = {"inputs": torch.randn(6, 5, 6), "labels": torch.tensor([0, 2, 1, -100, -100, 2])}
    elif kind == "multi_label":
        model = PerceiverForSequenceClassification(tiny(input_dim=6, num_labels=3, problem_type="multi_label_classification"))
        batch = {"inputs": torch.randn(6, 5, 6), "labels": torch.randint(0, 2, (6, 3)).float()}
    elif kind == "masked_lm":
        model = PerceiverForMaskedLM(tiny())
        ids, mask = token_batch(batch=6)
        labels = torch.full_like(ids, -100)
        labels[0, :9] = ids[0, :9]  # most labelled tokens in the first half
        labels[4, 2] = ids[4, 2]
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    else:
        model = PerceiverIOForRegression(tiny(input_dim=4, query_dim=5, output_dim=2))
        query_mask = torch.ones(6, 7, dtype=torch.long)
        query_mask[:3, 2:] = 0  # few real queries in the first half
        labels = torch.randn(6, 7, 2).masked_fill(query_mask[..., None] == 0, -100.0)
        batch = {"inputs": torch.randn(6, 9, 4), "queries": torch.randn(6, 7, 5), "query_mask": query_mask,
                 "labels": labels}
    return model.train(), batch


@pytest.mark.parametrize("kind", ["single_label", "multi_label", "masked_lm", "io_regression"])
def test_micro_batch_losses_add_up_to_the_full_batch(kind):
    model, batch = _accumulation_case(kind)
    full = model(**batch).loss
    full.backward()
    expected = _grads(model)
    model.zero_grad()
    # What Trainer passes: the labelled items of the whole accumulated batch (label entries that are not -100).
    num_items = batch["labels"].ne(-100).sum()
    total = 0.0
    for half in (slice(0, 3), slice(3, 6)):
        loss = model(**{k: v[half] for k, v in batch.items()}, num_items_in_batch=num_items).loss
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full.detach())
    got = _grads(model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)
    # The check can fail: averaging the micro-batch means (no num_items_in_batch) gives another loss here.
    if kind != "multi_label":  # equal-sized, fully labelled halves: both ways agree
        naive = sum(model(**{k: v[h] for k, v in batch.items()}).loss for h in (slice(0, 3), slice(3, 6))) / 2
        assert not torch.allclose(naive.detach(), full.detach())


# ------------------------------------------------------------------ Perceiver IO


def test_io_learned_and_passed_queries():
    model = perturbed(PerceiverIOModel(tiny(input_dim=4, num_queries=5, output_dim=3)))
    x = torch.randn(2, 9, 4)
    assert model(x).logits.shape == (2, 5, 3)
    q = torch.randn(6, 16)  # query_dim defaults to latent_dim
    shared = model(x, queries=q).logits
    torch.testing.assert_close(shared, model(x, queries=q.expand(2, -1, -1)).logits)
    assert model(x, queries=q).cross_attentions is None
    weights = model(x, queries=q, output_attentions=True).cross_attentions[0]
    assert weights.shape == (2, 2, 6, 4)  # (batch, query_heads, queries, latents)


def test_masked_queries_are_exactly_zero_and_do_not_leak():
    model = perturbed(PerceiverIOForRegression(tiny(input_dim=4, query_dim=5, output_dim=2))).train()
    x, q = torch.randn(2, 9, 4), torch.randn(2, 6, 5)
    query_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    q = q.masked_fill(query_mask[..., None] == 0, float("nan"))  # padding content must not matter
    out = model(x, queries=q, query_mask=query_mask).logits
    assert (out[query_mask == 0] == 0).all()
    # Queries are decoded independently: the real ones match a run without the padded ones.
    alone = model(x[:1], queries=q[:1, :3]).logits
    torch.testing.assert_close(out[:1, :3], alone)
    labels = torch.randn(2, 6, 2).masked_fill(query_mask[..., None] == 0, float("nan"))
    loss = model(x, queries=q, query_mask=query_mask, labels=labels).loss
    valid = query_mask.bool()
    torch.testing.assert_close(loss, F.mse_loss(out[valid], labels[valid]))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"queries": torch.randn(2, 6, 7)}, ValueError, r"queries.*\(num_queries, 5\) or \(batch, num_queries, 5\), got \(2, 6, 7\)"),
        ({"queries": torch.randn(3, 6, 5)}, ValueError, "batch size 3"),
        ({"queries": torch.randn(2, 6, 5), "query_mask": torch.ones(2, 5, dtype=torch.bool)}, ValueError, r"\(batch, num_queries\) = \(2, 6\), got \(2, 5\)"),
        ({"queries": torch.randn(2, 6, 5), "query_mask": torch.ones(2, 6)}, TypeError, "bool or 0/1 integers"),
        ({"queries": torch.randn(2, 6, 5), "query_mask": torch.full((2, 6), 2)}, ValueError, "only 0/1"),
        ({}, ValueError, "no learned queries"),
        ({"queries": torch.randn(2, 6, 5), "labels": torch.randn(2, 6)}, ValueError, r"\(batch, num_queries, output_dim\) = \(2, 6, 2\)"),
        ({"queries": torch.randn(2, 6, 5), "labels": torch.ones(2, 6, 2, dtype=torch.long)}, ValueError, "floating point"),
    ],
)
def test_io_bad_input(kwargs, err, match):
    model = PerceiverIOForRegression(tiny(input_dim=4, query_dim=5, output_dim=2))
    with pytest.raises(err, match=match):
        model(torch.randn(2, 9, 4), **kwargs)


# ------------------------------------------------------------------ masked LM


def test_masked_lm_padding_ties_and_loss():
    model = perturbed(PerceiverForMaskedLM(tiny()))
    assert model.lm_head.weight is model.input_adapter.token_embeddings.weight
    ids, mask = token_batch()
    out = model(ids, mask)
    assert out.logits.shape == (3, 10, 262)
    assert (out.logits[1, 7:] == 0).all()
    # Padding never matters: the padded sample's real positions match the truncated sample.
    torch.testing.assert_close(out.logits[1, :7], model(ids[1:2, :7]).logits[0], atol=1e-5, rtol=1e-4)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 2], labels[1, 8] = ids[0, 3], ids[1, 2], ids[1, 8]  # [1, 8] is padding: not counted
    loss = model(ids, mask, labels=labels).loss
    torch.testing.assert_close(loss, F.cross_entropy(out.logits[[0, 1], [3, 2]], ids[[0, 1], [3, 2]]))


def test_masked_lm_untied_and_width_check():
    model = PerceiverForMaskedLM(tiny(tie_word_embeddings=False))
    assert model.lm_head.weight is not model.input_adapter.token_embeddings.weight
    with pytest.raises(ValueError, match=r"decoder output width \(8.*embedding width \(16"):
        PerceiverForMaskedLM(tiny(output_dim=8))
    assert PerceiverForMaskedLM(tiny(output_dim=8, tie_word_embeddings=False))(token_batch()[0]).logits.shape[-1] == 262


def test_masked_lm_resize_token_embeddings():
    model = PerceiverForMaskedLM(tiny())
    model.resize_token_embeddings(300, mean_resizing=False)
    assert model.lm_head.weight is model.input_adapter.token_embeddings.weight
    assert model(torch.tensor([[299, 5]])).logits.shape == (1, 2, 300)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda m: m(torch.tensor([[1, 262]])), ValueError, r"must be in \[0, 262\) \(config.vocab_size\), got values in \[1, 262\]"),
        (lambda m: m(torch.tensor([[-1, 5]])), ValueError, r"got values in \[-1, 5\]"),
        (lambda m: m(torch.rand(2, 5)), TypeError, "integer token ids"),
        (lambda m: m(torch.ones(5, dtype=torch.long)), ValueError, r"\(batch, seq_len\)"),
        (lambda m: m(torch.ones(1, 17, dtype=torch.long)), ValueError, "exceeds config.max_position_embeddings=16"),
        (lambda m: m(torch.ones(2, 5, dtype=torch.long), torch.full((2, 5), 3)), ValueError, "only 0/1"),
        (lambda m: m(torch.ones(2, 5, dtype=torch.long), labels=torch.ones(2, 4, dtype=torch.long)), ValueError, r"shape \(batch, seq_len\) = \(2, 5\), got dtype torch.int64 of shape \(2, 4\)"),
        (lambda m: m(torch.ones(2, 5, dtype=torch.long), labels=torch.ones(2, 5)), ValueError, "integer token ids"),
        (lambda m: m(torch.ones(2, 5, dtype=torch.long), labels=torch.full((2, 5), 300)), ValueError, r"\[0, 262\) or -100"),
    ],
)
def test_masked_lm_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call(PerceiverForMaskedLM(tiny()))


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: image_batch(channels=1), ValueError, r"1 channels but the model expects config.num_channels=3"),
        (lambda: image_batch(size=9), ValueError, "9x9 is not divisible by config.patch_size=2"),
        (lambda: torch.randn(3, 8, 8), ValueError, r"shape \(batch, 3, height, width\)"),
        (lambda: torch.ones(1, 3, 8, 8, dtype=torch.uint8), TypeError, "floating point"),
        (lambda: np.zeros((1, 3, 8, 8)), TypeError, "must be a tensor"),
    ],
)
def test_image_bad_input(make, err, match):
    with pytest.raises(err, match=match):
        PerceiverForImageClassification(tiny(num_labels=2))(make())


def test_adapter_heads_take_one_input_width():
    with pytest.raises(ValueError, match="must be an int or None"):
        PerceiverForImageClassification(tiny(input_dim=[16, 16]))


# ------------------------------------------------------------------ save / load


HEADS = {
    "sequence": (lambda: PerceiverForSequenceClassification(tiny(input_dim=6, num_labels=3, pooling="query")),
                 AutoModelForSequenceClassification, lambda: {"inputs": torch.randn(2, 5, 6)}),
    "image-fourier": (lambda: PerceiverForImageClassification(tiny(num_labels=3)),
                      AutoModelForImageClassification, lambda: {"pixel_values": image_batch(2)}),
    "image-learned": (lambda: PerceiverForImageClassification(tiny(num_labels=3, num_fourier_bands=0, pooling="concat")),
                      AutoModelForImageClassification, lambda: {"pixel_values": image_batch(2)}),
    "masked-lm": (lambda: PerceiverForMaskedLM(tiny(latent_rotary_emb_dim=4)),
                  AutoModelForMaskedLM, lambda: dict(zip(("input_ids", "attention_mask"), token_batch(2)))),
    "io": (lambda: PerceiverIOModel(tiny(input_dim=4, num_queries=3, output_dim=2)),
           PerceiverIOModel, lambda: {"inputs": torch.randn(2, 5, 4)}),
    "io-regression": (lambda: PerceiverIOForRegression(tiny(input_dim=4, query_dim=5, output_dim=2)),
                      PerceiverIOForRegression, lambda: {"inputs": torch.randn(2, 5, 4), "queries": torch.randn(4, 5)}),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_save_load_identical(tmp_path, name):
    make, loader, inputs = HEADS[name]
    torch.manual_seed(0)
    model = perturbed(make())
    model.save_pretrained(tmp_path)
    loaded = loader.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    batch = inputs()
    assert_same_weights_and_close_outputs(loaded, model, lambda m: m(**batch).logits)
    config = {k: v for k, v in AutoConfig.from_pretrained(tmp_path).to_dict().items() if k != "_name_or_path"}
    assert config == {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    if name == "masked-lm":
        assert loaded.lm_head.weight is loaded.input_adapter.token_embeddings.weight


def test_untied_masked_lm_stays_untied(tmp_path):
    model = perturbed(PerceiverForMaskedLM(tiny(tie_word_embeddings=False)))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is not loaded.input_adapter.token_embeddings.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_auto_model_loads_the_encoder_of_an_adapter_head(tmp_path):
    model = perturbed(PerceiverForImageClassification(tiny(num_labels=3)))
    assert model.config.input_dim == 16  # the adapter's width, pinned so that the encoder loads on its own
    model.save_pretrained(tmp_path)
    encoder, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    encoder.eval()
    assert type(encoder) is PerceiverModel
    # The head's own weights are left out quietly (no table of unexpected keys); nothing of the encoder is missing.
    assert not info["unexpected_keys"] and not info["missing_keys"]
    x = image_batch()
    assert_same_weights(encoder, model.perceiver)
    assert_close_outputs(encoder(model.input_adapter(x)).last_hidden_state, model.forward_features(x).last_hidden_state)


def test_num_labels_mismatch_on_load(tmp_path):
    model = perturbed(PerceiverForImageClassification(tiny(num_labels=4)))
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=3)
    resized = AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=3, ignore_mismatched_sizes=True)
    assert resized.head.classifier.out_features == 3 and resized(image_batch()).logits.shape == (3, 3)
    torch.testing.assert_close(resized.perceiver.latents, model.perceiver.latents, rtol=0, atol=0)


# ------------------------------------------------------------------ pipelines


def test_image_classification_pipeline(tmp_path):
    cfg = tiny(num_labels=3, id2label={0: "zero", 1: "one", 2: "two"}, label2id={"zero": 0, "one": 1, "two": 2})
    model = perturbed(PerceiverForImageClassification(cfg))
    processor = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10, 3), dtype=np.uint8))
    results = pipeline("image-classification", model=str(tmp_path))(image, top_k=3)
    probs = model(processor(images=image, return_tensors="pt")["pixel_values"]).logits.softmax(-1)[0]
    expected = sorted(((p.item(), cfg.id2label[i]) for i, p in enumerate(probs)), reverse=True)
    assert [r["label"] for r in results] == [label for _, label in expected]
    np.testing.assert_allclose([r["score"] for r in results], [p for p, _ in expected], rtol=1e-5)


def test_fill_mask_pipeline(tmp_path):
    model = perturbed(PerceiverForMaskedLM(tiny(max_position_embeddings=32)))
    tokenizer = PerceiverTokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    text = f"hello w{tokenizer.mask_token}rld"
    results = pipeline("fill-mask", model=str(tmp_path))(text, top_k=4)
    enc = tokenizer(text, return_tensors="pt")
    position = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().item()
    probs = model(**enc).logits[0, position].softmax(-1)
    top = probs.topk(4)
    assert [r["token"] for r in results] == top.indices.tolist()
    np.testing.assert_allclose([r["score"] for r in results], top.values.tolist(), rtol=1e-5)
    assert results[0]["sequence"].startswith("hello w") and math.isfinite(results[0]["score"])
