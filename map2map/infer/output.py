"""The client side: the prediction store, created, resumed or swapped in under --overwrite."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Sequence

import numpy as np

from map2map import store
from map2map.errors import UserError
from map2map.infer.inputs import Inputs
from map2map.infer.markers import read_done
from map2map.infer.specs import DONE_DIR
from map2map.infer.styles import Styling


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def check_output(out: str, digest: str, overwrite: bool, notes: list[str]) -> tuple[str, str | None]:
    """Where to write, and the run token to resume there (None: create a new store there).

    A complete OUTPUT is refused unless `overwrite`, which builds the new
    store beside it (``OUTPUT.m2m-partial``) and swaps it in at the end.  An
    incomplete store written with the same settings is resumed; any other
    incomplete map2map store is started over.  Nothing is written here.
    """
    target = out
    if os.path.exists(out):
        meta = store.read_meta(out)
        if meta is None:
            if not os.path.isdir(out) or any(os.scandir(out)):
                raise UserError(f"{out} exists and is not a map2map store; choose another --out")
        elif meta.get("complete"):
            if not overwrite:
                raise UserError(f"{out} exists and is complete; pass --overwrite to replace it")
            target = store.staged_path(out)
    if os.path.exists(target):
        meta = store.read_meta(target)
        info = (meta or {}).get("infer") or {}
        if meta is not None and not meta.get("complete") and info.get("settings_hash") == digest:
            ndone = len(read_done(os.path.join(target, DONE_DIR)))
            notes.append(f"resuming the interrupted run in {target}: {ndone} tiles already done")
            return target, info["run_token"]
        if meta is None and os.path.isdir(target) and any(os.scandir(target)):
            raise UserError(f"{target} exists and is not a map2map store; remove it or choose another --out")
        if meta is not None:
            notes.append(f"{target} is an incomplete store from a run with other settings: starting over")
    return target, None


def create_output(target: str, layouts: Sequence[store.FieldLayout], inp: Inputs, settings: dict[str, Any],
                  digest: str, styling: Styling | None = None) -> str:
    """Create the (incomplete) output store at `target` with the fields `layouts` (the prediction first),
    replacing what `check_output` allowed; returns the new run token.  A styled run's store holds the
    styles the model was given (`map2map.store.write_styles`)."""
    if os.path.exists(target):
        shutil.rmtree(target)
    token = uuid.uuid4().hex
    meta_settings = dict(settings)
    meta_settings["infer"] = dict(settings["infer"], settings_hash=digest, run_token=token)
    group = store.create(target, list(layouts), nsample=inp.nsample, boxsize=inp.boxsize, settings=meta_settings,
                         style_names=styling.names if styling is not None else ())
    for layout in layouts:
        group[store.source_name(layout.name)][:] = np.array(inp.sources)
    if styling is not None:
        store.write_styles(target, np.asarray(styling.values, dtype=np.float32), 0)
    os.makedirs(os.path.join(target, DONE_DIR))
    return token


def sample_losses(done: dict[tuple[int, int], dict[str, Any]], nsample: int) -> list[float | None]:
    sums = np.zeros(nsample)
    counts = np.zeros(nsample)
    for (sample, _), rec in done.items():
        if rec.get("loss") is not None:
            sums[sample] += rec["loss"] * rec["n"]
            counts[sample] += rec["n"]
    return [float(s / c) if c else None for s, c in zip(sums, counts)]
