"""The shell scripts: syntax, `scripts/setup.sh`'s commands (dry run) and switches, and the SLURM examples.

`setup.sh` is run from a copy in a temporary directory, as in a fresh clone, with
`M2M_SETUP_DRY_RUN=1` (it prints its venv and pip commands and runs nothing) or on
paths that stop before making a venv.  The SLURM scripts are checked for what they pass
(one task per GPU, every `m2m` option exists in the parser), and both also run for real
here with a stand-in `srun` on PATH that starts its command once, as task 0 of 1, and a
stand-in `.venv/bin/activate` that puts this interpreter's environment on PATH: no SLURM
and no GPU here, so one process on the CPU (`--device cpu` appended) stands for the GPUs.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from map2map.cli import build_parser
from map2map.cli.configs import stage_of
from map2map.store import open_store
from stores import za_lpt_store

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
SLURM = SCRIPTS / "slurm"
SETUP_VARS = ("PYTHON", "TORCH_SPEC", "M2M_SYSTEM_TORCH", "M2M_SETUP_DRY_RUN", "VIRTUAL_ENV", "PYTHONPATH")
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def all_scripts() -> list[Path]:
    return sorted([*SCRIPTS.glob("*.sh"), *SLURM.glob("*.sbatch")])


@pytest.mark.parametrize("script", all_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_bash_syntax(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- scripts/setup.sh

def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETUP_VARS}
    return {**env, **extra}


def fresh_clone(tmp_path: Path) -> Path:
    """A directory holding scripts/setup.sh and pyproject.toml, as a clone has them, and no .venv."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPTS / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def setup(clone: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(clone / "scripts" / "setup.sh")], capture_output=True, text=True,
                          env=clean_env(**env), stdin=subprocess.DEVNULL, timeout=120)


def dry_run(clone: Path, **env: str) -> list[list[str]]:
    """The commands setup.sh prints in a dry run, each split into its words as the shell would."""
    before = sorted(p.name for p in clone.iterdir())
    done = setup(clone, M2M_SETUP_DRY_RUN="1", **env)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert sorted(p.name for p in clone.iterdir()) == before  # it ran nothing
    return [shlex.split(line) for line in done.stdout.splitlines()]


VENV = ["python3", "-m", "venv", ".venv"]
ACTIVATE = [".", ".venv/bin/activate"]
PIP = ["python", "-m", "pip", "install", "-q"]
PACKAGE = [*PIP, "-e", ".[test]"]


def test_dry_run_without_variables_prints_the_default_commands(tmp_path):
    assert dry_run(fresh_clone(tmp_path)) == [VENV, ACTIVATE, [*PIP, "--upgrade", "pip"], [*PIP, "torch==2.13.0"],
                                              PACKAGE]


def test_torch_spec_words_reach_pip_separately(tmp_path):
    spec = "--index-url https://download.pytorch.org/whl/cu124   torch==2.5.1\n"
    lines = dry_run(fresh_clone(tmp_path), TORCH_SPEC=spec)
    assert [*PIP, "--index-url", "https://download.pytorch.org/whl/cu124", "torch==2.5.1"] in lines
    assert lines[-1] == PACKAGE


def test_torch_spec_words_are_not_evaluated(tmp_path):
    lines = dry_run(fresh_clone(tmp_path), TORCH_SPEC="torch>=2.2 $(touch pwned) *")
    assert [*PIP, "torch>=2.2", "$(touch", "pwned)", "*"] in lines
    assert not (tmp_path / "pwned").exists()


def test_system_torch_makes_the_venv_on_site_packages_and_installs_no_torch(tmp_path):
    lines = dry_run(fresh_clone(tmp_path), M2M_SYSTEM_TORCH="1", PYTHON="/opt/site/bin/python3")
    assert lines[:4] == [["/opt/site/bin/python3", "-c", "import torch"],  # before making the venv
                         ["/opt/site/bin/python3", "-m", "venv", "--system-site-packages", ".venv"], ACTIVATE,
                         ["python", "-c", "import torch"]]  # and in it
    pip_lines = [line for line in lines if line[:4] == PIP[:4]]
    assert pip_lines == [[*PIP, "--upgrade", "pip"], PACKAGE]


