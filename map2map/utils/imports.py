"""Look up models, criteria, optimizers and norms by name.

A name is searched first in the default places (e.g. `map2map.models`, then
`torch.nn`), then as `module.attr` in the user's `--callback-at` directory, as
the original toolkit does.  Default places come first, so a user module cannot
silently shadow a built-in name.

A user module that cannot be imported (a syntax error, a failed import inside
it) is a `UserCodeError` naming its file and line; a user object that cannot
be called the way map2map will call it is one too, naming where it is
defined (`check_call`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from map2map.errors import UserCodeError, UserError, is_user_file, user_code_error


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
            try:
                spec.loader.exec_module(mod)
            except BaseException as exc:
                sys.modules.pop(key, None)  # half-run: the next lookup imports it afresh, not this
                if isinstance(exc, SyntaxError):  # the user's module, wherever it lies
                    raise UserCodeError(exc.filename or str(path), exc.lineno, type(exc).__name__,
                                        exc.msg or str(exc)) from exc
                if isinstance(exc, ImportError):
                    raise user_code_error(exc) or UserCodeError(str(path), None, type(exc).__name__,
                                                                str(exc)) from exc
                raise
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


def check_call(obj: Any, name: str, what: str, *args: Any, **kwargs: Any) -> None:
    """Refuse `obj` (the `what` called `name`) if its signature cannot take ``obj(*args, **kwargs)``.

    Nothing is called: only the signature is matched, so a user's norm or
    callback with the wrong parameters fails here, before any work, as a
    `UserCodeError` naming the file and line where it is defined (a
    `UserError` for objects outside user files).  Objects without a
    signature to read (e.g. builtins) pass.
    """
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        call = ", ".join(["x"] * len(args) + [f"{k}=..." for k in kwargs])
        detail = f"{what} {name}{sig} cannot be called as {name}({call}): {exc}"
        target = inspect.unwrap(obj)
        code = getattr(getattr(target, "__init__", None) if inspect.isclass(target) else target, "__code__", None)
        if code is not None and is_user_file(code.co_filename):
            raise UserCodeError(code.co_filename, code.co_firstlineno, "TypeError", detail) from None
        raise UserError(detail) from None
