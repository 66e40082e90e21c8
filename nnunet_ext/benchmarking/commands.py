"""Running nnU-Net's command-line tools in a subprocess: environment, console scripts, logged runs with progress."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from nnunet_ext.errors import UserError
from nnunet_ext.nnunet_paths import EXT_TRAINER_VAR, NNUNET_FOLDERS, ext_trainer_value

EPOCH_LINE = re.compile(r"\bEpoch \d+\s*$")
PREDICT_LINE = re.compile(r"^perform_everything_on_device:")  # printed once per case


def nnunet_command(name: str) -> str:
    """Path of an nnU-Net console script, preferring the one installed beside this Python."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise UserError(f"{name} not found: install nnunetv2 in this environment (pip install nnunetv2)")
    return found


def run_logged(title: str, command: list[str], env: dict, log: Path, progress: re.Pattern | None = None,
               total: int | None = None, leave: bool = True) -> None:
    """Run ``command``, its output going to ``log``; show a bar advanced by lines matching ``progress``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    unit = "step" if progress else "line"
    with open(log, "w") as out, tqdm(total=total, desc=title, unit=unit, leave=leave) as bar:
        out.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            out.write(line)
            if progress is None or progress.search(line):
                bar.update(1)
        if process.wait() != 0:
            out.flush()
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            print(tail, file=sys.stderr)
            raise UserError(f"{title} failed (exit {process.returncode}); full output in {log}")


def nnunet_environment(out: Path) -> dict:
    """This environment with nnU-Net's three folders under ``out`` and our trainers findable."""
    env = dict(os.environ)
    env.update({var: str(out / var) for var in NNUNET_FOLDERS})
    env[EXT_TRAINER_VAR] = ext_trainer_value(env.get(EXT_TRAINER_VAR))
    # nnU-Net starts 8 worker processes by default: on a small machine their start-up alone takes minutes.
    env.setdefault("nnUNet_def_n_proc", str(min(4, os.cpu_count() or 1)))
    return env


def training_environment(env: dict) -> dict:
    """Augmentation in the main process (planning must not see this: it sets torch threads from it)."""
    return {**env, "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", "0")}
