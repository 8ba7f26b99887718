"""Hub sharing: saved code and a complete auto_map, loading with trust_remote_code in an interpreter where
hf_flash_perceiver cannot be imported, push_to_hub (redirected to a local folder) with its model card, and loading
through the registered Auto classes without remote code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoUrl
from transformers import AutoModel, AutoModelForImageClassification, AutoModelForMaskedLM, AutoModelForSequenceClassification

from hf_flash_perceiver import (
    PerceiverConfig,
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    PerceiverIOForRegression,
    PerceiverIOModel,
    PerceiverModel,
)

import heads_common
from heads_common import assert_close_outputs, assert_same_weights_and_close_outputs, perturbed, weights_and_buffers


CODE_FILES = {"modeling_perceiver.py", "configuration_perceiver.py", "layers.py", "attention_backends.py",
              "cross_attention.py", "input_preparation.py", "encoder.py", "decoder.py", "losses.py", "input_adapters.py",
              "hub_perceiver.py", "fused_norm.py", "fused_block.py", "fused_activation.py", "fused_softmax.py",
              "fused_concat.py", "shared_gradients.py", "weight_cast.py"}


def tiny(**kw) -> PerceiverConfig:
    return heads_common.tiny(**{"latent_rotary_emb_dim": 4, **kw})


# name: (build, the Auto class it loads with, its inputs, the output field compared)
MODELS = {
    "base": (lambda: PerceiverModel(tiny(input_dim=6)), "AutoModel",
             lambda: {"inputs": torch.randn(2, 5, 6)}, "last_hidden_state"),
    "sequence": (lambda: PerceiverForSequenceClassification(tiny(input_dim=6, num_labels=3, pooling="query")),
                 "AutoModelForSequenceClassification", lambda: {"inputs": torch.randn(2, 5, 6)}, "logits"),
    "image": (lambda: PerceiverForImageClassification(tiny(num_labels=3)), "AutoModelForImageClassification",
              lambda: {"pixel_values": torch.randn(2, 3, 8, 8)}, "logits"),
    "masked_lm": (lambda: PerceiverForMaskedLM(tiny()), "AutoModelForMaskedLM",
                  lambda: {"input_ids": torch.randint(0, 262, (2, 9)),
                           "attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3])}, "logits"),
    "io": (lambda: PerceiverIOModel(tiny(input_dim=4, num_queries=3, output_dim=2)), "AutoModel",
           lambda: {"inputs": torch.randn(2, 5, 4)}, "logits"),
    "io_regression": (lambda: PerceiverIOForRegression(tiny(input_dim=4, query_dim=5, output_dim=2)), "AutoModel",
                      lambda: {"inputs": torch.randn(2, 5, 4), "queries": torch.randn(4, 5)}, "logits"),
}


@pytest.fixture(autouse=True)
def unregister():
    """`register_for_auto_class` sets a class attribute: keep it from leaking into other tests."""
    yield
    for cls in (PerceiverModel, PerceiverForSequenceClassification, PerceiverForImageClassification,
                PerceiverForMaskedLM, PerceiverIOModel, PerceiverIOForRegression):
        cls._auto_class = None


def build(name: str, seed: int = 0):
    make, auto, inputs, field = MODELS[name]
    torch.manual_seed(seed)
    return perturbed(make(), seed), auto, inputs(), field


def save_registered(name: str, folder: Path) -> None:
    """Save `name` with its code, and the inputs and outputs a clean interpreter must reproduce."""
    model, auto, inputs, field = build(name)
    type(model).register_for_auto_class()
    model.save_pretrained(folder)
    save_check(model, auto, inputs, field, folder)


def save_check(model, auto: str, inputs: dict, field: str, folder: Path) -> None:
    """What the clean interpreter must reproduce: the weights and buffers, and the outputs for `inputs`."""
    with torch.no_grad():
        expected = getattr(model(**inputs), field)
    state = {name: t.detach().clone() for name, t in weights_and_buffers(model).items()}
    torch.save({"inputs": inputs, "expected": expected, "state": state, "field": field, "auto": auto},
               folder / "check.pt")


# Runs in a fresh interpreter. A meta-path finder placed first refuses `hf_flash_perceiver`, so the editable install
# (and the repository on sys.path) cannot provide it: everything must come from the code saved in each folder.
CLEAN_LOADER = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "hf_flash_perceiver":
                raise ImportError("hf_flash_perceiver is blocked in this interpreter")

    sys.meta_path.insert(0, Refuse())
    try:
        import hf_flash_perceiver
        raise SystemExit("hf_flash_perceiver was importable")
    except ImportError:
        pass

    import torch
    import transformers

    results = {}
    for folder in sys.argv[1:]:
        check = torch.load(folder + "/check.pt")
        auto = getattr(transformers, check["auto"])
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            got = getattr(model(**check["inputs"]), check["field"])
        torch.save(got, folder + "/got.pt")  # compared with the expected outputs within fp32 rounding, outside
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
        encoder = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)
        results[folder] = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "same_weight_names": sorted(state) == sorted(check["state"]),
            "weights_identical": all(
                name in state and torch.equal(state[name], t) for name, t in check["state"].items()
            ),
            "config_module": type(config).__module__,
            "auto_model_class": type(encoder).__name__,
        }
    assert not any(m.split(".")[0] == "hf_flash_perceiver" for m in sys.modules)
    print(json.dumps(results))
    """
)