@pytest.mark.parametrize("env, message", [
    ({"M2M_SYSTEM_TORCH": "yes"}, "M2M_SYSTEM_TORCH=yes is not understood; set M2M_SYSTEM_TORCH=1 or unset it"),
    ({"M2M_SETUP_DRY_RUN": "true"}, "M2M_SETUP_DRY_RUN=true is not understood; set M2M_SETUP_DRY_RUN=1 or unset it"),
    ({"M2M_SYSTEM_TORCH": "1", "TORCH_SPEC": "torch"}, "M2M_SYSTEM_TORCH=1 uses the site's torch, TORCH_SPEC installs "
                                                       "one: unset one of them"),
    ({"TORCH_SPEC": "  "}, "TORCH_SPEC holds only spaces; give pip's words for PyTorch or unset it"),
])
def test_bad_settings_stop_in_one_line_before_anything(tmp_path, env, message):
    clone = fresh_clone(tmp_path)
    done = setup(clone, **env)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"scripts/setup.sh: {message}\n")
    assert not (clone / ".venv").exists()


def test_system_torch_refuses_an_existing_venv_without_site_packages(tmp_path):
    clone = fresh_clone(tmp_path)
    venv = clone / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    (venv / "bin" / "python").chmod(0o755)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    done = setup(clone, M2M_SYSTEM_TORCH="1")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ("scripts/setup.sh: .venv exists without the site's packages; remove it (rm -rf .venv) "
                           "and rerun with M2M_SYSTEM_TORCH=1\n")
    assert sorted(p.name for p in venv.iterdir()) == ["bin", "pyvenv.cfg"]


def test_system_torch_without_a_site_torch_stops_before_making_a_venv(tmp_path):
    base = getattr(sys, "_base_executable", sys.executable)
    if subprocess.run([base, "-c", "import torch"], capture_output=True, env=clean_env()).returncode == 0:
        pytest.skip(f"the base interpreter {base} has torch: no interpreter without one to try")
    clone = fresh_clone(tmp_path)
    done = setup(clone, M2M_SYSTEM_TORCH="1", PYTHON=base)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (f"scripts/setup.sh: M2M_SYSTEM_TORCH=1 but {base} cannot import torch "
                           "(ModuleNotFoundError: No module named 'torch'): load the site's PyTorch first (e.g. "
                           "module load pytorch, with PYTHON set to its python), or unset M2M_SYSTEM_TORCH to "
                           "install torch into .venv\n")
    assert not (clone / ".venv").exists()


# ---------------------------------------------------------------- SLURM scripts: what they pass

def sbatch_options(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH (--[a-z-]+)=(\S+)$", text, re.M))


def logical_lines(text: str) -> list[str]:
    """Lines with comment marks taken off (examples in comments count) and continuations joined."""
    lines = [line[1:] if line.startswith("#") and not line.startswith(("#!", "#SBATCH")) else line
             for line in text.splitlines()]
    return re.sub(r"\\\n", " ", "\n".join(lines)).splitlines()


def options_in(text: str) -> list[str]:
    return re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)


def m2m_commands(text: str) -> list[tuple[str, list[str]]]:
    """(subcommand, its options) of every `m2m SUB ...`, `-m map2map.cli SUB ...` or `sbatch .../SUB.sbatch ...`
    (options appended to m2m SUB) in the script; a `"${NAME[@]}"` there brings the options of the array
    `NAME=( ... )`."""
    arrays = {name: options_in(body) for name, body in re.findall(r"^(\w+)=\(\n(.*?)^\)", text, re.M | re.S)}
    found = []
    for line in logical_lines(text):
        for m in re.finditer(r"(?:(?:\bm2m|-m map2map\.cli) ([a-z]+)\b|/([a-z]+)\.sbatch\b)(.*)", line):
            sub, rest = m.group(1) or m.group(2), m.group(3)
            opts = options_in(re.sub(r'"\$\{\w+\[@\]\}"', " ", rest))
            for name in re.findall(r'"\$\{(\w+)\[@\]\}"', rest):
                opts += arrays[name]
            found.append((sub, opts))
    return found


