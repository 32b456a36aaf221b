"""Decoding speed of chat.py against transformers' generate, on the same random llava-hf model.

A LLaVA-shaped model small enough for a CPU (text width 512, 8 layers; a narrow CLIP tower at
336 px / patch 14, so the prompt carries the real 576 image features), in float32. Both sides
decode greedily from the same prompt; the script checks that they write the same tokens.

    python tests/bench_decode.py [--new-tokens 64] [--repeats 3] [--threads N] [--quantize int8 int4]

With --quantize, the same model quantized while it loads (quantize.py) decodes too: its speed against our fp32,
how many of its greedy tokens are fp32's, the bytes of the loaded model (the embeddings, which stay float, apart)
and the peak resident memory of a process that loads it and decodes; then the GPU memory the 13B model would need,
from the bytes of its tensors counted on the meta device.

Prefill is the time to the first new token (vision tower, adapter, prompt); decode speed is the
other N - 1 tokens over the time from the first to the last. Both are timestamped as each token
comes out (transformers through a streamer); the medians of interleaved runs are printed.
"""

import argparse
import dataclasses
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.generation.streamers import BaseStreamer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import chat  # noqa: E402
import quantize  # noqa: E402
from data import IMAGE_TOKEN_INDEX  # noqa: E402
from llama import LlamaArgs  # noqa: E402
from model import QilinConfig, QilinMedVL  # noqa: E402

TOKENIZER = ROOT / "tests" / "data" / "mistral-7b-v0.1.model"
IMAGE = ROOT / "samples" / "images" / "chest_xray.png"


class Clock(BaseStreamer):
    """transformers calls put() with the prompt, then with each new token: note the times."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def timed(fn):
    """(prefill seconds, decode tokens/s, tokens) from one generation that timestamps each token."""
    start = time.perf_counter()
    times, tokens = fn()
    return times[0] - start, (len(times) - 1) / (times[-1] - times[0]), tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--dim", type=int, default=512, help="text width (128: a tiny model, where per-step overhead counts)")
    p.add_argument("--layers", type=int, default=8, help="text layers")
    p.add_argument("--quantize", nargs="*", default=[], choices=quantize.SCHEMES, help="also decode these")
    p.add_argument("--group-size", type=int, default=128, help="int4's group size")
    p.add_argument("--compile", action="store_true", help="also decode with chat.py's compiled step (fp32 and each "
                   "--quantize scheme): torch.compile's C++ code on the CPU")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    N = args.new_tokens
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=336, patch_size=14, hidden_size=64,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
        text_config=dict(model_type="llama", hidden_size=args.dim, num_hidden_layers=args.layers,
                         num_attention_heads=args.dim // 64, num_key_value_heads=args.dim // 64,
                         intermediate_size=args.dim * 8 // 3 // 32 * 32, vocab_size=32001, rms_norm_eps=1e-5,
                         max_position_embeddings=2048, initializer_range=0.1),
        image_token_index=32000, image_seq_length=576, vision_feature_layer=-2)
    reference = LlavaForConditionalGeneration(config).eval()
    reference.generation_config.eos_token_id = None  # both sides write exactly N tokens
    folder = Path(tempfile.mkdtemp())
    reference.save_pretrained(folder)
    shutil.copyfile(TOKENIZER, folder / "tokenizer.model")
    model, tokenizer = chat.load_model(str(folder))
    quantized = {s: chat.load_model(str(folder), quantize=s, group_size=args.group_size)[0] for s in args.quantize}
    pixels = chat.load_pixels([IMAGE], model)
    prompt = chat.prompt_ids([{"from": "human", "value": "Describe this image in detail."}], tokenizer, "release")
    k = prompt.index(IMAGE_TOKEN_INDEX)
    hf_ids = torch.tensor([prompt[:k] + [config.image_token_index] * 576 + prompt[k + 1:]])
    print(f"model: text {args.dim} x {args.layers} layers, vocab 32001, CLIP 336/14 -> 576 patches; prompt {hf_ids.shape[1]} positions; "
          f"float32, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")

    def ours(model=model, compile=False):
        times, tokens = [], []
        for token in chat.generate(model, [prompt], pixels, N, compile=compile):  # greedy, no EOS: exactly N tokens
            times.append(time.perf_counter())
            tokens.append(token.item())
        return times, tokens

    def theirs():
        clock = Clock()
        with torch.inference_mode():
            out = reference.generate(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=pixels,
                                     do_sample=False, max_new_tokens=N, min_new_tokens=N, pad_token_id=0,
                                     streamer=clock)
        return clock.times[1:], out[0, hf_ids.shape[1]:].tolist()  # times[0] is the prompt's put()

    variants = {"chat.py": ours, "transformers": theirs}  # and each quantized model, each compiled with --compile
    for name, m in {"": model, **{f" {s}": m for s, m in quantized.items()}}.items():
        variants.update({f"chat.py{name}": lambda m=m: ours(m)} if name else {})
        variants.update({f"chat.py{name} compiled": lambda m=m: ours(m, True)} if args.compile else {})
    for run in variants.values():
        timed(run)  # warm up (and compile)
    runs = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so a busy moment of the machine hits every variant
        for name, run in variants.items():
            runs[name].append(timed(run))
    rows = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs), rs[0][2])
            for name, rs in runs.items()}
    same = rows["chat.py"][2] == rows["transformers"][2]
    assert same, "greedy tokens differ between chat.py and transformers"
    print(f"{'':27}{'prefill s':>11}{'decode tok/s':>14}{'/ fp32':>8}{'tokens as fp32':>16}")
    for name, (t1, speed, tokens) in rows.items():
        same = sum(a == b for a, b in zip(tokens, rows["chat.py"][2]))
        print(f"{name:27}{t1:>11.3f}{speed:>14.1f}{speed / rows['chat.py'][1]:>8.2f}{f'{same}/{N}':>16}")
    ratio = rows["chat.py"][1] / rows["transformers"][1]
    print(f"decode speed-up: {ratio:.2f}x transformers' generate (target: at least 1.2x); "
          f"the {N} greedy tokens are identical ({len(set(rows['chat.py'][2]))} distinct)")

    if quantized:
        memory(folder, {"float32": model, **quantized}, args.group_size)
        print_13b_memory(args.group_size)
    shutil.rmtree(folder)
    # Batch-1 decoding of the real 13B model is bound by memory bandwidth (every weight is read for
    # every token): tests/bench_gpu.py (part c) measures it on a GPU against that limit.


PEAK_RSS = """import re, sys, torch, chat, quantize
def rss(key):  # MiB, from /proc: VmHWM is the peak since the process started
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
x, scales = torch.ones(1, 64), torch.ones(8, 2)  # compile both kernels first: the compiler's memory is not the model's
quantize.int8_matvec(x, torch.ones(8, 64, dtype=torch.int8), scales[:, 0])
quantize.int4_matvec(x, torch.ones(8, 32, dtype=torch.uint8), scales, scales)
before = rss("VmRSS")
model, tokenizer = chat.load_model(sys.argv[1])
chat.generate_batch(model, [[1, 2, 3]], None, 4, None)
print(f"{rss('VmHWM') - before:.0f}")
"""


def split_bytes(model):
    """(MiB of the input embeddings, MiB of everything else) of a loaded model."""
    sizes = {k: t.nbytes / 2**20 for k, t in model.state_dict().items()}
    embeddings = sizes.pop("llm.embed_tokens.weight")
    return embeddings, sum(sizes.values())


def memory(folder, models, group_size):
    """Bytes of each loaded model, and the peak RSS of a process that loads its folder (quantize.py's) and decodes."""
    print(f"\n{'':10}{'embeddings MiB':>16}{'the rest MiB':>14}{'peak RSS MiB':>14}   (a process that loads and decodes)")
    for name, model in models.items():
        path = folder if name == "float32" else folder.with_name(f"{folder.name}-{name}")
        if name != "float32":
            quantize.write_quantized(str(folder), str(path), name, group_size)
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, cwd=ROOT)
        if name != "float32":
            shutil.rmtree(path)
        peak = proc.stdout.split()[0] if proc.returncode == 0 else "failed: " + proc.stderr.strip().splitlines()[-1]
        embeddings, rest = split_bytes(model)
        print(f"{name:10}{embeddings:>16.1f}{rest:>14.1f}{peak:>14}")


