#!/usr/bin/env python
"""Convert .npy fields into a map2map Zarr store: the same program as `m2m convert`."""

import sys

from map2map.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