def parser_options() -> dict[str, set[str]]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return {name: set(p._option_string_actions) for name, p in sub.choices.items()}


@pytest.mark.parametrize("name, sub, must", [("train.sbatch", "train", {"--train-data", "--run-dir"}),
                                             ("infer.sbatch", "infer", {"--scheduler-file", "--load-state"})])
def test_every_m2m_option_in_the_slurm_scripts_exists(name, sub, must):
    commands = m2m_commands((SLURM / name).read_text())
    known = parser_options()
    assert must <= {o for s, opts in commands if s == sub for o in opts}
    unknown = [(s, o) for s, opts in commands for o in opts if o not in known.get(s, ())]
    assert unknown == []


def test_train_sbatch_runs_one_task_per_gpu_that_fail_together():
    text = (SLURM / "train.sbatch").read_text()
    opts = sbatch_options(text)
    assert opts["--ntasks-per-node"] == opts["--gpus-per-node"]
    runs = [line for line in logical_lines(text) if re.match(r"\s*srun\b.*\bm2m train\b", line)]
    assert len(runs) == 1 and "--kill-on-bad-exit=1" in runs[0].split()
    rdzv = [line for line in logical_lines(text) if "torchrun" in line and "map2map.cli train" in line]
    assert len(rdzv) == 1 and all(w in rdzv[0] for w in ("--kill-on-bad-exit=1", "--rdzv-backend c10d",
                                                          "--rdzv-endpoint", "--rdzv-id", "--nnodes"))


def test_infer_sbatch_starts_a_scheduler_and_one_single_gpu_worker_per_task():
    text = (SLURM / "infer.sbatch").read_text()
    opts = sbatch_options(text)
    assert opts["--ntasks-per-node"] == opts["--gpus-per-node"]
    lines = logical_lines(text)
    (sched,) = [line.split() for line in lines if re.match(r"\s*srun\b.*\bdask scheduler\b", line)]
    (worker,) = [line.split() for line in lines if re.match(r"\s*srun\b.*\bdask worker\b", line)]
    assert "--ntasks=1" in sched and "--scheduler-file" in sched
    assert "--gpus-per-task=1" in worker and "--scheduler-file" in worker
    assert " ".join(worker).count("--nworkers 1 --nthreads 1 --resources GPU=1") == 1


# ---------------------------------------------------------------- SLURM scripts: run here

SRUN = '''#!{python}
"""srun for the tests: record the call, then run the command once as task 0 of 1 on this machine."""
import json, os, sys
args = sys.argv[1:]
with open(os.environ["SRUN_LOG"], "a") as f:
    f.write(json.dumps({{"pid": os.getpid(), "args": args}}) + "\\n")
while args and args[0].startswith("-"):
    args.pop(0)
os.environ.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_STEP_NUM_TASKS="1",
                  SLURM_STEP_TASKS_PER_NODE="1", SLURM_STEP_NODELIST="localhost")
os.execvp(args[0], args)
'''

TINY = '''
from torch import nn


class Tiny(nn.Module):
    def __init__(self, in_chan, out_chan, **kwargs):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(in_chan, 4, 3), nn.LeakyReLU(0.2), nn.Conv3d(4, out_chan, 3))

    def forward(self, x):
        return self.net(x)
'''


