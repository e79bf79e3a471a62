"""What every stage has in common: a frozen config in, a JSON-serialisable summary out.

A *stage* is a module with ``run(config) -> summary``: `convert`, `train`,
`infer` (and `m2m test`), `synth` and `demo`.  Its config is a frozen
dataclass whose field names are the command line's option names (``--crop``
is ``crop``, ``--in`` is ``in_fields``), so the CLI builds every config the
same way (`map2map.cli.configs.config_from_args`); library code, `demo`,
`bench/` and the tests build configs directly.  Its summary is a dataclass
derived from `Summary`: what the stage reports (losses, items/s, tiles,
bytes, output paths, timings), printed by the CLI with `Summary.lines` and
written as JSON with `Summary.to_json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import PurePath
from typing import Any


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types: dataclasses and mappings become dicts, sequences lists, paths
    strings, non-finite floats None (JSON has no NaN)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return jsonable(value.item())
    return str(value)


@dataclasses.dataclass
class Summary:
    """Base of every stage's summary."""

    def to_json(self) -> dict[str, Any]:
        return jsonable(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json())

    def lines(self) -> list[str]:
        """What the command line prints at the end of the stage (none by default)."""
        return []
