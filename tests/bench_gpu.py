"""Training-step throughput and MFU on one GPU, on a slice of the 13B model (SPEC section 9).

A few LLaMA-2-13B layers (width 5120, 40 heads, MLP 13824, vocabulary 32000) at sequence length
2048 in bf16, the shape of every step Qilin-Med-VL's training runs, only shallower:

  stage 2  all LLM weights train: ours with gradient checkpointing on and off, against
           transformers' LlamaForCausalLM (attn_implementation="sdpa") with the same weights,
           same batch, same loss, in the same run;
  stage 1  the LLM frozen, gradients flowing through it to the adapter (mlp2x_gelu), with a
           slice of the CLIP ViT-L/14-336 tower (frozen, no autograd) feeding 576 image tokens.

MFU = model FLOPs per token (llama.LlamaArgs.flops_per_token: ~6N+attention when the LLM trains,
~4N when it is frozen) x tokens/s / peak. The AdamW step (torch's fused kernel) is timed on its
own. Needs torch (+ transformers for the comparison), not DeepSpeed. A few minutes on an
A100/H100:

    python tests/bench_gpu.py                   # 4 layers, seq 2048, batch 2
    python tests/bench_gpu.py --layers 8 --peak-tflops 989
    python tests/bench_gpu.py --cpu-smoke       # the same code at a tiny shape on the CPU
"""

import argparse
import gc
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama import Llama, LlamaArgs  # noqa: E402
from model import IMAGE_TOKEN_INDEX, QilinConfig, QilinMedVL  # noqa: E402
from vit import VisionArgs  # noqa: E402

PEAKS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10": 125}  # dense bf16 TFLOP/s


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, steps, warmup):
    """Median seconds of fn() over `steps` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def report(name, seconds, tokens, flops_per_token, peak, device):
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"{name:52s} {seconds * 1e3:8.1f} ms  {tokens / seconds:9.0f} tok/s  "
          f"MFU {100 * flops_per_token * tokens / seconds / (peak * 1e12):5.1f}%{mem}", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def hf_llama(llm, dtype, device):
    """transformers' LlamaForCausalLM of the same shape holding the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    a = llm.args
    config = LlamaConfig(hidden_size=a.dim, intermediate_size=a.intermediate_size, num_hidden_layers=a.n_layers,
                         num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                         rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    state = {(k if k.startswith("lm_head") else f"model.{k}"): v for k, v in llm.state_dict().items()}
    hf.load_state_dict(state, strict=False, assign=True)  # the rotary buffers are not weights
    with torch.device(device):  # its inv_freq buffer is computed, not loaded: rebuild it off the meta device
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config)
    return hf.to(device=device, dtype=dtype)


