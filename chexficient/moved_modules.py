"""Import paths of modules that moved in 0.3, kept for one release: importing one warns and returns the module at
its new place (the same module object, so state and `isinstance` checks are shared)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType


MOVED_MODULES: dict[str, str] = {
    "chexficient.bootstrap": "chexficient.metrics.bootstrap",
    "chexficient.checkpoints": "chexficient.runtime.checkpoints",
    "chexficient.convert": "chexficient.hub.convert",
    "chexficient.curation.archive": "chexficient.inference.curate",
    "chexficient.images": "chexficient.data.images",
    "chexficient.labels": "chexficient.data.labels",
    "chexficient.machine": "chexficient.runtime.machine",
    "chexficient.manifests": "chexficient.data.manifests",
    "chexficient.pairs": "chexficient.data.pairs",
    "chexficient.phantom_archive": "chexficient.phantoms.archive",
    "chexficient.presets": "chexficient.runtime.presets",
    "chexficient.results": "chexficient.metrics.results",
    "chexficient.subset": "chexficient.data.subsets",
}
REMOVED_IN = "0.4"


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec) -> ModuleType:
        warnings.warn(
            f"`{self.old}` moved to `{self.new}`; the old import path goes away in chexficient {REMOVED_IN}.",
            DeprecationWarning,
            stacklevel=3,
        )
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the module ran at its new place); give it back the spec the import machinery replaced."""
        module.__spec__ = self.spec


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old import paths of `MOVED_MODULES`, and nothing else."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(fullname, MOVED_MODULES[fullname]))


def install() -> None:
    """Put the finder on `sys.meta_path` once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
