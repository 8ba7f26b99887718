"""What keeps `import hf_flash_perceiver` light: registration with transformers' Auto classes once those are imported,
the former flat-layout module paths of the legacy API, and the package module's type.

This lives outside the model files on purpose: those are also shared to the Hub as remote code, which must not
import this package.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType


PACKAGE = __name__.rpartition(".")[0]

# The former flat-layout paths that `legacy.install_legacy_aliases` maps (`utils.encodings` follows from `utils`).
LEGACY_PATHS = frozenset({"adapters", "convert_flash_perceiver", "encodings", "seed_api", "utils"})


def _register_config() -> None:
    from transformers import AutoConfig

    from .configuration_perceiver import PerceiverConfig

    # transformers ships its own `PerceiverConfig`/`PerceiverModel` (model_type "perceiver"); ours registers under
    # "flash_perceiver". exist_ok=True keeps a second registration (a reload in a notebook) from failing.
    AutoConfig.register(PerceiverConfig.model_type, PerceiverConfig, exist_ok=True)


def _register_models() -> None:
    from transformers import (
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )

    # Not `from . import ...`: that asks the package's `__getattr__`, which registers in turn.
    models = importlib.import_module(f"{PACKAGE}.modeling_perceiver")
    config = models.PerceiverConfig
    AutoModel.register(config, models.PerceiverModel, exist_ok=True)
    AutoModelForSequenceClassification.register(config, models.PerceiverForSequenceClassification, exist_ok=True)
    # Every head with a task Auto class is registered: for an unregistered class, transformers' Auto mappings resolve
    # by config class *name* and would reach its own PerceiverForImageClassification / PerceiverForMaskedLM. The IO
    # models have no task Auto class (AutoModel is the encoder); they load by class, or through a saved `auto_map`.
    AutoModelForImageClassification.register(config, models.PerceiverForImageClassification, exist_ok=True)
    AutoModelForMaskedLM.register(config, models.PerceiverForMaskedLM, exist_ok=True)


# transformers module that defines the Auto classes -> the registration it calls for. Registering the models imports
# torch and transformers' modeling code, so it waits for `AutoModel` & co.; `AutoConfig` alone gets the config only.
_pending: dict[str, Callable[[], None]] = {
    "transformers.models.auto.configuration_auto": _register_config,
    "transformers.models.auto.modeling_auto": _register_models,
}
_running = False


def _watched(name: str) -> bool:
    return name == "transformers" or name.startswith(("transformers.", f"{PACKAGE}."))


def _initialising(finished: str | None) -> bool:
    # `finished` has just executed, but the import system still marks it until its loader returns.
    for name, module in list(sys.modules.items()):
        if name != finished and _watched(name) and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


def maybe_register(finished: str | None = None, force: bool = False) -> None:
    """Run each pending registration whose Auto module is imported (all of them with `force`).

    transformers' own modules import the Auto modules halfway through their own initialisation (`modeling_utils`
    through its quantizers, `modeling_layers`), and the models of this package import those modules: registering
    then would meet half-initialised modules. So this waits until no module of transformers or of this package is
    initialising; the hook calls it again as each of them finishes.
    """
    global _running
    if _running or not _pending or not (force or any(name in sys.modules for name in _pending)):
        return
    if _initialising(finished):
        return
    _running = True
    try:
        for trigger, register in list(_pending.items()):
            if force or trigger in sys.modules:
                del _pending[trigger]
                try:
                    register()
                except Exception as error:  # an import hook must not break the user's import of transformers
                    warnings.warn(
                        f"{PACKAGE} could not register with transformers' Auto classes: {error!r}", RuntimeWarning
                    )
    finally:
        _running = False
    if not _pending:
        try:
            sys.meta_path.remove(_HOOK)
        except ValueError:
            pass


class _NotifyingLoader(Loader):
    def __init__(self, loader: Loader) -> None:
        self.loader = loader

    def __getattr__(self, name: str):  # get_source, get_resource_reader, ... for whoever holds the spec
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        create = getattr(self.loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        # The module runs with its own loader (`inspect`, `importlib.resources` and `linecache` ask it).
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        if getattr(module.__spec__, "loader", None) is self:
            module.__spec__.loader = self.loader
        name = module.__name__
        self.loader.exec_module(module)
        maybe_register(finished=name)


class _AfterImportHook(MetaPathFinder):
    """While a registration is pending, each module of transformers or of this package is loaded through a loader
    that calls `maybe_register` once the module has executed."""

    def find_spec(self, fullname, path, target=None):
        if not _watched(fullname):
            return None
        finders = list(sys.meta_path)
        if self not in finders:
            return None
        for finder in finders[finders.index(self) + 1 :]:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _NotifyingLoader(spec.loader)
        return spec


class _LegacyPathFinder(MetaPathFinder, Loader):
    """The former flat-layout paths (`hf_flash_perceiver.utils`, ...) have no file: importing one imports the legacy
    subpackage, whose `install_legacy_aliases` puts the module the path stands for in `sys.modules` in its place
    (the import system returns that replacement)."""

    def find_spec(self, fullname, path, target=None):
        parent, _, name = fullname.rpartition(".")
        if parent != PACKAGE or name not in LEGACY_PATHS:
            return None
        return ModuleSpec(fullname, self)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        importlib.import_module(f"{PACKAGE}.legacy").install_legacy_aliases()


_HOOK = _AfterImportHook()
_LEGACY_FINDER = _LegacyPathFinder()


def install() -> None:
    """Called by the package `__init__`: registers now if transformers' Auto classes are already imported, and
    otherwise as soon as they are."""
    if _LEGACY_FINDER not in sys.meta_path:
        sys.meta_path.append(_LEGACY_FINDER)  # last: real files come first
    if _pending and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)  # first: it hands each module on to the finders after it
    maybe_register()


class Package(ModuleType):
    """The package module's type. The import system binds each submodule it imports on the package; for
    `context_parallel`, also the name of the function that the package exports from that submodule, the export must
    win (as it did when the package imported everything eagerly), so that binding is dropped and the package's
    `__getattr__` answers with the function."""

    def __setattr__(self, name: str, value: object) -> None:
        exports = self.__dict__.get("_EXPORTS", {})
        if exports.get(name) == name and isinstance(value, ModuleType) and value.__name__ == f"{self.__name__}.{name}":
            return
        super().__setattr__(name, value)
