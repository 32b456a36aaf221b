"""Memory of a LoRA training step against full tuning at the same shape, and what that means for 13B on one GPU.

    python tests/bench_lora.py                 # on the CPU, fp32 (10-40 s on 2 cores)
    python tests/bench_lora.py --device cuda   # on a GPU, bf16

The model is Qilin-Med-VL with an LLM of 13B's shape at 1/8 of its width (640 wide, MLP 1728, 5 heads of 128, as
LLaMA-2-13B's 5120, 13824, 40 of 128) and 4 blocks; LoRA's rank is scaled alike (16 here stands for 128). For full
tuning and for LoRA it prints the trained parameters, AdamW's state in bytes (read from the optimizer), and the peak
memory of one training step (forward, backward with gradient checkpointing, AdamW's first step, which allocates its
state) above the weights: on the CPU the bytes of the tensors the step creates, counted as each is made and freed
(PeakBytes; the resident size would mostly show malloc's caches), on a GPU torch.cuda.max_memory_allocated.

Then 13B, from bytes counted rather than guessed: the parameters of our modules built on `meta`; what one LLM block
keeps for its backward pass per token, counted with autograd's saved-tensor hooks at 1/8 and 1/4 width (the count
doubles with the width, so 13B's is 8x the 1/8-width count); 16 bytes per trained parameter under mixed-precision
AdamW (bf16 weight and gradient, fp32 master copy and two moments: Rajbhandari et al. 2020, "ZeRO", section 3.1),
2 per frozen one. The same formula, applied to the bench's own shape, is printed beside the measured peak as a check
(an upper bound: it adds AdamW's state to the activations, which are freed before the state is allocated).
"""

import argparse
import contextlib
import math
import sys
import types
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora  # noqa: E402
from data import IMAGE_TOKEN_INDEX, expand_images  # noqa: E402
from llama import DecoderLayer, Llama, LlamaArgs, rope_cos_sin  # noqa: E402
from model import QilinConfig, QilinMedVL, build_projector  # noqa: E402
from vit import VisionArgs, VisionTransformer  # noqa: E402

BIG = LlamaArgs.preset("13b")
VIT_L = VisionArgs.preset("vit-l-14-336")
GB = 1e9


def scaled(scale, n_layers=4):
    """LLaMA-2-13B's shape at 1/scale of its width; head_dim stays 128, so the heads scale too."""
    return LlamaArgs(dim=BIG.dim // scale, n_layers=n_layers, n_heads=BIG.n_heads // scale,
                     n_kv_heads=BIG.n_kv_heads // scale, intermediate_size=BIG.intermediate_size // scale,
                     vocab_size=BIG.vocab_size // scale, max_seq_len=2048)


def count(module, lora_only=False):
    return sum(p.numel() for n, p in module.named_parameters() if ".lora_" in n or not lora_only)


def params_13b(r):
    """(LLM, LoRA at rank r, ViT-L/14-336, mlp2x_gelu adapter) parameters, from our modules built on `meta`."""
    with torch.device("meta"):
        llm, vit = Llama(BIG), VisionTransformer(VIT_L)
        adapter = build_projector("mlp2x_gelu", VIT_L.dim, BIG.dim)
    n = count(llm)
    return n, count(lora.add_lora(llm, r, 2 * r), lora_only=True), count(vit), count(adapter)


def block_saved_per_token(args, r, dtype, T=512):
    """Bytes one LLM block keeps for its backward pass, per token (each storage once, weights not counted): what a
    checkpointed block holds while it is recomputed and differentiated. r: LoRA rank, 0 for full tuning."""
    layer = DecoderLayer(args).to(dtype).requires_grad_(r == 0)
    if r:
        lora.add_lora(types.SimpleNamespace(layers=[layer]), r, 2 * r, dropout=0.05)
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    x = torch.randn(1, T, args.dim, dtype=dtype, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T)[None], args.head_dim, args.rope_theta, dtype)
    seen = {}

    def pack(t):
        if (s := t.untyped_storage()).data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer.train()(x, cos, sin)
    return sum(seen.values()) / T


def activation_bytes(args, per_token_block, T, itemsize):
    """Per sample of T positions, with checkpointing: each block's input (B, T, dim), one block's saved tensors
    during its backward, and the gradient flowing back with a copy of it (2 more of (T, dim))."""
    return T * (args.n_layers * args.dim * itemsize + per_token_block + 2 * args.dim * itemsize)


# ----------------------------------------------------------------------------- one measured step

class PeakBytes(TorchDispatchMode):
    """The peak of the bytes held by tensor storages created while it is on, above those that existed before (the
    CPU's allocator keeps no statistics, and the resident size mostly shows malloc's caches): every op's outputs are
    seen, each new storage counted once and uncounted when it is freed."""

    def __init__(self, existing):
        super().__init__()
        self.old = {t.untyped_storage().data_ptr() for t in existing}
        self.live, self.sizes, self.now, self.peak = {}, {}, 0, 0  # storage address -> weakref, bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = (st := t.untyped_storage()).data_ptr()
            if key not in self.old and key not in self.live:
                self.live[key] = weakref.ref(st, lambda _, key=key: self.free(key))
                self.sizes[key] = st.nbytes()
                self.now += st.nbytes()
                self.peak = max(self.peak, self.now)
        return out

    def free(self, key):
        self.live.pop(key, None)
        self.now -= self.sizes.pop(key, 0)


