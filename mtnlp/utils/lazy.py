"""Names a package loads on first use (PEP 562), as peft's `__init__` modules do: `import mtnlp`
stays light, and `mtnlp.train` imports the training loop only when asked for."""

from __future__ import annotations

import importlib
from collections.abc import Callable
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
