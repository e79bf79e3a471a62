#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the example pipeline end to end in ${1:-demo/}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
dir=${1:-demo}
m2m synth "$dir/sims" --num-samples 2 --ngrid 64 --boxsize 256 --seed 1
m2m convert "$dir/train.zarr" --overwrite --field "za=$dir/sims/*/dis_za.npy" \
    --field "lpt2=$dir/sims/*/dis_2lpt.npy" --crop 32 --pad 12 --boxsize 256
m2m info "$dir/train.zarr"
