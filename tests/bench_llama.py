"""Benchmarks for llama.py and the checkpoint loader (a script: `python tests/bench_llama.py`).

1. Forward + backward of our Llama against transformers' LlamaForCausalLM (sdpa attention), same
   weights and input, in one run on the CPU: dim 512, 8 layers, seq 512, batch 4, fp32.
   Timings alternate between the two models and the median is taken, so machine noise hits both.
2. Peak resident memory while loading a >= 1 GB safetensors checkpoint, divided by its size.
   Measured in a fresh process each, after loading and again after touching every weight.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama import Llama, LlamaArgs  # noqa: E402


def fwd_bwd_seconds(step, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def bench_train_step(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.dim, num_hidden_layers=args.layers, num_attention_heads=args.dim // 64,
                         num_key_value_heads=args.dim // 64, intermediate_size=int(args.dim * 8 / 3 // 32 * 32),
                         vocab_size=32000, max_position_embeddings=args.seq, rms_norm_eps=1e-5,
                         attn_implementation="sdpa")
    hf = LlamaForCausalLM(config).train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Llama.from_pretrained(d).train().requires_grad_(True)
    ids = torch.randint(0, 32000, (args.batch, args.seq))
    targets = torch.randint(0, 32000, (args.batch * args.seq,))

    def loss(logits):  # the language-model loss training uses, over every position
        return F.cross_entropy(logits.flatten(0, 1).float(), targets)

    def step_ours(model=ours):
        loss(model(ids)).backward()

    def step_hf():
        loss(hf(ids).logits).backward()

    # Our weights stay in the checkpoint's file mapping (4 KiB pages); a copy in ordinary memory
    # shows what that costs on a CPU (on a GPU the weights are copied to the device anyway).
    copied = Llama(ours.args).train()
    copied.load_state_dict(ours.state_dict())
    contenders = {"ours (eager)": step_ours, "ours, weights copied": lambda: step_ours(copied),
                  "transformers (sdpa)": step_hf}
    if args.compile:
        compiled = torch.compile(ours)
        contenders["ours (torch.compile)"] = lambda: step_ours(compiled)
    for step in contenders.values():  # warm-up (and compilation)
        step()
    results = {name: [] for name in contenders}
    for _ in range(args.reps):  # alternate so that noise hits every contender alike
        for name, step in contenders.items():
            results[name] += fwd_bwd_seconds(step, 1)
    tokens = args.batch * args.seq
    print(f"\nforward+backward, dim {args.dim}, {args.layers} layers, seq {args.seq}, batch {args.batch}, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.reps}:")
    ref = statistics.median(results["transformers (sdpa)"])
    for name, times in results.items():
        med = statistics.median(times)
        print(f"  {name:22s} {med * 1000:8.0f} ms  {tokens / med:8.0f} tok/s  ours/theirs time {med / ref:.3f}")


def peak_rss():
    """Peak resident set of this process in bytes (VmHWM: mapped file pages count once touched).
    getrusage's ru_maxrss is no good here: a child inherits its parent's peak across exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def load_probe(folder, how):
    """Runs in a fresh process: peak RSS growth while loading, then after reading every weight."""
    if how == "transformers":
        from transformers import LlamaForCausalLM
    base = peak_rss()
    if how == "ours":
        model = Llama.from_pretrained(folder)
    else:
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    loaded = peak_rss()
    total = sum(p.sum().item() for p in model.parameters())  # every page read, no fp32 copies
    touched = peak_rss()
    print(loaded - base, touched - base, base, total)


def bench_load(args):
    with tempfile.TemporaryDirectory() as d:
        # A bf16 LLaMA of ~0.6 B parameters: 1.2 GB on disk.
        config = LlamaArgs(dim=2048, n_layers=10, n_heads=16, n_kv_heads=16, intermediate_size=5504, vocab_size=32000)
        with torch.device("meta"):
            shapes = Llama(config).state_dict()
        from checkpoint import save_weights
        state = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): torch.randn(v.shape).bfloat16()
                 for k, v in shapes.items()}
        save_weights(state, d, max_shard_bytes=400 * 2**20)
        del state
        hf = {**config.to_hf_config(), "torch_dtype": "bfloat16"}
        import json
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(hf, f)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
        print(f"\nloading a {size / 1e9:.2f} GB bf16 safetensors checkpoint (3 shards), peak RSS growth / size:")
        for how in (["ours", "transformers"] if args.hf_load else ["ours"]):
            out = subprocess.run([sys.executable, __file__, "--probe", d, how], capture_output=True, text=True,
                                 check=True).stdout.split()
            loaded, touched, base = int(out[0]), int(out[1]), int(out[2])
            print(f"  {how:12s} after load {loaded / size:.2f}   after reading every weight {touched / size:.2f}"
                  f"   (the process held {base / 1e6:.0f} MB before loading)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(our model)")
    p.add_argument("--hf-load", action="store_true", help="also measure transformers' from_pretrained")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        load_probe(*args.probe)
    else:
        if not args.skip_train:
            bench_train_step(args)
        if not args.skip_load:
            bench_load(args)
