"""`import hf_flash_perceiver` is light (no torch, no transformers modeling code), every public name still imports on
use, and the models reach transformers' Auto classes whichever of the two packages a script imports first.

Each import order runs in a fresh interpreter; they all start at once (each imports torch and transformers, a few
seconds), and each test reads the outcome of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hf_flash_perceiver
from hf_flash_perceiver import PerceiverConfig, PerceiverModel


ROOT = Path(__file__).resolve().parents[1]

# Runs first in every script: `saved` is a saved PerceiverModel; `check_loads` loads it through the Auto classes.
PRELUDE = """\
import sys
saved = sys.argv[1]

def check_loads():
    from transformers import AutoConfig, AutoModel
    from hf_flash_perceiver.modeling_perceiver import PerceiverConfig, PerceiverModel
    assert type(AutoConfig.from_pretrained(saved)) is PerceiverConfig
    assert type(AutoModel.from_pretrained(saved)) is PerceiverModel
    assert type(AutoConfig.for_model("flash_perceiver")) is PerceiverConfig
"""

ORDERS = {
    # Import first, then the Auto classes, then every public name (`import *`) and the legacy paths.
    "package_then_auto": """
        import hf_flash_perceiver
        assert set(hf_flash_perceiver.__all__) <= set(dir(hf_flash_perceiver))
        try:
            hf_flash_perceiver.no_such_name
        except AttributeError as error:
            assert "'hf_flash_perceiver'" in str(error) and "'no_such_name'" in str(error), error
        else:
            raise AssertionError("no AttributeError for an unknown name")
        heavy = [name for name in ("torch", "transformers.modeling_utils", "hf_flash_perceiver.legacy") if name in sys.modules]
        assert not heavy, f"imported by `import hf_flash_perceiver`: {heavy}"

        from transformers import (
            AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForMaskedLM,
            AutoModelForSequenceClassification,
        )
        check_loads()
        from hf_flash_perceiver import modeling_perceiver as m
        assert type(AutoModelForSequenceClassification.from_pretrained(saved)) is m.PerceiverForSequenceClassification
        assert AutoModelForImageClassification._model_mapping[m.PerceiverConfig] is m.PerceiverForImageClassification
        assert AutoModelForMaskedLM._model_mapping[m.PerceiverConfig] is m.PerceiverForMaskedLM

        namespace = {}
        exec("from hf_flash_perceiver import *", namespace)
        assert set(hf_flash_perceiver.__all__) <= set(namespace)
        assert all(namespace[name] is getattr(hf_flash_perceiver, name) for name in hf_flash_perceiver.__all__)
        assert namespace["PerceiverModel"] is m.PerceiverModel
        # The function, not the submodule of the same name that the import system binds on the package.
        from hf_flash_perceiver.context_parallel import context_parallel
        assert hf_flash_perceiver.context_parallel is context_parallel
        import hf_flash_perceiver.seed_api as seed_api
        assert seed_api is hf_flash_perceiver.legacy.seed_api is sys.modules["hf_flash_perceiver.seed_api"]
        assert hf_flash_perceiver.utils is hf_flash_perceiver.legacy.utils is sys.modules["hf_flash_perceiver.utils"]
        assert hf_flash_perceiver.layers is sys.modules["hf_flash_perceiver.layers"]  # submodules stay attributes
    """,
    # transformers' Auto classes already imported: the package registers right away.
    "auto_then_package": """
        from transformers import AutoModel
        import hf_flash_perceiver
        check_loads()
    """,
    # transformers' modeling code imports its Auto modules while it is itself half-initialised.
    "package_then_modeling_layers": """
        import hf_flash_perceiver
        from transformers.modeling_layers import GradientCheckpointingLayer
        check_loads()
    """,
    "package_then_model_class": """
        import hf_flash_perceiver
        from hf_flash_perceiver import PerceiverModel
        from transformers import AutoModel
        assert type(AutoModel.from_pretrained(saved)) is PerceiverModel
        check_loads()
    """,
    # The model module imported by its path, as a script may (the package `__getattr__` is not involved).
    "modeling_module_then_auto": """
        from hf_flash_perceiver.modeling_perceiver import PerceiverModel
        from transformers import AutoModel
        check_loads()
    """,
    "transformers_then_package": """
        import transformers
        import hf_flash_perceiver
        from hf_flash_perceiver.configuration_perceiver import PerceiverConfig
        assert type(transformers.AutoConfig.for_model("flash_perceiver")) is PerceiverConfig
        check_loads()
    """,
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    saved = tmp_path_factory.mktemp("flash_perceiver")
    config = PerceiverConfig(input_dim=8, depth=1, num_latents=4, latent_dim=16, cross_head_dim=8, latent_heads=2,
                             latent_head_dim=8)
    PerceiverModel(config).save_pretrained(saved)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    running = {}
    for name, body in ORDERS.items():
        log = open(saved.parent / f"{name}.log", "w+")
        script = PRELUDE + textwrap.dedent(body) + "print('all checks passed')\n"
        running[name] = (subprocess.Popen([sys.executable, "-c", script, str(saved)], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, text=True), log)
    outcomes = {}
    for name, (process, log) in running.items():
        try:
            process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.seek(0)
        outcomes[name] = (process.returncode, log.read())
        log.close()
    return outcomes


@pytest.mark.parametrize("order", list(ORDERS))
def test_import_order(outcomes, order):
    returncode, output = outcomes[order]
    assert returncode == 0 and "all checks passed" in output, output[-4000:]


def test_exports_table_matches_all():
    assert set(hf_flash_perceiver._EXPORTS) == set(hf_flash_perceiver.__all__)
    for name in hf_flash_perceiver.__all__:
        assert getattr(hf_flash_perceiver, name) is not None


def test_legacy_paths_match_the_legacy_aliases():
    from hf_flash_perceiver import _lazy, legacy

    assert {path.partition(".")[0] for path in legacy.LEGACY_MODULE_PATHS} == _lazy.LEGACY_PATHS
