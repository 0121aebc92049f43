"""Imports deferred to first use, so that `import mtnlp` and `mtnlp --help` stay light: the
PEP 562 exports of a package (as peft's `__init__` modules do: `mtnlp.train` imports the training
loop only when asked for), and a module imported as soon as another one is (`import_after`:
mtnlp's Auto registration follows transformers wherever it is imported)."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], eager: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`: each name of `exports` comes
    from its module (`{"train": "mtnlp.training"}`) the first time it is asked for; `eager` is
    the package's `globals()`."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def __dir__() -> list[str]:
        return sorted([*eager, *exports])

    return __getattr__, __dir__


def import_after(trigger: str, module: str) -> None:
    """Import `module` as soon as the top-level package `trigger` is imported: now if it already
    is, else right after `trigger`'s own code has run (a `sys.meta_path` finder, a post-import
    hook as wrapt's). Nothing is imported if `module` is already in `sys.modules`, even
    half-imported: its own code is then running (and it imported `trigger`)."""
    if sys.modules.get(trigger) is not None:
        importlib.import_module(module)
    elif not any(
        isinstance(finder, _ImportAfter) and (finder.trigger, finder.module) == (trigger, module)
        for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _ImportAfter(trigger, module))


class _ImportAfter:
    """The finder of `import_after`. It finds `trigger` through the finders after it, with a
    loader that, once `trigger`'s code has run, takes this finder off `sys.meta_path` and imports
    `module`. A spec that is only looked at (`importlib.util.find_spec`, as accelerate checks
    what is installed) leaves the hook in place. When it runs, every module of `trigger` is whole
    (nothing of it is half-imported), so `module` may import any of them."""

    def __init__(self, trigger: str, module: str) -> None:
        self.trigger = trigger
        self.module = module

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if name != self.trigger:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = None if finder is self or find_spec is None else find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenImport(spec.loader, self)
                return spec
        return None


class _ThenImport:
    """A module's own loader, then the `import_after` of `hook`; the module keeps its own
    loader."""

    def __init__(self, loader: Any, hook: _ImportAfter) -> None:
        self.loader = loader
        self.hook = hook

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        for loaded in (module, sys.modules.get(module.__name__)):  # a package may replace itself
            if getattr(loaded, "__loader__", None) is self:
                loaded.__loader__ = self.loader
        if module.__spec__ is not None and module.__spec__.loader is self:
            module.__spec__.loader = self.loader
        with contextlib.suppress(ValueError):  # another thread's import took it off
            sys.meta_path.remove(self.hook)
        if self.hook.module not in sys.modules:
            importlib.import_module(self.hook.module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, get_source, ...
        if name == "loader":  # not set yet (a copy): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)