def load_in_clean_interpreter(folders: list[Path], tmp_path: Path) -> dict:
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", CLEAN_LOADER, *map(str, folders)], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def redirect_hub(monkeypatch, hub: Path) -> None:
    """No network here: `HfApi.create_repo` and `HfApi.create_commit` (the two calls `push_to_hub` makes) write into
    `hub/<repo_id>/` instead, so that what would be uploaded can be loaded back like a downloaded repository."""

    def create_repo(self, repo_id, *args, **kwargs):
        (hub / repo_id).mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, *args, **kwargs):
        for op in operations:
            target = hub / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, target)
        return f"https://huggingface.co/{repo_id}/commit/local"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)


def test_saved_folder_has_code_and_complete_auto_map(tmp_path):
    for name in MODELS:
        save_registered(name, tmp_path / name)
        files = {p.name for p in (tmp_path / name).iterdir()}
        assert CODE_FILES <= files, (name, CODE_FILES - files)
        auto_map = json.loads((tmp_path / name / "config.json").read_text())["auto_map"]
        model_cls = type(build(name)[0]).__name__
        expected = {"AutoConfig": "configuration_perceiver.PerceiverConfig"}
        auto = MODELS[name][1]
        expected["AutoModel"] = f"modeling_perceiver.{model_cls if auto == 'AutoModel' else 'PerceiverModel'}"
        expected[auto] = f"modeling_perceiver.{model_cls}"
        assert auto_map == expected, name


def test_register_for_auto_class_defaults_to_the_task_class():
    PerceiverForImageClassification.register_for_auto_class()
    assert PerceiverForImageClassification._auto_class == "AutoModelForImageClassification"
    PerceiverForMaskedLM.register_for_auto_class("AutoModel")
    assert PerceiverForMaskedLM._auto_class == "AutoModel"


