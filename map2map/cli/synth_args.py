"""Arguments of `m2m synth`; the work happens in `map2map.synth` (destinations are `SynthConfig` fields)."""

from __future__ import annotations

import argparse


def _floats(text: str) -> tuple[float, ...]:
    """Comma-separated numbers, e.g. ``0,0.5,1``."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate example fields: Zel'dovich (1LPT) and 2LPT displacements",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Write Gaussian-random-field initial conditions evolved to 1LPT (input) and "
                                   "2LPT (target) displacements as channel-first .npy files, one directory "
                                   "per sample, deterministically from the seed.")
    p.add_argument("outdir", help="directory to write the samples into (new or empty, unless --overwrite)")
    p.add_argument("--num-samples", type=int, default=1, help="number of boxes (at least 1)")
    p.add_argument("--ngrid", type=int, default=32, help="grid cells per side (at least 2)")
    p.add_argument("--boxsize", type=float, default=128.0, help="box side in Mpc/h (finite, positive)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0 or more); sample i uses (seed, i)")
    p.add_argument("--redshift", type=float, default=0.0, help="redshift of the fields (finite, > -1)")
    p.add_argument("--density", action="store_true", help="also write CIC-painted overdensities")
    p.add_argument("--velocity", action="store_true",
                   help="also write peculiar velocities vel_za and vel_2lpt [km/s] (a H f psi1 and "
                        "a H f (psi1 + 2 psi2))")
    p.add_argument("--redshifts", type=_floats, default=None, metavar="Z,Z,...",
                   help="write every realisation at each of these redshifts (instead of --redshift), and the style "
                        "table styles.csv (Om, D per sample directory) for m2m convert --styles")
    p.add_argument("--omega-m", type=_floats, default=None, metavar="OM,OM,...",
                   help="write every realisation at each of these Omega_m (sigma8 and the rest fixed), and the "
                        "style table; combines with --redshifts (every pair)")
    p.add_argument("--sr", type=int, default=None, metavar="F",
                   help="super-resolution pairs instead: from one linear field per sample, 2LPT displacements "
                        "dis_lr at NGRID^3 and dis_hr at (NGRID*F)^3 (dens_lr, dens_hr with --density); the fine "
                        "field has exactly the coarse one's Fourier modes below its Nyquist frequency")
    p.add_argument("--prefix", default="", help="prefix of the sample directory names (and of synth.json); no '/'")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty OUTDIR: first remove what an earlier m2m synth with this --prefix "
                        "wrote there (as its synth.json lists), never other files")
    p.set_defaults(stage=("map2map.synth", "SynthConfig"))
