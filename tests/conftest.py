"""Shared by the tests that launch train.py as users do, under torchrun."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# DeepSpeed builds a small communication extension on its first start (~45 s) and caches it
# here, inside the checkout (ignored by git), so every launch after the first is quick.
ENV = dict(os.environ, TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
           PYTHONUNBUFFERED="1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, nproc=2, check=True, timeout=240):
    """`torchrun --standalone --nproc_per_node N train.py ARGS` (nproc=None: plain `python train.py`)."""
    cmd = [sys.executable, "train.py", *map(str, args)]
    if nproc:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = dict(ENV, MASTER_PORT=str(free_port()))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