def stage2(args, dtype, device, peak):
    print(f"\n-- stage 2: the LLM trains. {args.layers} layers of width {args.dim}, batch {args.batch} x seq {args.seq}")
    torch.manual_seed(0)
    largs = LlamaArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                      intermediate_size=args.mlp, vocab_size=args.vocab, max_seq_len=max(4096, args.seq))
    with torch.device(device):
        ours = Llama(largs).to(dtype)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    tokens = x.numel()
    fpt = ours.args.flops_per_token(args.seq, backward=True)
    n = sum(p.numel() for p in ours.parameters())
    print(f"parameters {n / 1e6:.1f}M; {fpt / 1e9:.2f} GFLOP per token (6N + attention); peak {peak} TFLOP/s")

    def step(model, logits_of):
        loss = F.cross_entropy(logits_of(model, x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        return loss

    ours_logits = lambda m, t: m(t)  # noqa: E731
    hf = None
    try:
        hf = hf_llama(ours, dtype, device).train()
    except ImportError:
        print("transformers is not installed: no comparison")
    if hf is not None:
        with torch.no_grad():
            a, b = ours(x[:1, :256]).float(), hf(x[:1, :256]).logits.float()
        print(f"same weights: max |logit difference| ours vs transformers {(a - b).abs().max().item():.3g}")

    ours.train()
    for ckpt in (True, False):
        ours.gradient_checkpointing = ckpt
        s = timed(lambda: step(ours, ours_logits), device, args.steps, args.warmup)
        report(f"ours, forward+backward, checkpointing {'on ' if ckpt else 'off'}", s, tokens, fpt, peak, device)
        ours.zero_grad(set_to_none=True)
    if hf is not None:
        for ckpt in (True, False):
            if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                hf.activation_checkpointing_enable({"use_reentrant": False}) if ckpt else hf.activation_checkpointing_disable()
            else:
                hf.gradient_checkpointing_enable({"use_reentrant": False}) if ckpt else hf.gradient_checkpointing_disable()
            s = timed(lambda: step(hf, lambda m, t: m(t).logits), device, args.steps, args.warmup)
            report(f"transformers sdpa, forward+backward, checkpointing {'on ' if ckpt else 'off'}",
                   s, tokens, fpt, peak, device)
            hf.zero_grad(set_to_none=True)
        del hf
        gc.collect()

    # AdamW on its own: a full training step = forward+backward above + this
    ours.gradient_checkpointing = True
    step(ours, ours_logits)
    opt = torch.optim.AdamW(ours.parameters(), lr=2e-5, weight_decay=0.0, fused=device.type == "cuda")
    s = timed(opt.step, device, args.steps, 1)
    print(f"{'AdamW step (fused on GPU), all ' + f'{n / 1e6:.1f}M parameters':52s} {s * 1e3:8.1f} ms", flush=True)
    del ours, opt
    gc.collect()


def stage1(args, dtype, device, peak):
    vision = VisionArgs(n_layers=args.vit_layers) if not args.cpu_smoke else \
        VisionArgs(image_size=56, patch_size=14, dim=32, n_layers=2, n_heads=2, intermediate_size=64)
    llm = LlamaArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                    intermediate_size=args.mlp, vocab_size=args.vocab, max_seq_len=max(4096, args.seq))
    config = QilinConfig(projector="mlp2x_gelu", vision=vision, llm=llm)
    P = vision.num_patches
    print(f"\n-- stage 1: LLM frozen, gradients reach the adapter through it. ViT slice {vision.n_layers} layers, "
          f"{P} image tokens + {args.seq - P} text tokens, batch {args.batch}")
    torch.manual_seed(0)
    with torch.device(device):
        model = QilinMedVL(config).to(dtype)
    model.set_trainable(1)
    model.train()
    ids = torch.randint(3, args.vocab, (args.batch, args.seq - P + 1), device=device)
    ids[:, 1] = IMAGE_TOKEN_INDEX  # BOS, <image>, text: as LLaVA places it
    labels = ids.clone()
    labels[:, :2] = -100
    pixels = torch.randn(args.batch, 3, vision.image_size, vision.image_size, device=device, dtype=dtype)
    fpt = 2 * model.llm.args.flops_per_token(args.seq, backward=False)  # forward + input gradients: ~4N
    tokens = args.batch * args.seq

    def step():
        _, loss = model(ids, pixels, labels)
        loss.backward()

    for ckpt in (True, False):
        model.llm.gradient_checkpointing = ckpt
        s = timed(step, device, args.steps, args.warmup)
        report(f"ours stage 1, forward+backward, checkpointing {'on ' if ckpt else 'off'}", s, tokens, fpt, peak, device)
        model.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.llm.parameters()) and model.projector[0].weight.requires_grad
    del model
    gc.collect()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="LLaMA-2-13B layers in the slice (of 40)")
    p.add_argument("--vit-layers", type=int, default=4, help="CLIP ViT-L layers in the stage-1 slice (of 24)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, help="peak of this GPU (default: looked up from its name)")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny shape in fp32 on the CPU: checks the script runs")
    args = p.parse_args()
    args.dim, args.heads, args.mlp, args.vocab = 5120, 40, 13824, 32000
    if args.cpu_smoke:
        args.dim, args.heads, args.mlp, args.vocab, args.layers, args.seq, args.batch = 64, 4, 172, 1000, 2, 128, 2
        args.steps, args.warmup = 2, 1
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("no GPU here: run with --cpu-smoke to check the script on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in name), None)
    if peak is None:
        peak = 312.0 if device.type == "cuda" else 0.1
        print(f"unknown peak for {name}: assuming {peak} TFLOP/s (pass --peak-tflops)")
    print(f"{name}, torch {torch.__version__}, {dtype}")
    stage2(args, dtype, device, peak)
    stage1(args, dtype, device, peak)


if __name__ == "__main__":
    main()
