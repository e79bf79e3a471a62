"""The client side: the prediction store, created, resumed or swapped in under --overwrite.

An output in object storage (a URL, `map2map.storage`) is created at its URL
and resumed there as a local one is; it is never replaced (there is no
rename to swap a new store in), so ``--overwrite`` of a complete one is
refused (`map2map.store.staged_path`) and the user writes to a new URL.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Sequence

import numpy as np

from map2map import storage, store
from map2map.errors import UserError
from map2map.infer.inputs import Inputs
from map2map.infer.markers import read_done
from map2map.infer.specs import DONE_DIR
from map2map.infer.styles import Styling
from map2map.storage import StorageOptions


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def check_reachable(url: str, storage_options: StorageOptions | None) -> None:
    """Refuse, with one line, a store URL whose bucket does not exist or whose service refuses the
    credentials or cannot be reached (`map2map.storage.user_error`): one listing of its prefix, before
    any work.  A prefix with nothing under it yet is fine (an output to create)."""
    fs, path = storage.filesystem(url, storage_options)
    try:
        fs.ls(path, detail=False, refresh=True)
    except FileNotFoundError as exc:  # no object under the prefix yet (fine), or no bucket (not)
        err = storage.user_error(exc, url)
        if isinstance(err, UserError):
            raise err from None
    except Exception as exc:  # fsspec backends raise their own types; translated, or re-raised unchanged
        err = storage.user_error(exc, url)
        if isinstance(err, UserError):
            raise err from None
        raise


def check_output(out: str, digest: str, overwrite: bool, notes: list[str],
                 storage_options: StorageOptions | None = None) -> tuple[str, str | None]:
    """Where to write, and the run token to resume there (None: create a new store there).

    A complete OUTPUT is refused unless `overwrite`, which builds the new
    store beside it (``OUTPUT.m2m-partial``) and swaps it in at the end.  An
    incomplete store written with the same settings is resumed; any other
    incomplete map2map store is started over.  Nothing is written here.
    An output URL follows `_check_remote`.
    """
    if storage.is_remote(out):
        return _check_remote(out, digest, overwrite, notes, storage_options)
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


def _check_remote(out: str, digest: str, overwrite: bool, notes: list[str],
                  storage_options: StorageOptions | None) -> tuple[str, str | None]:
    """`check_output` for an output URL: a complete store there is refused (with `overwrite` by
    `map2map.store.staged_path`, which says why and what to do); an incomplete one with the same settings
    is resumed, one with other settings started over; objects that are no map2map store are refused."""
    if not storage.exists(out, storage_options):
        return out, None
    meta = store.read_meta(out, storage_options)
    if meta is None:
        raise UserError(f"{out} holds objects that are not a map2map store; choose another --out")
    if meta.get("complete"):
        if overwrite:
            store.staged_path(out)  # refuses: object storage cannot swap a new store in
        raise UserError(f"{out} exists and is complete; give another --out (a complete store in object "
                        "storage is never replaced)")
    info = meta.get("infer") or {}
    if info.get("settings_hash") == digest:
        ndone = len(read_done(storage.join(out, DONE_DIR), storage_options))
        notes.append(f"resuming the interrupted run in {out}: {ndone} tiles already done")
        return out, info["run_token"]
    notes.append(f"{out} is an incomplete store from a run with other settings: starting over")
    return out, None


def create_output(target: str, layouts: Sequence[store.FieldLayout], inp: Inputs, settings: dict[str, Any],
                  digest: str, styling: Styling | None = None, storage_options: StorageOptions | None = None) -> str:
    """Create the (incomplete) output store at `target` with the fields `layouts` (the prediction first),
    replacing what `check_output` allowed; returns the new run token.  A styled run's store holds the
    styles the model was given (`map2map.store.write_styles`).  In object storage the marker directory
    is a prefix, which exists once a marker does."""
    remote = storage.is_remote(target)
    if remote:
        if storage.exists(target, storage_options):
            store.remove(target, storage_options)
    elif os.path.exists(target):
        shutil.rmtree(target)
    token = uuid.uuid4().hex
    meta_settings = dict(settings)
    meta_settings["infer"] = dict(settings["infer"], settings_hash=digest, run_token=token)
    group = store.create(target, list(layouts), nsample=inp.nsample, boxsize=inp.boxsize, settings=meta_settings,
                         style_names=styling.names if styling is not None else (), storage_options=storage_options)
    for layout in layouts:
        group[store.source_name(layout.name)][:] = np.array(inp.sources)
    if styling is not None:
        store.write_styles(target, np.asarray(styling.values, dtype=np.float32), 0, storage_options)
    if not remote:
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