def one_step(kind, device, batch, T):
    """(trained parameters, gradient bytes, optimizer-state bytes, peak bytes of the first training step above the
    weights). kind: "full", or a LoRA rank."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = QilinConfig(projector="mlp2x_gelu", vision=VisionArgs.preset("demo"), llm=scaled(8))
    model = QilinMedVL(config).to(device, dtype).set_trainable(2)
    if kind != "full":
        lora.add_lora(model.llm.requires_grad_(False), int(kind), 2 * int(kind), dropout=0.05)
    model.train().llm.gradient_checkpointing = True
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5)
    P = model.num_image_tokens
    ids = [1, IMAGE_TOKEN_INDEX] + [(7 * k) % 3990 + 3 for k in range(T - P - 1)]
    input_ids = torch.tensor([expand_images(ids, P)] * batch, device=device)  # (B, T)
    labels = input_ids.masked_fill(torch.arange(T, device=device) < T - 64, -100)  # the answer: the last 64
    pixels = torch.randn(batch, 3, 112, 112, device=device, dtype=dtype)
    existing = [*model.parameters(), *model.buffers(), input_ids, labels, pixels]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with contextlib.nullcontext() if device == "cuda" else PeakBytes(existing) as tracker:
        model(input_ids, pixels, labels)[1].backward()
        optimizer.step()  # the first step also allocates AdamW's state
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else tracker.peak
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return dict(trained=sum(p.numel() for p in trained), state=state, peak=peak,
                grads=sum(p.numel() * p.element_size() for p in trained))


# ----------------------------------------------------------------------------- 13B, from the counts

def fits(capacity, fixed, per_sample, usable=0.9):
    """The largest batch whose memory fits `usable` of the GPU (the rest: CUDA context, allocator fragmentation)."""
    return max(0, math.floor((usable * capacity - fixed) / per_sample))


def extrapolate(block_full, block_lora):
    """13B's memory and batch sizes on one GPU, from the parameter counts and the per-token block counts (1/8 width)."""
    n, _, vit, adapter = params_13b(8)
    print(f"\n13B: LLaMA-2-13B {n / 1e9:.2f}B, CLIP ViT-L/14-336 {vit / 1e6:.0f}M (frozen), mlp2x_gelu adapter "
          f"{adapter / 1e6:.1f}M; bf16, gradient checkpointing; 90% of the GPU usable")
    print("| | trained | weights + training state | activations per sample, T = 2048 / 650 | batch on 80 GB | on 48 GB |")
    print("|---|---|---|---|---|---|")
    rows = [("full tuning", n + adapter, n + vit + adapter, block_full)]
    for r in (8, 128):
        lora_n = params_13b(r)[1]
        rows.append((f"LoRA rank {r}", lora_n + adapter, n + vit + lora_n + adapter, block_lora))
    for name, trained, total, block in rows:
        fixed = 2 * (total - trained) + 16 * trained  # frozen: bf16 only; trained: 16 bytes each
        per = [activation_bytes(BIG, 8 * block, T, 2) for T in (2048, 650)]  # 13B's block: 8x the 1/8-width count
        batches = [f"{fits(c, fixed, per[0])} / {fits(c, fixed, per[1])}" for c in (80 * GB, 48 * GB)]
        print(f"| {name} | {trained / 1e6:,.0f}M | {fixed / GB:.1f} GB | {per[0] / GB:.2f} / {per[1] / GB:.2f} GB | "
              f"{batches[0]} | {batches[1]} |")
    for r in (8, 128):
        lora_bytes = 2 * params_13b(r)[1]
        print(f"output of a rank-{r} run (bf16): LoRA {lora_bytes / 1e6:,.0f} MB + adapter {2 * adapter / 1e6:.0f} MB = "
              f"{(lora_bytes + 2 * adapter) / 1e6:,.0f} MB (a full stage-2 model: {2 * (n + vit + adapter) / GB:.1f} GB)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512, help="positions per sample, 64 of them image features")
    args = p.parse_args()
    small, r = scaled(8), 128 // 8
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    itemsize = torch.tensor([], dtype=dtype).element_size()
    with torch.device("meta"):
        n_small = count(Llama(small))
    print(f"LLM at 1/8 of 13B's width, 4 blocks ({n_small / 1e6:.1f}M), demo ViT, mlp2x_gelu adapter; "
          f"batch {args.batch} x {args.seq} positions, {dtype}, {args.device}, gradient checkpointing")
    print("| | trained | AdamW state | peak of a step above the weights | the formula below (an upper bound) |")
    print("|---|---|---|---|---|")
    for kind in ("full", str(r)):
        m = one_step(kind, args.device, args.batch, args.seq)
        block = block_saved_per_token(small, 0 if kind == "full" else r, dtype)
        predicted = m["grads"] + m["state"] + args.batch * activation_bytes(small, block, args.seq, itemsize)
        print(f"| {'full tuning' if kind == 'full' else f'LoRA rank {r} (128 at 13B)'} | {m['trained'] / 1e6:.2f}M | "
              f"{m['state'] / 1e6:.1f} MB | {m['peak'] / 1e6:.0f} MB | {predicted / 1e6:.0f} MB |")
    counts = {}
    for name, rank in (("full", 0), ("LoRA", r)):
        eighth, quarter = (block_saved_per_token(scaled(s, 1), rank and rank * 8 // s, torch.bfloat16) for s in (8, 4))
        counts[name] = eighth
        print(f"one block's saved tensors per token, bf16, {name}: {eighth / 1e3:.1f} kB at 1/8 width, "
              f"{quarter / 1e3:.1f} kB at 1/4 ({quarter / eighth:.2f}x)")
    extrapolate(counts["full"], counts["LoRA"])


if __name__ == "__main__":
    main()
