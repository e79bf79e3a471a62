"""Small example stores for the tests: synthesized 1LPT (``za``) and 2LPT (``lpt``) displacements, converted.

Every test module that needs a training or inference store builds it here,
through the stages' own configs (`map2map.synth.run`, `map2map.convert.run`).
"""

from __future__ import annotations

from pathlib import Path

from map2map import convert, store, synth


def drop_completion_mark(path) -> None:
    """Make a store look as if its writer had died before the completion mark."""
    import zarr

    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    group.attrs[store.ATTR] = dict(group.attrs[store.ATTR], complete=False)
    zarr.consolidate_metadata(str(path))


def za_lpt_store(root: Path, name: str, nsamples: int, seed: int, *, ngrid: int = 16, crop: int | None = 8,
                 pad: int | None = 2, boxsize: float | None = 128.0) -> Path:
    """``root/name.zarr`` with fields ``za`` and ``lpt`` of `nsamples` boxes of `ngrid`^3 (from ``root/name_npy``)."""
    npy = root / f"{name}_npy"
    synth.run(synth.SynthConfig(outdir=str(npy), num_samples=nsamples, ngrid=ngrid, seed=seed,
                                boxsize=128.0 if boxsize is None else boxsize))
    out = root / f"{name}.zarr"
    convert.run(convert.ConvertConfig(output=str(out), field=(f"za={npy}/*/dis_za.npy", f"lpt={npy}/*/dis_2lpt.npy"),
                                      crop=None if crop is None else (crop,), pad=pad, boxsize=boxsize,
                                      progress=False))
    return out


def random_pair_store(root: Path, name: str, seed: int, *, n: int = 16, crop: int = 8):
    """(input, target, store path): one sample of two random 3-channel fields of `n`^3, ``disp`` and ``tgt``,
    converted into ``root/name.zarr`` with `crop`^3 crops."""
    import numpy as np

    from test_infer import make_store

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 3, n, n, n)).astype(np.float32)
    y = rng.standard_normal((1, 3, n, n, n)).astype(np.float32)
    return x, y, make_store(root, name, {"disp": x, "tgt": y}, crop=crop)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and directory under `root` (relative path -> sha256 of the content, or "dir"): equal
    digests before and after a refused command mean it changed nothing there, not even created a file."""
    import hashlib

    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out
