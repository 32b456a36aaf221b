"""One GPU benchmark of the whole project on 13B shapes: the bare step, train.py's own training
step under DeepSpeed, and decoding with chat.py against transformers, in one run.

  (a) bare step: a 4-layer slice of LLaMA-2-13B (width 5120, 40 heads, MLP 13824, vocabulary
      32000) at sequence 2048, batch 2, bf16: our forward+backward against transformers'
      LlamaForCausalLM (sdpa) holding the same weights; and stage 1's (ViT slice + frozen LLM).
  (b) train.py's step: the same LLM slice behind the full CLIP ViT-L/14-336 and the adapter,
      built and run by train.py's own functions (start_deepspeed, collate, train_step: imported,
      not copied) on the bundled samples (~650 positions each, 576 of them image features):
      stage 2 at batch 16 under ZeRO-2 and ZeRO-3, each with and without --compile; stage 1 at
      batch 32 under ZeRO-2. The median step after warm-up steps.
  (c) decoding: the full-size model (ViT-L + 40-layer 13B LLaMA, random bf16) answering with
      96 new tokens after a 622-position prompt, batch 1: chat.generate eager and compiled
      against transformers' generate with its static, compiled cache; the greedy tokens must
      agree; tokens/s against the limit set by the device-to-device copy bandwidth measured in
      the same run (bytes per token: every weight and the filled KV cache, read once).

MFU = model FLOPs (LlamaArgs.step_flops: 6N + attention when the LLM trains, 4N when it is frozen,
the output layer only where logits are computed) / time / peak (989 TFLOP/s dense bf16 on an
H100/H200, by the datasheet). Needs DeepSpeed and transformers. About five minutes on an H200:

    python tests/bench_gpu.py
    python tests/bench_gpu.py --only b            # one part
    python tests/bench_gpu.py --cpu-smoke         # the same code at a tiny shape on the CPU
"""

import argparse
import copy
import dataclasses
import gc
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import chat  # noqa: E402
import train  # noqa: E402
from data import IMAGE_TOKEN_INDEX, SAMPLES, ChiMedDataset, Tokenizer, collate, expand_images  # noqa: E402
from llama import Llama, LlamaArgs  # noqa: E402
from model import QilinConfig, QilinMedVL  # noqa: E402
from quantize import quantize_model  # noqa: E402
from vit import VisionArgs  # noqa: E402

PEAKS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10": 125}  # dense bf16 TFLOP/s
SUMMARY = []  # (part, what, figure) rows printed at the end
MEASURED = {}  # (stage, ZeRO stage, compiled): MFU of train.py's step, for the whole-run estimate


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


def report(name, seconds, tokens, flops_per_token, peak, device, part="a"):
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    mfu = 100 * flops_per_token * tokens / seconds / (peak * 1e12)
    print(f"{name:52s} {seconds * 1e3:8.1f} ms  {tokens / seconds:9.0f} tok/s  MFU {mfu:5.1f}%{mem}", flush=True)
    SUMMARY.append((part, name, f"{tokens / seconds:,.0f} tok/s, MFU {mfu:.1f}%"))
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
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), device=device)
    ids[:, 1:1 + P] = IMAGE_TOKEN_INDEX  # BOS, the image's features, text: as LLaVA places it
    labels = ids.clone()
    labels[:, :1 + P] = -100
    pixels = torch.randn(args.batch, 3, vision.image_size, vision.image_size, device=device, dtype=dtype)
    n_logits = int((labels[:, 1:] >= 0).sum())  # the model computes logits only where the loss needs them
    fpt = model.llm.args.step_flops([args.seq] * args.batch, n_logits, weight_grads=False)  # ~4N per token
    fpt /= args.batch * args.seq
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




# ----------------------------------------------------------------------------- (b) train.py's step

def slice_config(args, vision):
    llm = LlamaArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                    intermediate_size=args.mlp, vocab_size=args.vocab, max_seq_len=4096)
    return QilinConfig(projector="mlp2x_gelu", vision=vision, llm=llm)