@pytest.fixture(scope="module")
def slurm_site(tmp_path_factory) -> dict[str, Path]:
    """Stand-ins for srun and the venv, tiny stores and a tiny model, under one temporary directory."""
    root = tmp_path_factory.mktemp("slurm")
    (root / "bin").mkdir()
    (root / "bin" / "srun").write_text(SRUN.format(python=sys.executable))
    (root / "bin" / "srun").chmod(0o755)
    (root / "home" / ".venv" / "bin").mkdir(parents=True)
    (root / "home" / ".venv" / "bin" / "activate").write_text(
        f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH\n")
    (root / "cb").mkdir()
    (root / "cb" / "nets.py").write_text(TINY)
    return {"root": root, "train": za_lpt_store(root, "train", 2, 1), "val": za_lpt_store(root, "val", 1, 2)}


def sbatch(slurm_site, name: str, log: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run a SLURM script's body as sbatch would on one node with one task (srun is the stand-in)."""
    root = slurm_site["root"]
    slurm = dict(SLURM_SUBMIT_DIR=str(root / "home"), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1",
                 SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_CPUS_PER_TASK="1",
                 SLURM_JOB_NODELIST="localhost", SRUN_LOG=str(log), PATH=f"{root / 'bin'}:{os.environ['PATH']}")
    env = {k: v for k, v in clean_env(**slurm, **env).items()
           if k in slurm or k in env or not (k.startswith("SLURM_") or k in LAUNCHER_VARS)}
    proc = subprocess.Popen(["bash", str(SLURM / name), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, cwd=root, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # end what the script started too, or their pipes keep us waiting
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def srun_calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


TINY_TRAIN = ("--in", "za", "--tgt", "lpt", "--crop", "8", "--in-pad", "2", "--model", "nets.Tiny", "--lr", "1e-2",
              "--batch-size", "2", "--loader-workers", "0", "--device", "cpu")


@pytest.mark.usefixtures("torch_one_thread")
def test_train_sbatch_runs_m2m_train_under_srun_and_resumes_the_run(slurm_site, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "srun.log"
    args = [*TINY_TRAIN, "--train-data", str(slurm_site["train"]), "--val-data", str(slurm_site["val"]),
            "--callback-at", str(slurm_site["root"] / "cb")]
    module, config = stage_of(build_parser().parse_args(["train", *args, "--epochs", "1", "--run-dir", str(run_dir)]))
    module.run(config)  # an earlier job's first epoch
    state_1 = (run_dir / "state_1.pt").read_bytes()

    done = sbatch(slurm_site, "train.sbatch", log, *TINY_TRAIN, "--callback-at", str(slurm_site["root"] / "cb"),
                  "--epochs", "2", TRAIN_DATA=str(slurm_site["train"]), VAL_DATA=str(slurm_site["val"]),
                  RUN_DIR=str(run_dir))
    assert done.returncode == 0, done.stderr
    assert (run_dir / "state_1.pt").read_bytes() == state_1  # continued from it, not trained afresh
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and [e["epoch"] for e in ckpt["losses"]] == [1, 2]
    (call,) = [c["args"] for c in srun_calls(log)]
    srun_opts = list(itertools.takewhile(lambda word: word.startswith("-"), call))
    assert "--kill-on-bad-exit=1" in srun_opts and call[len(srun_opts):][:2] == ["m2m", "train"]


@pytest.mark.usefixtures("torch_one_thread")
def test_infer_sbatch_predicts_through_its_scheduler_and_worker_and_cleans_up(slurm_site, tmp_path):
    run_dir, out, log = tmp_path / "run", tmp_path / "out" / "pred.zarr", tmp_path / "srun.log"
    cb = str(slurm_site["root"] / "cb")
    module, config = stage_of(build_parser().parse_args(
        ["train", *TINY_TRAIN, "--train-data", str(slurm_site["train"]), "--callback-at", cb, "--epochs", "1",
         "--run-dir", str(run_dir)]))
    module.run(config)

    done = sbatch(slurm_site, "infer.sbatch", log, "--device", "cpu", CHECKPOINT=str(run_dir / "checkpoint.pt"),
                  DATA=str(slurm_site["val"]), OUT=str(out), WAIT_S="120", TMPDIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    pred = open_store(out)  # complete, or it refuses
    assert pred.field("lpt").shape == open_store(slurm_site["val"]).field("lpt").shape
    assert list((tmp_path / "out").glob("dask-scheduler-*")) == []  # removed on exit
    calls = {c["args"][c["args"].index("dask") + 1]: c for c in srun_calls(log)}  # started at the same time
    sched, worker = calls.pop("scheduler"), calls.pop("worker")
    assert calls == {} and "--ntasks=1" in sched["args"] and "--gpus-per-task=1" in worker["args"]
    for call in (sched, worker):  # the exit trap ended both background steps (srun's pid became dask's)
        with pytest.raises(ProcessLookupError):
            os.kill(call["pid"], 0)
