"""Host memory of each training process at start: does every rank hold its own copy of the LLM?

Writes a LLaMA checkpoint of about 0.8 GB (width 2048, 8 layers, the demo tokenizer's vocabulary)
next to the demo's CLIP tower; then two processes at once load the towers with train.py's own
build_model, as two ranks do at start, touch every weight, and report their memory:

  private (USS): pages only this process holds; proportional (PSS): its own pages plus its share
  of the pages it maps together with the other rank (the memory-mapped checkpoint is held once
  by the page cache, however many ranks map it).

Loading maps the safetensors files (checkpoint.py) and assigns the mapped tensors as the
parameters; a cast happens only where the checkpoint's dtype differs from the training precision.
On a GPU the tensors are moved first and cast there (train.build_model), so no rank converts the
13B model in host memory. On the CPU the parameters live in host memory, so a cast is a copy:

    python tests/bench_memory.py
"""

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from checkpoint import save_weights  # noqa: E402
from conftest import ENV  # noqa: E402
from data import SAMPLES, Tokenizer  # noqa: E402
from llama import Llama, LlamaArgs  # noqa: E402
from model import write_config  # noqa: E402
from vit import VisionArgs, VisionTransformer  # noqa: E402


def write_towers(folder, dtype):
    args = dataclasses.replace(LlamaArgs(dim=2048, n_layers=8, n_heads=16, n_kv_heads=16, intermediate_size=5504),
                               vocab_size=Tokenizer(SAMPLES / "tokenizer.model").vocab_size)
    llm = Llama(args).to(dtype)
    save_weights({(k if k.startswith("lm_head") else f"model.{k}"): v for k, v in llm.state_dict().items()},
                 folder / "llm")
    write_config(folder / "llm", args.to_hf_config(), SAMPLES / "tokenizer.model")
    vit = VisionTransformer(VisionArgs.preset("demo"))
    save_weights({f"vision_model.{k}": v for k, v in vit.state_dict().items()}, folder / "vision")
    write_config(folder / "vision", vit.args.to_hf_config())
    return sum(t.numel() * t.element_size() for t in llm.state_dict().values())


LOAD = """
import sys, time, psutil, torch
sys.path.insert(0, {root!r})
import train
args = train.parse_args(["--stage", "1", "--vision", {vision!r}, "--llm", {llm!r}, "--data", "-", "--image-root", "-",
                         "--output", "-"])
model, _ = train.build_model(args, {dtype})
total = sum(float(p.detach().float().sum()) for p in model.parameters())  # touch every weight, as training will
time.sleep(2)  # both ranks hold their model now
m = psutil.Process().memory_full_info()
print(m.uss, m.pss, m.rss)
"""


def run(folder, dtype):
    """Two processes load the towers at once, as two ranks do: (private, proportional) bytes each."""
    code = LOAD.format(root=str(ROOT), vision=str(folder / "vision"), llm=str(folder / "llm"), dtype=dtype)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=dict(ENV, OMP_NUM_THREADS="1")) for _ in range(2)]
    return [tuple(int(x) for x in p.communicate()[0].split()) for p in procs]


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{'checkpoint':>10} {'loaded as':>10} {'size':>10} {'private (USS)':>15} {'proportional (PSS)':>20}")
        for stored, dtype in ((torch.float32, "torch.float32"), (torch.bfloat16, "torch.bfloat16"),
                              (torch.float16, "torch.bfloat16")):
            size = write_towers(tmp / str(stored), stored)
            for uss, pss, _ in run(tmp / str(stored), dtype):
                print(f"{str(stored).split('.')[1]:>10} {dtype.split('.')[1]:>10} {size / 2**30:6.2f} GiB "
                      f"{uss / 2**30:8.2f} GiB ({uss / size:.2f}x) {pss / 2**30:10.2f} GiB ({pss / size:.2f}x)")


if __name__ == "__main__":
    main()