def print_13b_memory(group_size):
    """The 13B model's GPU memory in bf16, int8 and int4, from its tensors' bytes (shapes on the meta device) plus a
    bf16 KV cache (chat.py's: a multiple of 256 slots); a GPU also needs ~0.5 GiB for CUDA's context and activations.
    GiB, as GPU memory is sold ("16 GB" is 16 GiB)."""
    llm = LlamaArgs.preset("13b")
    cache = {n: 2 * llm.n_layers * n * llm.n_kv_heads * llm.head_dim * 2 / 2**30 for n in (2048, 1024)}  # K, V
    print(f"\n13B (LLaMA-2-13B + CLIP ViT-L/14-336), bf16 activations, int4 groups of {group_size}; KV cache "
          f"{cache[2048]:.2f} GiB for 2048 positions, {cache[1024]:.2f} for 1024 (one image and a short dialog):")
    for scheme in (None, *quantize.SCHEMES):
        with torch.device("meta"):
            model = QilinMedVL(QilinConfig(projector="mlp2x_gelu", llm=dataclasses.replace(llm))).to(torch.bfloat16)
            if scheme:
                quantize.quantize_model(model, scheme, group_size)
        embeddings, rest = (b / 2**10 for b in split_bytes(model))  # GiB
        weights = embeddings + rest
        print(f"  {scheme or 'bf16':5} weights {weights:5.2f} GiB (embeddings {embeddings:.2f}); with 2048 positions "
              f"{weights + cache[2048]:5.2f} GiB, with 1024 {weights + cache[1024]:5.2f} GiB")


if __name__ == "__main__":
    main()
