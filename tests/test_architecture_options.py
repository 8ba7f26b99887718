"""The architecture options transformers' pretrained Perceivers need, each used on its own from `PerceiverConfig`:
value widths, query-residual switches, a repeated latent stack, per-role MLP widths, no output LayerNorm, token ids
into the sequence classifier, the image adapter variants, and the optical-flow model. (Their numerics against
transformers' own classes are in test_transformers_checkpoints.py; against the fp32 reference, through the random
configs of test_core.py.)"""

from __future__ import annotations

import pytest
import torch

from hf_flash_perceiver import (
    PerceiverConfig,
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverForOpticalFlow,
    PerceiverForSequenceClassification,
    PerceiverIOModel,
    PerceiverModel,
    image_adapter_width,
)

from heads_common import assert_same_weights_and_close_outputs
from reference import reference_block


FP32_TOL = 1e-5  # fp32 against a recomputation from the same parameters: only summation order differs


def cfg(**kw) -> PerceiverConfig:
    base = dict(input_dim=6, depth=2, num_latents=5, latent_dim=16, cross_heads=2, cross_head_dim=8, latent_heads=2,
                latent_head_dim=8, query_heads=2, query_head_dim=8)
    return PerceiverConfig(**{**base, **kw})


def randomized(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_latent_stack_repeats_share_weights():
    once = randomized(PerceiverModel(cfg(self_per_cross_attn=2)))
    thrice = PerceiverModel(cfg(self_per_cross_attn=2, latent_stack_repeats=3)).eval()
    thrice.load_state_dict(once.state_dict())  # the same parameters: repeats add no weights
    x = torch.randn(3, 7, 6)
    out = thrice(x, output_hidden_states=True)
    assert len(out.hidden_states) == 1 + 2 * (1 + 2 * 3)
    assert not torch.allclose(out.last_hidden_state, once(x).last_hidden_state)
    # After the first cross-attention the stack runs three times: recompute it from `once`'s own layers.
    h = out.hidden_states[1]
    for _ in range(3):
        for layer in once.encoder.self_layers[0]:
            h, _ = layer(h)
    torch.testing.assert_close(out.hidden_states[1 + 6], h, rtol=FP32_TOL, atol=FP32_TOL)


def test_decoder_without_query_residual_and_with_its_own_widths():
    model = randomized(PerceiverIOModel(cfg(num_queries=4, query_dim=12, output_dim=3, query_residual=False,
                                            query_v_head_dim=5, query_mlp_ratio=2, output_norm=False)))
    block = model.decoder.block
    assert block.attn.o_proj.in_features == 2 * 5 and block.mlp.fc1.out_features == 2 * 2 * 12
    assert model.decoder.norm is None or not list(model.decoder.norm.parameters())
    x = torch.randn(2, 7, 6)
    out = model(x)
    latents = out.last_hidden_state
    queries = model.decoder.queries.expand(2, -1, -1)
    expected, _ = reference_block(block, queries, latents, residual_attn=False)
    torch.testing.assert_close(out.logits, model.decoder.proj(expected), rtol=FP32_TOL, atol=FP32_TOL)


@pytest.mark.parametrize("head", ["image", "sequence", "io", "mlm"])
def test_output_norm_off_leaves_no_layernorm_before_the_projection(head):
    common = dict(output_norm=False, num_labels=3, pooling="query")
    model = {
        "image": lambda: PerceiverForImageClassification(cfg(input_dim=None, image_size=4, num_channels=1, **common)),
        "sequence": lambda: PerceiverForSequenceClassification(cfg(**common)),
        "io": lambda: PerceiverIOModel(cfg(num_queries=2, output_dim=4, output_norm=False)),
        "mlm": lambda: PerceiverForMaskedLM(cfg(input_dim=None, max_position_embeddings=8, output_norm=False)),
    }[head]()
    def norms(m):
        return [n for n in m.state_dict() if n.startswith(("head.norm", "decoder.norm", "lm_norm"))]

    assert norms(model) == []
    default = type(model)(model.config.__class__(**{**model.config.to_dict(), "output_norm": True}))
    assert norms(default)  # the default keeps its LayerNorm


def test_sequence_classifier_reads_token_ids(tmp_path):
    config = cfg(input_dim=None, num_labels=3, text_input=True, vocab_size=20, max_position_embeddings=9)
    model = randomized(PerceiverForSequenceClassification(config))
    assert model.main_input_name == "input_ids" and model.get_input_embeddings().num_embeddings == 20
    ids = torch.randint(0, 20, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    # `inputs` is the same argument: the same computation, equal to fp32 rounding (not asserted bit for bit).
    torch.testing.assert_close(model(ids, mask).logits, out.logits, rtol=FP32_TOL, atol=FP32_TOL)
    # Padding never matters: the padded tail of sample 1 may hold any token.
    ids2 = ids.clone()
    ids2[1, 5:] = 7
    torch.testing.assert_close(model(input_ids=ids2, attention_mask=mask).logits[1], out.logits[1],
                               rtol=FP32_TOL, atol=FP32_TOL)
    model.save_pretrained(tmp_path)
    loaded = PerceiverForSequenceClassification.from_pretrained(tmp_path).eval()
    assert_same_weights_and_close_outputs(loaded, model, lambda m: m(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("adapter, bands", [("conv1x1", 0), ("conv1x1", 3), ("pixels", 3), ("conv", 3)])
def test_image_adapter_variants_in_the_classifier(adapter, bands, tmp_path):
    config = cfg(input_dim=None, num_labels=3, image_size=12, num_channels=2, image_adapter=adapter,
                 num_fourier_bands=bands, image_embed_dim=6, image_position_dim=4)
    model = randomized(PerceiverForImageClassification(config))
    assert model.config.input_dim == image_adapter_width(model.config)  # pinned for AutoModel on the checkpoint
    pixels = torch.randn(2, 2, 12, 12)
    out = model(pixels, labels=torch.tensor([1, 2]))
    out.loss.backward()
    assert all(p.grad is not None for p in model.input_adapter.parameters())
    model.save_pretrained(tmp_path)
    loaded = PerceiverForImageClassification.from_pretrained(tmp_path).eval()
    assert_same_weights_and_close_outputs(loaded, model, lambda m: m(pixels).logits)


def test_optical_flow_decodes_at_every_pixel(tmp_path):
    config = cfg(input_dim=None, num_channels=3, num_frames=2, image_embed_dim=8, num_fourier_bands=2,
                 query_residual=False, output_norm=False, flow_rescale_factor=10.0)
    model = randomized(PerceiverForOpticalFlow(config))
    width = model.input_adapter.width
    assert (model.config.input_dim, model.config.query_dim, model.config.output_dim) == (width, width, 2)
    frames = torch.randn(2, 2, 3, 5, 7)
    labels = torch.randn(2, 5, 7, 2)
    out = model(frames, labels=labels)
    assert out.logits.shape == (2, 5, 7, 2)
    torch.testing.assert_close(out.loss, (out.logits - labels).norm(dim=-1).mean(), rtol=FP32_TOL, atol=FP32_TOL)
    # The queries are the input tokens themselves.
    tokens = model.input_adapter(frames)
    io = model.decoder(model.perceiver(tokens).last_hidden_state, tokens)[0]
    torch.testing.assert_close(out.logits, io.unflatten(1, (5, 7)) / 10.0, rtol=FP32_TOL, atol=FP32_TOL)
    out.loss.backward()
    assert model.input_adapter.proj.weight.grad is not None
    model.save_pretrained(tmp_path)
    loaded = PerceiverForOpticalFlow.from_pretrained(tmp_path).eval()
    assert_same_weights_and_close_outputs(loaded, model, lambda m: m(frames).logits)
