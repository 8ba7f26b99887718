"""The bad-input contract in one place: each row is something a user can get wrong and what they get for it.

Every refusal is a `ValueError` or `TypeError` whose message names what was expected (checked by `match`); every
accepted-but-unusual input has a defined result (checked by its own assertion). Nothing here may surface as a raw
torch error from deep inside, or as a silent NaN.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_flash_perceiver import (
    PerceiverConfig,
    PerceiverForImageClassification,
    PerceiverForOpticalFlow,
    PerceiverForSequenceClassification,
    PerceiverModel,
)
from hf_flash_perceiver.losses import classification_loss, class_id_loss


def small(**kw) -> PerceiverConfig:
    base = dict(input_dim=6, depth=2, num_latents=4, latent_dim=16, cross_heads=1, cross_head_dim=8, latent_heads=2,
                latent_head_dim=8)
    return PerceiverConfig(**{**base, **kw})


def encoder(**kw) -> PerceiverModel:
    torch.manual_seed(0)
    return PerceiverModel(small(**kw)).eval()


# ------------------------------------------------------------------------------------------------ refused inputs
# (what the user does, the exception, what its message must say)
REFUSED = {
    "int latents": (lambda: encoder()(torch.randn(2, 5, 6), latents=torch.ones(4, 16, dtype=torch.long)),
                    TypeError, r"`latents` must be a floating-point tensor"),
    "zero custom latents": (lambda: encoder()(torch.randn(2, 5, 6), latents=torch.randn(0, 16)),
                            ValueError, r"at least one token \(num_latents >= 1\)"),
    "latent_drop keeps none of the custom latents": (
        lambda: encoder(latent_drop=0.5).train()(torch.randn(2, 5, 6), latents=torch.randn(1, 16)),
        ValueError, r"keeps no latent"),
    "one tensor for two input widths": (
        lambda: encoder(input_dim=[6, 3])(torch.randn(2, 5, 6)), ValueError, r"feature dim 6.*input_dim=3"),
    "same tensor object twice for two widths": (
        lambda: (lambda x: encoder(input_dim=[6, 3])([x, x]))(torch.randn(2, 5, 6)),
        ValueError, r"Input 1 has feature dim 6.*input_dim=3"),
    "meta-device inputs": (lambda: encoder()(torch.randn(2, 5, 6, device="meta")), ValueError, r"meta device"),
    "integer inputs": (lambda: encoder()(torch.ones(2, 5, 6, dtype=torch.long)), TypeError, r"floating-point"),
    "0x0 pixel_values": (
        lambda: PerceiverForImageClassification(small(input_dim=None, num_labels=3, image_size=4, num_channels=1))(
            torch.randn(2, 1, 0, 0)), ValueError, r"at least one pixel"),
    "NaN in multi-label labels": (
        lambda: classification_loss(small(num_labels=2, problem_type="multi_label_classification"),
                                    torch.zeros(2, 2), torch.tensor([[0.0, float("nan")], [1.0, 0.0]])),
        ValueError, r"\[0, 1\] \(no NaN\).*NaN"),
    "varlen with attention dropout, at build": (
        lambda: PerceiverModel._from_config(small(cross_attn_dropout=0.1), attn_implementation="varlen"),
        ValueError, r"'varlen' has no attention dropout.*cross_attn_dropout"),
    "input_ids for a raw-feature classifier": (
        lambda: PerceiverForSequenceClassification(small(num_labels=2))(input_ids=torch.ones(2, 5, dtype=torch.long)),
        ValueError, r"`input_ids` needs a model that embeds token ids \(`config.text_input=True`\)"),
    "token ids twice": (
        lambda: PerceiverForSequenceClassification(small(input_dim=None, num_labels=2, text_input=True))(
            torch.ones(2, 5, dtype=torch.long), input_ids=torch.ones(2, 5, dtype=torch.long)),
        ValueError, r"once: as `input_ids` or as `inputs`"),
    "flow labels of another shape": (
        lambda: PerceiverForOpticalFlow(small(input_dim=None, num_channels=2, num_fourier_bands=2,
                                              image_embed_dim=8))(torch.randn(1, 2, 2, 4, 5), labels=torch.zeros(1, 4, 5)),
        ValueError, r"Flow `labels` must have the prediction's shape \(batch, height, width, 2\)"),
    "adapter width unlike input_dim": (
        lambda: PerceiverForImageClassification(small(input_dim=12, image_adapter="pixels", num_fourier_bands=2,
                                                      num_labels=2)),
        ValueError, r"tokens of width 13, but the config sets `input_dim=12`"),
    "varlen with attention dropout, chosen later": (
        lambda: PerceiverModel(small(latent_attn_dropout=0.1)).set_attn_implementation("varlen"),
        ValueError, r"'varlen' has no attention dropout.*latent_attn_dropout"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_input(case):
    call, error, match = REFUSED[case]
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------------ refused configs
CONFIGS = {
    "string number": (dict(cross_attn_dropout="0.1"), TypeError, r"cross_attn_dropout"),
    "zero depth": (dict(depth=0), ValueError, r"depth.*must be positive, got 0"),
    "num_labels 0": (dict(num_labels=0), ValueError, r"num_labels` must be at least 1"),
    "zero-width MLP": (dict(mlp_ratio=0.01), ValueError, r"zero-width MLP"),
    "layer_norm_eps 0": (dict(layer_norm_eps=0.0), ValueError, r"layer_norm_eps.*must be positive"),
    "rotary_base 0": (dict(rotary_base=0.0, latent_rotary_emb_dim=4), ValueError, r"rotary_base.*must be positive"),
    # transformers >= 5.24 leaves the base field's Literal to our validator (ValueError); 5.17 checks it as a type.
    "unknown problem_type": (dict(problem_type="ranking"), (ValueError, TypeError), r"problem_type"),
    "unknown pooling": (dict(pooling="max"), TypeError, r"pooling"),
    "latent_drop keeps none": (dict(latent_drop=0.9, num_latents=8), ValueError, r"keeps no latent"),
    "odd rotary": (dict(cross_rotary_emb_dim=3), ValueError, r"even"),
    "zero latent_stack_repeats": (dict(latent_stack_repeats=0), ValueError, r"latent_stack_repeats.*positive"),
    "zero value width": (dict(cross_v_head_dim=0), ValueError, r"cross_v_head_dim.*positive"),
    "zero-width cross MLP": (dict(cross_mlp_ratio=0.01), ValueError, r"cross_mlp_ratio=0.01.*zero-width MLP"),
    "unknown image adapter": (dict(image_adapter="vit"), TypeError, r"image_adapter"),
    "pixels without Fourier positions": (dict(image_adapter="pixels", num_fourier_bands=0), ValueError,
                                         r"image_adapter='pixels'.*num_fourier_bands"),
    "patches with a conv adapter": (dict(image_adapter="conv", patch_size=4), ValueError,
                                    r"patch_size` applies to `image_adapter='linear'` only"),
    "bad fourier_max_resolution": (dict(fourier_max_resolution=[0, 8]), ValueError, r"fourier_max_resolution"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_refused_config(case):
    kwargs, error, match = CONFIGS[case]
    with pytest.raises(error, match="(?s)" + match):  # strict's message puts the field and the cause on two lines
        small(**kwargs)


def test_config_made_invalid_after_construction_is_never_saved(tmp_path):
    config = small()
    with pytest.raises(ValueError, match="depth"):
        config.depth = 0  # field validators run on assignment
    config.input_dim = [6, 6, 6]  # valid alone, inconsistent with depth=2: caught by the class validator on save
    with pytest.raises(ValueError, match="one width per cross-attention block"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


# ------------------------------------------------------------------------------------------------ defined behaviour
def test_floating_inputs_take_the_model_dtype():
    model = encoder().to(torch.bfloat16)
    for dtype in (torch.float32, torch.float64):
        out = model(torch.randn(2, 5, 6, dtype=dtype), latents=torch.randn(4, 16, dtype=dtype)).last_hidden_state
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_loss_of_a_wholly_unlabelled_accumulated_batch_is_zero():
    logits = torch.randn(3, 4, requires_grad=True)
    labels = torch.full((3,), -100)
    for num_items in (0, torch.tensor(0), None):
        loss = class_id_loss(logits, labels, num_items)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(logits.grad).all()


def test_head_loss_without_labelled_items_is_zero():
    model = PerceiverForSequenceClassification(small(num_labels=3))
    out = model(torch.randn(2, 5, 6), labels=torch.full((2,), -100), num_items_in_batch=0)
    assert out.loss.item() == 0.0


# ------------------------------------------------------------------------------------------------ checkpoints
def test_transformers_format_checkpoint_without_architecture_is_refused_not_loaded_randomly(tmp_path):
    # transformers-format checkpoints are converted on load (tests/test_transformers_checkpoints.py); one whose
    # config does not say which transformers class saved it cannot be mapped, and must not load as a random model.
    from transformers import PerceiverConfig as TransformersPerceiverConfig

    TransformersPerceiverConfig(num_latents=4, d_latents=16, d_model=8).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "perceiver"
    with pytest.raises(ValueError, match=r"architectures"):
        PerceiverModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_file_is_named(tmp_path, damage):
    encoder().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(64))
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or not a safetensors file"):
        PerceiverModel.from_pretrained(tmp_path)