def sample_batches(config, stage, batch_size, n_batches):
    """Collated batches of the bundled samples (real images, the demo tokenizer), as train.py's
    DataLoader gives them: ~650 positions a sample at 576 image features."""
    tok = Tokenizer(SAMPLES / "tokenizer.model")
    ds = ChiMedDataset(data_path=SAMPLES / f"stage{stage}.json", image_root=SAMPLES / "images", tokenizer=tok,
                       stage=stage, image_size=config.vision.image_size, image_fit="pad",
                       num_image_tokens=config.vision.num_patches)
    samples = [ds[i % len(ds)] for i in range(batch_size * n_batches)]
    batches = [collate(samples[i * batch_size:(i + 1) * batch_size], tok.pad_id, config.vision.image_size)
               for i in range(n_batches)]
    return [{k: v.pin_memory() if torch.is_tensor(v) and torch.cuda.is_available() else v for k, v in b.items()}
            for b in batches]


def real_step(args, stage, zero, compile, batch_size, device, peak):
    """train.py's setup and step on the slice: its DeepSpeed config, its engine, its train_step."""
    name = f"train.py stage {stage}, ZeRO-{zero}{', --compile' if compile else ''}, batch {batch_size}"
    vision = VisionArgs() if not args.cpu_smoke else VisionArgs.preset("demo")
    config = slice_config(args, vision)
    with tempfile.TemporaryDirectory() as out:
        argv = ["--stage", str(stage), "--data", str(SAMPLES / "stage2.json"), "--image-root", str(SAMPLES),
                "--output", out, "--zero", str(zero), "--batch-size", str(batch_size),
                "--precision", "bf16" if device.type == "cuda" else "fp32"] + (["--compile"] if compile else [])
        argv += ["--stage1-output", out] if stage == 2 else ["--vision", out, "--llm", out]  # not read: built below
        targs = train.parse_args(argv)
        targs.projector, targs.image_fit, targs.style = "mlp2x_gelu", "pad", "paper"
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with torch.device(device):
            model = QilinMedVL(config).to(dtype)
        engine, _ = train.start_deepspeed(model, targs, 1, device, total_steps=1000)
        batches = sample_batches(config, stage, batch_size, 4)
        steps, warmup = (args.steps, args.warmup + (4 if compile else 0))
        times, tokens, flops = [], [], []
        for i in range(warmup + steps):
            batch = batches[i % len(batches)]
            sync(device)
            t = time.perf_counter()
            train.train_step(engine, [batch], stage == 2, config.llm)  # waits for the device once, at the end
            times.append(time.perf_counter() - t)
            tokens.append(sum(batch["lengths"]))
            flops.append(config.llm.step_flops(batch["lengths"], len(batch["loss_positions"]), stage == 2))
        timed_ = sorted(range(warmup, warmup + steps), key=lambda k: times[k])[steps // 2]  # the median step
        s, n, f = times[timed_], tokens[timed_], flops[timed_]
        mfu = 100 * f / s / (peak * 1e12)
        mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"{name:52s} {s * 1e3:8.1f} ms  {n / s:9.0f} tok/s  MFU {mfu:5.1f}%  (first step {times[0]:.1f} s){mem}",
              flush=True)
        SUMMARY.append(("b", name, f"{n / s:,.0f} tok/s, MFU {mfu:.1f}%"))
        MEASURED[(stage, zero, compile)] = mfu
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine, model, batches
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def part_b(args, device, peak):
    print(f"\n-- (b) train.py's step: full ViT-L + {args.layers}-layer 13B-shaped LLM slice, bundled samples")
    for env, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(29500 + os.getpid() % 1000))):
        os.environ.setdefault(env, value)
    b2, b1 = (16, 32) if not args.cpu_smoke else (2, 2)
    runs = [(2, 2, False, b2), (2, 2, True, b2), (2, 3, False, b2), (2, 3, True, b2), (1, 2, False, b1)]
    for stage, zero, compile, batch in runs:
        try:
            real_step(args, stage, zero, compile, batch, device, peak)
        except Exception:  # one configuration failing must not cost the others
            print(f"stage {stage} ZeRO-{zero} compile={compile} FAILED:\n{traceback.format_exc(limit=6)}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if (1, 2, False) in MEASURED and (2, 3, False) in MEASURED:  # the paper's setup: ZeRO-2, then ZeRO-3
        whole_run_estimate({1: MEASURED[(1, 2, False)], 2: MEASURED[(2, 3, False)]})


# ----------------------------------------------------------------------------- (c) decoding

def copy_bandwidth(device, gib=4):
    """Device-to-device copy, bytes read plus written per second."""
    n = (gib * 2**30 if device.type == "cuda" else 2**26) // 2
    a, b = torch.empty(n, dtype=torch.bfloat16, device=device).normal_(), torch.empty(n, dtype=torch.bfloat16, device=device)
    s = timed(lambda: b.copy_(a), device, 10, 3)
    del a, b
    return 2 * n * 2 / s


def part_c(args, device):
    bandwidth = copy_bandwidth(device)
    vision = VisionArgs() if not args.cpu_smoke else VisionArgs.preset("demo")
    llm = LlamaArgs() if not args.cpu_smoke else LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                                                             intermediate_size=192, vocab_size=3000, max_seq_len=1024)
    print(f"\n-- (c) decoding: ViT + {llm.n_layers}-layer LLaMA (width {llm.dim}), random weights, batch 1; "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = QilinMedVL(QilinConfig(projector="mlp2x_gelu", vision=vision, llm=llm)).eval()
    torch.set_default_dtype(torch.float32)
    if args.cpu_smoke:  # a wider init than LLaMA's 0.02: varied text, so the token comparison means something
        for p in model.llm.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.1)
    ids = [1] + [IMAGE_TOKEN_INDEX] + list(range(300, 345))  # BOS, image, 45 text tokens: 622 positions at 576
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, device=device, dtype=dtype)
    n_new = args.new_tokens
    L = len(expand_images(ids, model.num_image_tokens))
    weights = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    kv = 2 * llm.n_layers * llm.n_kv_heads * llm.head_dim * (L + n_new // 2) * torch.finfo(dtype).bits // 8
    limit = bandwidth / (weights + kv)
    print(f"bytes per token: {(weights + kv) / 1e9:.1f} GB (weights + mean KV cache) -> limit {limit:.1f} tok/s")

    def ours(compile, model=model):
        t0 = time.perf_counter()
        tokens, stamps = [], []
        for token in chat.generate(model, [ids], pixels, n_new, compile=compile):
            tokens.append(token.item())  # waits for the token, as streaming does
            stamps.append(time.perf_counter())
        return tokens, stamps[0] - t0, (n_new - 1) / (stamps[-1] - stamps[0])

    if args.profile:  # where an eager decode step spends its time (host and device)
        from torch.profiler import ProfilerActivity, profile
        ours(False)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            ours(False)
        for key in ("self_cpu_time_total",) + (("self_device_time_total",) if device.type == "cuda" else ()):
            print(prof.key_averages().table(sort_by=key, row_limit=14), flush=True)
    results = {}
    runs = (("chat.generate eager", False), ("chat.generate compiled (CUDA graph)", True))
    for name, compile in runs[1:] if args.compiled_only else runs:
        try:
            ours(compile)  # warm-up (and the compile)
            tokens, prefill, rate = ours(compile)
            results[name] = tokens
            print(f"{name:44s} prefill {prefill * 1e3:6.1f} ms  decode {rate:7.1f} tok/s  {100 * rate / limit:5.1f}% of the limit",
                  flush=True)
            SUMMARY.append(("c", name, f"{rate:.1f} tok/s, {100 * rate / limit:.0f}% of the bandwidth limit"))
        except Exception:
            print(f"{name} FAILED:\n{traceback.format_exc(limit=6)}", flush=True)
    for scheme in args.quantize:  # the same weights, weight-only quantized by quantize.py, the compiled step
        name = f"chat.generate compiled, {scheme}"
        try:
            q = quantize_model(copy.deepcopy(model), scheme, min(args.group_size, llm.dim), device, dtype)
            read = sum(t.nbytes for t in (*q.llm.parameters(), *q.llm.buffers()) if t.dim() > 0) + kv
            q_limit = bandwidth / read
            ours(True, q)
            tokens, prefill, rate = ours(True, q)
            results[name] = tokens
            print(f"{name:44s} prefill {prefill * 1e3:6.1f} ms  decode {rate:7.1f} tok/s  {100 * rate / q_limit:5.1f}% "
                  f"of its limit ({read / 1e9:.1f} GB a token)", flush=True)
            SUMMARY.append(("c", name, f"{rate:.1f} tok/s, {100 * rate / q_limit:.0f}% of the bandwidth limit for "
                                       f"{read / 1e9:.1f} GB a token"))
            del q
        except Exception:
            print(f"{name} FAILED:\n{traceback.format_exc(limit=6)}", flush=True)
    try:
        if not args.compiled_only:
            results["transformers static"] = hf_generate(model, ids, pixels, n_new, limit, dtype, device)
    except ImportError:
        print("transformers is not installed: no comparison")
    except Exception:
        print(f"transformers generate FAILED:\n{traceback.format_exc(limit=6)}", flush=True)
    names = list(results)
    for name in names[1:]:  # random bf16 weights give near-ties, where kernels may pick differently
        a, b = results[names[0]], results[name]
        agree = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(f"greedy tokens, {names[0]} vs {name}: the first {agree} of {len(a)} agree")
        SUMMARY.append(("c", f"tokens agreeing with eager: {name}", f"{agree} of {len(a)}"))


def hf_generate(model, ids, pixels, n_new, limit, dtype, device):
    """transformers' LlamaForCausalLM on our weights, generate() with its static, compiled cache,
    from the same embeddings (ours: the image features spliced in)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    a = model.llm.args
    config = LlamaConfig(hidden_size=a.dim, intermediate_size=a.intermediate_size, num_hidden_layers=a.n_layers,
                         num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                         rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len,
                         tie_word_embeddings=False, attn_implementation="sdpa", bos_token_id=1, eos_token_id=None,
                         pad_token_id=0)
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    state = {(k if k.startswith("lm_head") else f"model.{k}"): v for k, v in model.llm.state_dict().items()}
    hf.load_state_dict(state, strict=False, assign=True)  # shares our tensors: no second copy
    with torch.device(device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config)
    hf.eval()
    with torch.inference_mode():
        embeds = model.embed(torch.tensor([expand_images(ids, model.num_image_tokens)], device=device), pixels)

    class Clock:  # a generate() streamer that notes when each new token arrives
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    def run():
        stamps.clear()
        t = time.perf_counter()
        out = hf.generate(inputs_embeds=embeds, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          cache_implementation="static", streamer=Clock())
        return out, stamps[-n_new] - t, (n_new - 1) / (stamps[-1] - stamps[-n_new])

    stamps = []
    run()  # warm-up: compiles
    out, prefill, rate = run()
    print(f"{'transformers generate, static cache':44s} prefill {prefill * 1e3:6.1f} ms  decode {rate:7.1f} tok/s  "
          f"{100 * rate / limit:5.1f}% of the limit", flush=True)
    SUMMARY.append(("c", "transformers generate, static cache", f"{rate:.1f} tok/s, {100 * rate / limit:.0f}% of the limit"))
    return out[0, -n_new:].tolist()


# ChiMed-VL (paper section 3): samples, median positions per sample with the 576 image features
# and the prompt in, and learned tokens per sample (stage 1: the ~435-token context text; stage 2:
# a ~22-token answer); tests/bench_data.py draws the same lengths
CHIMED_VL = {1: (580_014, 1073, 435), 2: (469_441, 675, 22)}


def whole_run_estimate(mfu, gpus=8, peak=312):
    """Hours of each stage (one epoch, paper section 5.2) on `gpus` A100s at these MFUs (percent)."""
    llm = LlamaArgs()  # LLaMA-2-13B
    print(f"\nwhole-run estimate on {gpus} x A100 (bf16 peak {peak} TFLOP/s), at MFU {mfu[1]:.1f}% and {mfu[2]:.1f}%:")
    for stage, (samples, length, learned) in CHIMED_VL.items():
        flops = samples * llm.step_flops([length], learned, stage == 2)
        ideal = flops / (gpus * peak * 1e12) / 3600
        print(f"  stage {stage}: {samples:,} samples x {length} positions, {flops:.2e} FLOPs: {ideal:.1f} h at 100% MFU, "
              f"{ideal / (mfu[stage] / 100):.1f} h at {mfu[stage]:.1f}%")
        SUMMARY.append(("b", f"stage {stage} on 8 x A100 at {mfu[stage]:.1f}% MFU", f"{ideal / (mfu[stage] / 100):.1f} h"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="LLaMA-2-13B layers in the training slices (of 40)")
    p.add_argument("--vit-layers", type=int, default=4, help="CLIP ViT-L layers in (a)'s stage-1 slice (of 24)")
    p.add_argument("--seq", type=int, default=2048, help="(a)'s sequence length")
    p.add_argument("--batch", type=int, default=2, help="(a)'s batch")
    p.add_argument("--steps", type=int, default=8, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=96, help="(c)'s answer length")
    p.add_argument("--only", default="abc", help="which parts to run, e.g. 'bc'")
    p.add_argument("--profile", action="store_true", help="(c): print a profile of the eager decode steps")
    p.add_argument("--compiled-only", action="store_true", help="(c): only chat.generate's compiled path")
    p.add_argument("--quantize", nargs="*", default=["int8", "int4"], choices=("int8", "int4"),
                   help="(c): also decode the model quantized by quantize.py (default int8 int4; none: leave out)")
    p.add_argument("--group-size", type=int, default=128, help="(c): int4's group size")
    p.add_argument("--estimate", nargs=2, type=float, metavar=("MFU1", "MFU2"),
                   help="only print the whole-run estimate for these stage-1 and stage-2 MFUs (percent)")
    p.add_argument("--peak-tflops", type=float, help="peak of this GPU (default: looked up from its name)")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny shape in fp32 on the CPU: checks the script runs")
    args = p.parse_args()
    if args.estimate:
        return whole_run_estimate({1: args.estimate[0], 2: args.estimate[1]})
    args.dim, args.heads, args.mlp, args.vocab = 5120, 40, 13824, 32000
    if args.cpu_smoke:
        args.dim, args.heads, args.mlp, args.vocab, args.layers, args.seq, args.batch = 64, 4, 172, 3000, 2, 128, 2
        args.steps, args.warmup, args.new_tokens = 2, 1, 8
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("no GPU here: run with --cpu-smoke to check the script on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.enable_cudnn_sdp(False)  # as train.setup_process: no re-planning per sequence length
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in name), None)
    if peak is None:
        peak = 312.0 if device.type == "cuda" else 0.1
        print(f"unknown peak for {name}: assuming {peak} TFLOP/s (pass --peak-tflops)")
    print(f"{name}, torch {torch.__version__}, {dtype}, peak {peak} TFLOP/s")
    t0 = time.perf_counter()
    # (c) before (b): DeepSpeed's engines leave patches behind in the process (an eager decode step
    # measured after them ran at half speed)
    for part, run in (("a", lambda: (stage2(args, dtype, device, peak), stage1(args, dtype, device, peak))),
                      ("c", lambda: part_c(args, device)), ("b", lambda: part_b(args, device, peak))):
        if part in args.only:
            try:
                run()
            except Exception:
                print(f"part {part} FAILED:\n{traceback.format_exc(limit=8)}", flush=True)
            print(f"[{time.perf_counter() - t0:.0f} s so far]", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("\n== summary")
    for part, what, figure in SUMMARY:
        print(f"({part}) {what:52s} {figure}")


if __name__ == "__main__":
    main()
