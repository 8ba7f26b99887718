"""transformers' own Perceiver checkpoints (model_type "perceiver") load into this package's classes, converted on
load (config + weights), and compute what transformers' classes compute on the same inputs.

Every source model is a small, randomly initialised transformers model whose parameters (LayerNorm weights and
biases, every bias) are all moved away from their initial values, so that a mis-mapped tensor shows in the outputs.
Tolerances are 1e-5: fp32 rounding (fused projections, another summation order in SDPA), not bit identity.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import zlib
from dataclasses import dataclass, field

import pytest
import torch
import transformers
from safetensors.torch import load_file


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = RTOL = 1e-5  # fp32 rounding, not bit identity


def ours(name: str):
    # Imported when a test runs: a class the architecture side has not added yet fails that test, not collection.
    from hf_flash_perceiver import modeling_perceiver

    return getattr(modeling_perceiver, name)


def conversion():
    from hf_flash_perceiver import transformers_conversion

    return transformers_conversion


# ----------------------------------------------------------------------------------------------- source models

# Config variants. transformers' self-attention only runs with a value width equal to d_latents (v_channels, else
# qk_channels, else d_latents), so qk != v appears as qk_channels < v_channels = d_latents.
VARIANTS = {
    # one head everywhere but the self-attention, default widths, residual cross-attention
    "small": dict(num_latents=6, d_latents=16, d_model=16, num_blocks=1, num_self_attends_per_block=1,
                  num_self_attention_heads=2, num_cross_attention_heads=1, self_attention_widening_factor=1,
                  cross_attention_widening_factor=1, use_query_residual=True),
    # qk_channels != v_channels, wider MLPs, the self-attention stack repeated (num_blocks=2), no query residual
    "qk_v": dict(num_latents=5, d_latents=24, d_model=8, num_blocks=2, num_self_attends_per_block=2,
                 num_self_attention_heads=3, num_cross_attention_heads=2, qk_channels=12, v_channels=24,
                 self_attention_widening_factor=2, cross_attention_widening_factor=3, use_query_residual=False),
    # cross-attention qk width from the queries ("q"), several heads, three repeats
    "shape_q": dict(num_latents=4, d_latents=32, d_model=24, num_blocks=3, num_self_attends_per_block=1,
                    num_self_attention_heads=4, num_cross_attention_heads=4, cross_attention_shape_for_attention="q",
                    self_attention_widening_factor=3, cross_attention_widening_factor=2, use_query_residual=True),
}
COMMON = dict(vocab_size=30, max_position_embeddings=12, attention_probs_dropout_prob=0.0, num_labels=3,
              image_size=5, train_size=[8, 12])


@dataclass
class Row:
    """One transformers class: how to build its inputs, run it, and run our converted model."""

    source: str  # transformers class
    target: str  # this package's class
    kind: str  # "text", "mlm", "features", "image", "flow"
    image_shape: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict)


ROWS = {
    "masked_lm": Row("PerceiverForMaskedLM", "PerceiverForMaskedLM", "mlm"),
    "sequence": Row("PerceiverForSequenceClassification", "PerceiverForSequenceClassification", "text"),
    "learned": Row("PerceiverForImageClassificationLearned", "PerceiverForImageClassification", "image", (3, 5, 5)),
    # Fourier positions are chosen for 224 x 224 whatever the input size: any small image does
    "fourier": Row("PerceiverForImageClassificationFourier", "PerceiverForImageClassification", "image", (3, 7, 5)),
    # 7x7/2 conv + 3x3/2 pool: 20 x 24 pixels -> 4 x 5 tokens
    "conv": Row("PerceiverForImageClassificationConvProcessing", "PerceiverForImageClassification", "image",
                (3, 20, 24)),
    "flow": Row("PerceiverForOpticalFlow", "PerceiverForOpticalFlow", "flow", (2, 27, 8, 12)),
    "bare": Row("PerceiverModel", "PerceiverModel", "features"),
}


def source_config(variant: str, **overrides) -> transformers.PerceiverConfig:
    return transformers.PerceiverConfig(**{**COMMON, **VARIANTS[variant], **overrides})


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter away from its initial value (LayerNorm weights off 1, biases off 0) and give BatchNorm
    running statistics of its own, so that every tensor the conversion maps shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        # Projections by ~1/sqrt(fan_in), to keep activations O(1) (attention logits not saturated, so that fp32
        # rounding stays within the tolerance); vectors (LayerNorm weights, biases) and tables by 0.2.
        scale = 0.5 / param.shape[1] ** 0.5 if param.dim() >= 2 and "position" not in name and "latents" not in name \
            and "embeddings" not in name else 0.2
        param.add_(scale * torch.randn(param.shape, generator=g))
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(0.3 * torch.randn(buffer.shape, generator=g))
        elif name.endswith("running_var"):
            buffer.copy_(0.5 + torch.rand(buffer.shape, generator=g))
        elif name.endswith("num_batches_tracked"):
            buffer.fill_(7)


def make_source(row: Row, variant: str, path, seed: int = 0, **overrides):
    """A saved, perturbed transformers model of `row` and `variant` (eval mode), returned with its folder."""
    torch.manual_seed(seed)
    model = getattr(transformers, row.source)(source_config(variant, **overrides))
    perturb(model, seed)
    model.eval()
    model.save_pretrained(path)
    return model


def make_inputs(row: Row, config: transformers.PerceiverConfig, seed: int = 0, seq_len: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    if row.kind in ("text", "mlm"):
        ids = torch.randint(0, config.vocab_size, (3, seq_len), generator=g)
        mask = torch.ones(3, seq_len, dtype=torch.long)
        mask[1, seq_len - 3:] = 0  # padding at the end of one row, and at the start of another
        mask[2, :2] = 0
        return {"input_ids": ids, "attention_mask": mask}
    if row.kind == "features":
        mask = torch.ones(3, seq_len, dtype=torch.long)
        mask[1, seq_len - 3:] = 0
        return {"inputs": torch.randn(3, seq_len, config.d_model, generator=g), "attention_mask": mask}
    return {"pixel_values": torch.randn(2, *row.image_shape, generator=g)}


@torch.no_grad()
def run_theirs(row: Row, model, inputs: dict) -> torch.Tensor:
    if row.kind in ("text", "mlm"):
        logits = model(inputs=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        if row.kind == "mlm":
            # transformers decodes all max_position_embeddings positions; the sequence's are the first seq_len, and
            # its decoder ignores the padding mask: compare real tokens only.
            seq_len = inputs["input_ids"].shape[1]
            logits = logits[:, :seq_len][inputs["attention_mask"].bool()]
        return logits
    if row.kind == "features":
        return model(inputs=inputs["inputs"], attention_mask=inputs["attention_mask"]).last_hidden_state
    return model(inputs=inputs["pixel_values"]).logits * _unscale(row)


@torch.no_grad()
def run_ours(row: Row, model, inputs: dict) -> torch.Tensor:
    if row.kind in ("text", "mlm"):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return logits[inputs["attention_mask"].bool()] if row.kind == "mlm" else logits
    if row.kind == "features":
        return model(inputs["inputs"], attention_mask=inputs["attention_mask"]).last_hidden_state
    return model(inputs["pixel_values"]).logits * _unscale(row)


def _unscale(row: Row) -> float:
    # Flow is the decoder output divided by 100: compare at the decoder's scale, where 1e-5 means what it says.
    return 100.0 if row.kind == "flow" else 1.0


def assert_loaded_cleanly(model, info: dict, cls) -> None:
    assert type(model) is cls
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), f"{key}: {info.get(key)}"
    assert not info.get("error_msgs"), info.get("error_msgs")
    assert not info.get("conversion_errors"), info.get("conversion_errors")
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not meta, f"left on the meta device: {meta}"
    # transformers reverts these on save_pretrained: none, so that converted models save in this package's format
    assert not getattr(model, "_weight_conversions", None)


def load(row: Row, path, **kwargs):
    cls = ours(row.target)
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    assert_loaded_cleanly(model, info, cls)
    return model


# --------------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(ROWS))
def test_outputs_match_transformers(name, variant, tmp_path):
    row = ROWS[name]
    theirs = make_source(row, variant, tmp_path, seed=zlib.crc32(f"{name}/{variant}".encode()) % 1000)
    # A text sequence as long as max_position_embeddings in one variant, shorter in the others.
    inputs = make_inputs(row, theirs.config, seq_len=12 if variant == "qk_v" else 7)
    expected = run_theirs(row, theirs, inputs)
    for backend in ("eager", "sdpa"):
        model = load(row, tmp_path, attn_implementation=backend)
        assert model.config._attn_implementation == backend
        got = run_ours(row, model, inputs)
        # fp32 rounding (fused q/k/v and k/v projections, SDPA's summation order), not bit identity
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}/{variant}/{backend}: {m}")


@pytest.mark.parametrize("name, image_shape", [("fourier", (3, 1, 5)), ("conv", (3, 8, 12))])
def test_one_point_grid_axis_matches_transformers(name, image_shape, tmp_path):
    row = ROWS[name]
    theirs = make_source(row, "small", tmp_path)
    inputs = {"pixel_values": torch.randn(2, *image_shape, generator=torch.Generator().manual_seed(0))}
    model = load(row, tmp_path)
    torch.testing.assert_close(run_ours(row, model, inputs), run_theirs(row, theirs, inputs), rtol=RTOL, atol=ATOL)


def test_load_transformers_checkpoint_directly(tmp_path):
    row = ROWS["sequence"]
    theirs = make_source(row, "small", tmp_path)
    cls = ours(row.target)
    model, info = conversion().load_transformers_checkpoint(
        cls, tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert_loaded_cleanly(model, info, cls)
    inputs = make_inputs(row, theirs.config)
    torch.testing.assert_close(run_ours(row, model, inputs), run_theirs(row, theirs, inputs), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_sharded_and_bin_checkpoints_convert(layout, tmp_path):
    # Sharded: the learned table, its projection and the q/k/v rows land in different files; ".bin": the format of
    # the original deepmind/* uploads.
    row = ROWS["learned"]
    theirs = make_source(row, "qk_v", tmp_path / "one")
    if layout == "sharded":
        theirs.save_pretrained(tmp_path / "src", max_shard_size="100KB")
        assert len([f for f in os.listdir(tmp_path / "src") if f.endswith(".safetensors")]) > 2
    else:
        os.makedirs(tmp_path / "src")
        theirs.config.save_pretrained(tmp_path / "src")
        torch.save(theirs.state_dict(), tmp_path / "src" / "pytorch_model.bin")
    model = load(row, tmp_path / "src")
    inputs = make_inputs(row, theirs.config)
    torch.testing.assert_close(run_ours(row, model, inputs), run_theirs(row, theirs, inputs), rtol=RTOL, atol=ATOL)


def test_batchnorm_statistics_load(tmp_path):
    row = ROWS["conv"]
    theirs = make_source(row, "small", tmp_path)
    model = load(row, tmp_path)
    source = theirs.perceiver.input_preprocessor.convnet.batchnorm
    target = model.input_adapter.batchnorm
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(target, name), getattr(source, name)), name
    assert int(target.num_batches_tracked) == 7


def test_learned_positions_are_projected_once(tmp_path):
    row = ROWS["learned"]
    theirs = make_source(row, "small", tmp_path)
    pre = theirs.perceiver.input_preprocessor
    expected = pre.positions_projection(pre.position_embeddings.position_embeddings).detach()
    model = load(row, tmp_path)
    torch.testing.assert_close(model.input_adapter.position_embeddings.weight, expected, rtol=0, atol=1e-6)
    # bf16 loading: the loader hands the sources over in bf16; the projection itself is summed in float32
    model = load(row, tmp_path, dtype=torch.bfloat16)
    assert model.input_adapter.position_embeddings.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.input_adapter.position_embeddings.weight.float(), expected, rtol=2e-2, atol=5e-2)


def test_masked_lm_output_layer_is_tied(tmp_path):
    theirs = make_source(ROWS["masked_lm"], "small", tmp_path)
    model = load(ROWS["masked_lm"], tmp_path)
    assert model.lm_head.weight.data_ptr() == model.input_adapter.token_embeddings.weight.data_ptr()
    assert torch.equal(model.lm_head.bias, theirs.embedding_decoder.bias)


def test_one_conversion_mapping_for_the_whole_model(tmp_path):
    # transformers looks mappings up for every PreTrainedModel in the model: the nested PerceiverModel must not get a
    # scoped copy, and this package's own class names must stay unregistered (save_pretrained would revert them).
    from transformers.conversion_mapping import get_model_conversion_mapping, register_checkpoint_conversion_mapping

    tc = conversion()
    for name in ("sequence", "learned", "masked_lm", "flow"):
        row = ROWS[name]
        config, _ = tc.config_from_transformers(source_config("small", architectures=[row.source]))
        cls = ours(row.target)
        loader = tc._loader_class(cls, row.source)
        register_checkpoint_conversion_mapping(loader.__name__, tc.weight_mapping(row.source), overwrite=True)
        with torch.device("meta"):
            model = loader(config)
        mapping = get_model_conversion_mapping(model, add_legacy=False)
        assert len(mapping) == len(tc.weight_mapping(row.source))
        assert all(t.scope_prefix is None for t in mapping)
        model.__class__ = cls
        assert get_model_conversion_mapping(model, add_legacy=False) == []


def test_logs_the_conversion_once(tmp_path, caplog):
    make_source(ROWS["bare"], "small", tmp_path)
    with caplog.at_level(logging.WARNING):
        load(ROWS["bare"], tmp_path)
    notes = [r for r in caplog.records if "Converted the transformers Perceiver checkpoint" in r.getMessage()]
    assert len(notes) == 1
    assert str(tmp_path) in notes[0].getMessage()


# ------------------------------------------------------------------------------------------ encoder only, overrides


@pytest.mark.parametrize("name", ["sequence", "learned", "masked_lm", "flow"])
def test_perceiver_model_loads_the_encoder_of_any_checkpoint(name, tmp_path):
    row = ROWS[name]
    theirs = make_source(row, "qk_v", tmp_path)
    model = load(ROWS["bare"], tmp_path)  # no missing keys, head weights left out without a report
    # transformers' encoder on its own preprocessor's tokens
    inputs = make_inputs(row, theirs.config)
    raw = inputs.get("input_ids", inputs.get("pixel_values"))
    with torch.no_grad():
        tokens = theirs.perceiver.input_preprocessor(raw)[0]
        mask = inputs.get("attention_mask")
        expected = theirs.perceiver(inputs=raw, attention_mask=mask).last_hidden_state
        got = model(tokens, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def test_config_overrides_apply_to_the_converted_config(tmp_path):
    make_source(ROWS["sequence"], "small", tmp_path)
    cls = ours("PerceiverForSequenceClassification")
    model = cls.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert model.config.num_labels == 5 and model.head.classifier.out_features == 5


# ------------------------------------------------------------------------------------------------- refusals


def test_multimodal_autoencoding_is_refused(tmp_path):
    src = source_config("small", architectures=["PerceiverForMultimodalAutoencoding"])
    with pytest.raises(ValueError, match="PerceiverForMultimodalAutoencoding"):
        conversion().config_from_transformers(src)
    src.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="PerceiverForMultimodalAutoencoding"):
        ours("PerceiverModel").from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(architectures=["PerceiverForSomethingElse"]), "Unknown transformers Perceiver architecture"),
        (dict(architectures=None), "no `architectures`"),
        (dict(architectures=["PerceiverForMaskedLM"], hidden_act="relu"), "GELU"),
        # self-attention values 12 wide on 24-wide latents: transformers itself cannot run this config
        (dict(architectures=["PerceiverForMaskedLM"], qk_channels=12, v_channels=None), "value width"),
    ],
)
def test_unconvertible_configs_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        conversion().config_from_transformers(source_config("qk_v", **overrides))


def test_other_model_types_are_refused():
    with pytest.raises(ValueError, match="model_type"):
        conversion().config_from_transformers({"model_type": "bert", "architectures": ["BertModel"]})


def test_wrong_head_is_refused_with_the_right_class_named(tmp_path):
    make_source(ROWS["masked_lm"], "small", tmp_path)
    with pytest.raises(ValueError, match="PerceiverForMaskedLM"):
        ours("PerceiverForSequenceClassification").from_pretrained(tmp_path)


def test_config_dict_is_converted_like_the_config():
    src = source_config("qk_v", architectures=["PerceiverForOpticalFlow"])
    tc = conversion()
    from_object, name = tc.config_from_transformers(src)
    from_dict, same = tc.config_from_transformers(json.loads(src.to_json_string(use_diff=True)))
    assert name == same == "PerceiverForOpticalFlow"
    assert from_object.to_dict() == from_dict.to_dict()
    assert from_object.latent_stack_repeats == 2 and from_object.cross_head_dim == 6 and from_object.cross_v_head_dim == 12


# -------------------------------------------------------------------------------------------- save and reload


@pytest.mark.parametrize("name", sorted(ROWS))
def test_saved_converted_model_is_native_and_reloads_exactly(name, tmp_path):
    row = ROWS[name]
    theirs = make_source(row, "qk_v", tmp_path / "src")
    model = load(row, tmp_path / "src", attn_implementation="eager")
    model.save_pretrained(tmp_path / "native")
    with open(tmp_path / "native" / "config.json") as f:
        saved = json.load(f)
    assert saved["model_type"] == "flash_perceiver"
    assert saved["architectures"] == [row.target]
    state = load_file(str(tmp_path / "native" / "model.safetensors"))
    assert not [k for k in state if "attention.self" in k or "input_preprocessor" in k], "saved in transformers' names"

    cls = ours(row.target)
    again, info = cls.from_pretrained(tmp_path / "native", attn_implementation="eager", output_loading_info=True)
    assert_loaded_cleanly(again, info, cls)
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    inputs = make_inputs(row, theirs.config)
    torch.testing.assert_close(run_ours(row, again, inputs), run_ours(row, model, inputs), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------- training


class _Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("name", ["sequence", "learned"])
def test_trainer_fine_tunes_a_converted_classifier(name, tmp_path):
    from transformers import Trainer, TrainingArguments

    row = ROWS[name]
    make_source(row, "small", tmp_path / "src", attention_probs_dropout_prob=0.1)
    model = load(row, tmp_path / "src")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    if row.kind == "text":
        items = [{"input_ids": torch.randint(0, 30, (7,), generator=g), "attention_mask": torch.ones(7, dtype=torch.long),
                  "labels": torch.tensor(i % 3)} for i in range(6)]
    else:
        items = [{"pixel_values": torch.randn(*row.image_shape, generator=g), "labels": torch.tensor(i % 3)}
                 for i in range(6)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    result = Trainer(model=model, args=args, train_dataset=_Items(items)).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    after = model.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert "head.classifier.weight" in changed and any(k.startswith("perceiver.encoder.") for k in changed)


@pytest.mark.parametrize("variant", ["small", "qk_v"])
@pytest.mark.parametrize("name", ["masked_lm", "learned"])
def test_converted_training_step_traces_as_one_graph(name, variant, tmp_path):
    # The fine-tuning fast path (Trainer's torch_compile, with CUDA graphs in "reduce-overhead" mode) needs the whole
    # training forward, loss included, in one graph: a graph break would split it into pieces replayed separately.
    row = ROWS[name]
    make_source(row, variant, tmp_path / "src", attention_probs_dropout_prob=0.1)
    model = load(row, tmp_path / "src").train()
    inputs = make_inputs(row, source_config(variant))
    if row.kind == "mlm":
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    else:
        inputs["labels"] = torch.tensor([0, 2])
    from core_common import graph_breaks

    assert graph_breaks(model, **inputs) == "0 graph break(s): []"


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_converts_a_masked_lm_with_its_tokenizer(tmp_path, capsys):
    importlib.import_module("hf_flash_perceiver")  # registers the flash_perceiver model type with the Auto classes
    from transformers import PerceiverTokenizer, pipeline

    src, dst = tmp_path / "src", tmp_path / "dst"
    # The byte-level tokenizer has 262 ids and 6 special tokens; the model reads max_position_embeddings bytes.
    make_source(ROWS["masked_lm"], "small", src, vocab_size=262, max_position_embeddings=32)
    PerceiverTokenizer(model_max_length=32).save_pretrained(src)
    tokenizer_files = sorted(f for f in os.listdir(src) if f not in ("config.json", "model.safetensors"))
    assert "tokenizer_config.json" in tokenizer_files

    assert conversion().main([str(src), str(dst)]) == 0
    written = sorted(os.listdir(dst))
    assert {"config.json", "model.safetensors", *tokenizer_files} <= set(written)
    printed = capsys.readouterr().out
    assert all(name in printed for name in written)
    with open(dst / "config.json") as f:
        assert json.load(f)["model_type"] == "flash_perceiver"

    fill = pipeline("fill-mask", model=str(dst))
    predictions = fill("This is a [MASK] test.", top_k=2)
    assert len(predictions) == 2 and all("token_str" in p for p in predictions)


def test_cli_converts_an_image_classifier_with_its_image_processor(tmp_path):
    importlib.import_module("hf_flash_perceiver")
    from PIL import Image
    from transformers import PerceiverImageProcessor, pipeline

    src, dst = tmp_path / "src", tmp_path / "dst"
    # ConvProcessing reads any image size: the processor's default 224 x 224 gives 55 x 55 tokens
    make_source(ROWS["conv"], "small", src, id2label={0: "cat", 1: "dog", 2: "bird"})
    PerceiverImageProcessor().save_pretrained(src)
    assert conversion().main([str(src), str(dst)]) == 0
    assert os.path.isfile(dst / "preprocessor_config.json")

    classify = pipeline("image-classification", model=str(dst))
    image = Image.fromarray((torch.rand(40, 30, 3) * 255).to(torch.uint8).numpy())
    predictions = classify(image, top_k=3)
    assert sorted(p["label"] for p in predictions) == ["bird", "cat", "dog"]


def test_cli_refuses_an_existing_destination(tmp_path, capsys):
    src = tmp_path / "src"
    make_source(ROWS["bare"], "small", src)
    existing_file = tmp_path / "file"
    existing_file.write_text("keep me")
    capsys.readouterr()  # the source's save progress bars
    assert conversion().main([str(src), str(existing_file)]) == 2
    assert capsys.readouterr().err == (
        f"convert-transformers-perceiver: error: DST {existing_file} is an existing file; give a folder to write the "
        "converted model into (new or empty).\n"
    )
    assert existing_file.read_text() == "keep me"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert conversion().main([str(src), str(busy)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert conversion().main([str(src), str(busy), "--overwrite"]) == 0
    assert os.path.isfile(busy / "config.json")


def test_cli_refuses_a_non_perceiver_source(tmp_path, capsys):
    src = tmp_path / "src"
    ours("PerceiverModel")(ours("PerceiverModel").config_class(input_dim=4, depth=1, num_latents=2, latent_dim=8,
                                                              latent_heads=1, latent_head_dim=8)).save_pretrained(src)
    assert conversion().main([str(src), str(tmp_path / "dst")]) == 1
    assert "not a transformers Perceiver checkpoint" in capsys.readouterr().err


def test_cli_downloads_a_hub_source(tmp_path, monkeypatch):
    # No network here: the Hub download is replaced by a local folder, checking what the CLI asks for.
    import huggingface_hub

    src = tmp_path / "snapshot"
    make_source(ROWS["sequence"], "small", src)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert conversion().main(["someone/text-perceiver", str(tmp_path / "dst"), "--revision", "v1"]) == 0
    (repo_id, kwargs), = calls
    assert repo_id == "someone/text-perceiver" and kwargs["revision"] == "v1"
    assert {"config.json", "*.safetensors", "pytorch_model*.bin", "tokenizer_config.json",
            "preprocessor_config.json"} <= set(kwargs["allow_patterns"])
    assert os.path.isfile(tmp_path / "dst" / "model.safetensors")
