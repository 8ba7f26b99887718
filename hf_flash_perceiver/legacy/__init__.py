"""The `flash-perceiver` 0.2.0 compatibility layer: its `Perceiver` / `PerceiverIO` API, its helpers (`utils`,
`utils.encodings`, `adapters`) and the checkpoint converter, all on top of the core models of this package.

The core package never imports from here; this subpackage only depends on it. The package `__init__` re-exports the
seed API (`Perceiver`, `PerceiverIO`, `adapters`, `convert_flash_perceiver_checkpoint`, `encodings`, `utils`) lazily:
this subpackage is imported when one of those names, or one of the former paths below, is first used.

Importing this subpackage also registers the module paths of the former flat layout (`hf_flash_perceiver.utils`,
`hf_flash_perceiver.utils.encodings`, `hf_flash_perceiver.adapters`, `hf_flash_perceiver.encodings`,
`hf_flash_perceiver.convert_flash_perceiver`, `hf_flash_perceiver.seed_api`) as aliases of the modules here, so code
and console scripts written against those paths keep importing the same objects.
"""

from __future__ import annotations

import sys
from types import ModuleType

from . import adapters, convert_flash_perceiver, encodings, seed_api, utils
from .convert_flash_perceiver import convert_flash_perceiver_checkpoint
from .seed_api import Perceiver, PerceiverIO


_PACKAGE = __name__.rpartition(".")[0]

# Former dotted path (relative to the package) -> the module that now holds it. `utils.encodings` is a module path,
# not a package path (the seed's `flash_perceiver.utils.encodings`): only `sys.modules` can make it importable, as
# `os.path` is for `os`.
LEGACY_MODULE_PATHS: dict[str, ModuleType] = {
    "adapters": adapters,
    "convert_flash_perceiver": convert_flash_perceiver,
    "encodings": encodings,
    "seed_api": seed_api,
    "utils": utils,
    "utils.encodings": encodings,
}


def install_legacy_aliases() -> None:
    """Make the former module paths (`hf_flash_perceiver.utils`, `hf_flash_perceiver.adapters`, ...) and
    `hf_flash_perceiver.legacy.utils.encodings` import the modules of this subpackage.

    Runs when the subpackage is imported; calling it again is harmless (it only writes `sys.modules` entries).
    """
    for dotted, module in LEGACY_MODULE_PATHS.items():
        sys.modules[f"{_PACKAGE}.{dotted}"] = module
    sys.modules[f"{__name__}.utils.encodings"] = encodings


install_legacy_aliases()


__all__ = [
    "Perceiver",
    "PerceiverIO",
    "adapters",
    "convert_flash_perceiver",
    "convert_flash_perceiver_checkpoint",
    "encodings",
    "install_legacy_aliases",
    "seed_api",
    "utils",
]
