#!/usr/bin/env bash
# Create .venv (once) and install map2map with its test extras into it.
#
# With no variable set: `python3 -m venv .venv`, then `pip install $DEFAULT_TORCH` (below)
# unless torch is already importable there, then `pip install -e .[test]`. From PyPI, on
# Linux x86_64, that torch is PyTorch's default CUDA build: it brings its own CUDA
# libraries and NCCL, needs an NVIDIA driver recent enough for that CUDA, and also runs
# without a GPU; elsewhere it is PyPI's default build for the platform.
# Optional environment variables:
#   PYTHON=python3       the interpreter .venv is made from.
#   TORCH_SPEC="WORDS"   pip arguments that install PyTorch instead of $DEFAULT_TORCH,
#                        split on whitespace into separate words (not evaluated by the
#                        shell), e.g. a build from PyTorch's own index for an older driver:
#                        TORCH_SPEC="--index-url https://download.pytorch.org/whl/cu124 torch==2.5.1"
#                        Like the default, used only when .venv cannot import torch yet:
#                        to change the build of an existing .venv, remove .venv first.
#   M2M_SYSTEM_TORCH=1   use the site's own PyTorch (built for the site's CUDA driver and
#                        NCCL, e.g. after `module load pytorch`): .venv is made with
#                        --system-site-packages from PYTHON (the site's python) and no torch
#                        is installed; the script stops if PYTHON or .venv cannot import
#                        torch, or if installing map2map put another torch into .venv.
#   M2M_SETUP_DRY_RUN=1  print the commands that a fresh clone (no .venv yet) would run,
#                        one per line, and run nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEFAULT_TORCH=torch==2.13.0
ME=scripts/setup.sh

die() {
  echo "$ME: $*" >&2
  exit 1
}

# `switch NAME`: true for 1, false for unset, empty or 0; anything else stops the script.
switch() {
  case "${!1:-}" in
    1) return 0 ;;
    "" | 0) return 1 ;;
    *) die "$1=${!1} is not understood; set $1=1 or unset it" ;;
  esac
}

DRY=0 SYSTEM=0
if switch M2M_SETUP_DRY_RUN; then DRY=1; fi
if switch M2M_SYSTEM_TORCH; then SYSTEM=1; fi
if [ "$SYSTEM" = 1 ] && [ -n "${TORCH_SPEC:-}" ]; then
  die "M2M_SYSTEM_TORCH=1 uses the site's torch, TORCH_SPEC installs one: unset one of them"
fi
TORCH_WORDS=()
read -ra TORCH_WORDS -d '' <<<"${TORCH_SPEC:-$DEFAULT_TORCH}" || true
[ "${#TORCH_WORDS[@]}" -gt 0 ] || die "TORCH_SPEC holds only spaces; give pip's words for PyTorch or unset it"

# `quote WORD`: WORD as a shell would need it written (for the dry run's lines).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=+,@%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# `run CMD...`: run CMD, or in a dry run print it as one line.
run() {
  if [ "$DRY" = 1 ]; then
    local out="" word
    for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
    echo "$out"
  else
    "$@"
  fi
}

VENV_FLAGS=()
if [ "$SYSTEM" = 1 ]; then VENV_FLAGS=(--system-site-packages); fi
created=0
if [ "$DRY" = 1 ] || [ ! -x .venv/bin/python ]; then
  if [ "$SYSTEM" = 1 ]; then  # before making a venv that could not work
    if [ "$DRY" = 1 ]; then
      run "$PYTHON" -c "import torch"
    elif ! err=$("$PYTHON" -c "import torch" 2>&1); then
      die "M2M_SYSTEM_TORCH=1 but $PYTHON cannot import torch (${err##*$'\n'}): load the site's PyTorch first" \
          "(e.g. module load pytorch, with PYTHON set to its python), or unset M2M_SYSTEM_TORCH to install torch into .venv"
    fi
  fi
  run "$PYTHON" -m venv ${VENV_FLAGS[@]+"${VENV_FLAGS[@]}"} .venv  # (bash 3.2: no empty "${a[@]}")
  created=1
elif [ "$SYSTEM" = 1 ] && ! grep -qsx 'include-system-site-packages *= *true' .venv/pyvenv.cfg; then
  die ".venv exists without the site's packages; remove it (rm -rf .venv) and rerun with M2M_SYSTEM_TORCH=1"
fi
if [ "$DRY" = 1 ]; then
  echo ". .venv/bin/activate"
else
  . .venv/bin/activate
fi

if [ "$SYSTEM" = 1 ]; then  # the venv's own view: $PYTHON may be a virtual environment whose packages it lacks
  if [ "$DRY" = 1 ]; then
    run python -c "import torch"
  elif ! err=$(python -c "import torch" 2>&1); then
    [ "$created" = 1 ] && rm -rf .venv  # the next try must start afresh
    die "M2M_SYSTEM_TORCH=1 but .venv cannot import torch (${err##*$'\n'}) from $PYTHON's site packages:" \
        "set PYTHON to the python that has the site's PyTorch (not a virtual environment), or unset M2M_SYSTEM_TORCH"
  fi
fi

if [ "$DRY" = 1 ]; then
  run python -m pip install -q --upgrade pip
else
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
fi
if [ "$SYSTEM" = 0 ] && { [ "$DRY" = 1 ] || ! python -c "import torch" >/dev/null 2>&1; }; then
  run python -m pip install -q "${TORCH_WORDS[@]}"
fi
run python -m pip install -q -e ".[test]"

if [ "$SYSTEM" = 1 ] && [ "$DRY" = 0 ]; then
  # "venv VERSION PATH" if torch now comes from .venv itself (sys.prefix), else "site VERSION PATH"
  where=$(python -c "import os, sys, torch; f = os.path.realpath(torch.__file__)
print('venv' if f.startswith(os.path.realpath(sys.prefix) + os.sep) else 'site', torch.__version__, f)")
  read -r whose version path <<<"$where"
  if [ "$whose" = venv ]; then
    die "installing map2map put torch $version into .venv in front of the site's (map2map needs" \
        "$(grep -o '"torch[^"]*"' pyproject.toml | tr -d '"')): load a newer site PyTorch, remove .venv and rerun," \
        "or unset M2M_SYSTEM_TORCH"
  fi
  echo "using the site's torch $version ($path)"
fi
