"""Look up models, criteria, optimizers and norms by name.

A name is searched first in the default places (e.g. `map2map.models`, then
`torch.nn`), then as `module.attr` in the user's `--callback-at` directory, as
the original toolkit does.  Default places come first, so a user module cannot
silently shadow a built-in name.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from map2map.errors import UserError


def _getattr_dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _load_callback_module(callback_at: str | Path, module: str) -> ModuleType:
    """Import `module` (dotted, relative to `callback_at`) from its file without touching sys.path."""
    root = Path(callback_at)
    if not root.is_dir():
        raise UserError(f"--callback-at {str(root)!r} is not a directory")
    rel = Path(*module.split("."))
    for path in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if path.is_file():
            key = f"map2map_callback.{root.resolve()}.{module}".replace("/", "_")
            if key in sys.modules:
                return sys.modules[key]
            spec = importlib.util.spec_from_file_location(key, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[key] = mod
            spec.loader.exec_module(mod)
            return mod
    raise UserError(f"no module {module!r} in --callback-at {str(root)!r} (looked for {rel}.py)")


def import_attr(name: str, defaults: Sequence[ModuleType | str], callback_at: str | Path | None = None,
                what: str = "name") -> Any:
    """Return the object called `name` from the first default module that has it, else from `callback_at`.

    `defaults` are modules or importable module names.  In `callback_at`, `name`
    must be `module.attr` (e.g. `foo.Bar` for `Bar` in `foo.py`).  An unknown
    name raises `UserError` naming every place that was searched.
    """
    looked = []
    for mod in defaults:
        if isinstance(mod, str):
            mod = importlib.import_module(mod)
        looked.append(mod.__name__)
        try:
            return _getattr_dotted(mod, name)
        except AttributeError:
            pass
    if callback_at is not None and "." in name:
        module, attr = name.rsplit(".", 1)
        looked.append(f"{module}.py in {callback_at}")
        mod = _load_callback_module(callback_at, module)
        try:
            return getattr(mod, attr)
        except AttributeError:
            pass
    elif callback_at is not None:
        looked.append(f"--callback-at {callback_at} (needs module.{name})")
    raise UserError(f"unknown {what} {name!r}: looked in {', '.join(looked)}")