def test_trust_remote_code_and_push_to_hub_in_a_clean_interpreter(tmp_path, monkeypatch):
    folders = []
    for name in MODELS:
        save_registered(name, tmp_path / name)
        folders.append(tmp_path / name)

    # push_to_hub, redirected into a local "hub" folder (see redirect_hub).
    redirect_hub(monkeypatch, tmp_path / "hub")
    model, auto, inputs, field = build("image")
    type(model).register_for_auto_class()
    model.push_to_hub("someone/tiny-perceiver-image", tags=["digits"])
    pushed = tmp_path / "hub" / "someone" / "tiny-perceiver-image"
    assert CODE_FILES | {"config.json", "model.safetensors", "README.md"} <= {p.name for p in pushed.iterdir()}
    card = (pushed / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "- digits" in card
    assert "| num_labels | 3 |" in card and "| patch_size | 2 |" in card
    assert 'AutoModelForImageClassification.from_pretrained("someone/tiny-perceiver-image", trust_remote_code=True)' in card
    save_check(model, auto, inputs, field, pushed)
    folders.append(pushed)

    results = load_in_clean_interpreter(folders, tmp_path)
    for name, folder in zip([*MODELS, "pushed"], folders):
        result = results[str(folder)]
        expected_cls = type(build("image" if name == "pushed" else name)[0]).__name__
        assert result["class"] == expected_cls, (name, result)
        assert result["module"].startswith("transformers_modules."), (name, result)
        assert result["config_module"].startswith("transformers_modules."), (name, result)
        # Bit-equal weights, outputs within fp32 rounding (see heads_common).
        assert result["same_weight_names"] and result["weights_identical"], (name, result)
        check = torch.load(folder / "check.pt")
        assert_close_outputs(torch.load(folder / "got.pt"), check["expected"])
        io = name in ("base", "io", "io_regression")
        assert result["auto_model_class"] == (expected_cls if io else "PerceiverModel"), (name, result)


def test_push_to_hub_without_card_uploads_no_readme(tmp_path, monkeypatch):
    redirect_hub(monkeypatch, tmp_path / "hub")
    build("base")[0].push_to_hub("someone/bare", model_card=False)
    files = {p.name for p in (tmp_path / "hub" / "someone" / "bare").iterdir()}
    assert "README.md" not in files and {"config.json", "model.safetensors"} <= files


@pytest.mark.parametrize(
    "name, auto",
    [("base", AutoModel), ("sequence", AutoModelForSequenceClassification), ("image", AutoModelForImageClassification),
     ("masked_lm", AutoModelForMaskedLM)],
)
def test_registered_auto_classes_load_without_remote_code(tmp_path, name, auto):
    model, _, inputs, field = build(name)
    type(model).register_for_auto_class()  # code saved too, but the installed package's classes are used
    model.save_pretrained(tmp_path)
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert_same_weights_and_close_outputs(loaded, model, lambda m: getattr(m(**inputs), field))


def _card_code(card: str) -> str:
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def test_model_card_tells_how_the_model_was_saved(tmp_path):
    """The card's snippet claims remote code only where the folder carries it; otherwise it names the package and
    the import, and the snippet runs as written."""
    from transformers import ViTImageProcessor

    model, _, inputs, field = build("image")
    plain = model.model_card(str(tmp_path / "plain"))
    assert "trust_remote_code=True" not in plain
    assert "pip install hf-flash-perceiver" in plain and "import hf_flash_perceiver" in plain
    model.save_pretrained(tmp_path / "plain")
    assert not CODE_FILES & {p.name for p in (tmp_path / "plain").iterdir()}
    assert "auto_map" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(tmp_path / "plain")
    namespace = {}
    exec(_card_code(plain), namespace)  # the package is importable here, as the card requires
    assert type(namespace["model"]) is type(model) and namespace["pipe"].task == "image-classification"
    assert_same_weights_and_close_outputs(namespace["model"].eval(), model, lambda m: getattr(m(**inputs), field))

    type(model).register_for_auto_class()
    registered = model.model_card("me/registered")
    assert 'AutoModelForImageClassification.from_pretrained("me/registered", trust_remote_code=True)' in registered
    assert 'pipeline("image-classification", model="me/registered", trust_remote_code=True)' in registered
    model.save_pretrained(tmp_path / "registered")
    assert CODE_FILES <= {p.name for p in (tmp_path / "registered").iterdir()}

    io = build("io_regression")[0]
    card = io.model_card("me/io")
    assert 'PerceiverIOForRegression.from_pretrained("me/io")' in card and "trust_remote_code=True" not in card
    type(io).register_for_auto_class()
    assert 'AutoModel.from_pretrained("me/io", trust_remote_code=True)' in io.model_card("me/io")


def _readme_hub_snippet() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("<!-- section:hub -->", 1)[1].split("<!-- section:", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_hub_snippet_runs_and_loads_without_the_package(tmp_path):
    snippet = _readme_hub_snippet()
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    folder = tmp_path / "my-perceiver"
    assert CODE_FILES <= {p.name for p in folder.iterdir()}
    # What the snippet saved loads where hf_flash_perceiver cannot be imported, with the same weights and outputs.
    model = PerceiverForImageClassification.from_pretrained(folder).eval()
    save_check(model, "AutoModelForImageClassification", {"pixel_values": torch.randn(2, 3, 8, 8)}, "logits", folder)
    result = load_in_clean_interpreter([folder], tmp_path)[str(folder)]
    assert result["class"] == "PerceiverForImageClassification" and result["weights_identical"], result
    assert_close_outputs(torch.load(folder / "got.pt"), torch.load(folder / "check.pt")["expected"])
