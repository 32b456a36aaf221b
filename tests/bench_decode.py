"""Decoding speed of chat.py against transformers' generate, on the same random llava-hf model.

A LLaVA-shaped model small enough for a CPU (text width 512, 8 layers; a narrow CLIP tower at
336 px / patch 14, so the prompt carries the real 576 image features), in float32. Both sides
decode greedily from the same prompt; the script checks that they write the same tokens.

    python tests/bench_decode.py [--new-tokens 64] [--repeats 3] [--threads N]

Prefill is the time to the first new token (vision tower, adapter, prompt); decode speed is the
other N - 1 tokens over the time from the first to the last. Both are timestamped as each token
comes out (transformers through a streamer); the medians of interleaved runs are printed.
"""

import argparse
import shutil
import statistics
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
from data import IMAGE_TOKEN_INDEX  # noqa: E402

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
    try:
        reference.save_pretrained(folder)
        shutil.copyfile(TOKENIZER, folder / "tokenizer.model")
        model, tokenizer = chat.load_model(str(folder))
    finally:
        shutil.rmtree(folder)
    pixels = chat.load_pixels([IMAGE], model)
    prompt = chat.prompt_ids([{"from": "human", "value": "Describe this image in detail."}], tokenizer, "release")
    k = prompt.index(IMAGE_TOKEN_INDEX)
    hf_ids = torch.tensor([prompt[:k] + [config.image_token_index] * 576 + prompt[k + 1:]])
    print(f"model: text {args.dim} x {args.layers} layers, vocab 32001, CLIP 336/14 -> 576 patches; prompt {hf_ids.shape[1]} positions; "
          f"float32, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")

    def ours():
        times, tokens = [], []
        for token in chat.generate(model, [prompt], pixels, N):  # greedy, no EOS: exactly N tokens
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

    timed(ours), timed(theirs)  # warm up both
    runs = {"chat.py": [], "transformers": []}
    for _ in range(args.repeats):  # interleaved, so a busy moment of the machine hits both
        runs["chat.py"].append(timed(ours))
        runs["transformers"].append(timed(theirs))
    rows = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs), rs[0][2])
            for name, rs in runs.items()}
    same = rows["chat.py"][2] == rows["transformers"][2]
    assert same, "greedy tokens differ between chat.py and transformers"
    print(f"{'':14}{'prefill s':>11}{'decode tok/s':>14}")
    for name, (t1, speed, _) in rows.items():
        print(f"{name:14}{t1:>11.3f}{speed:>14.1f}")
    ratio = rows["chat.py"][1] / rows["transformers"][1]
    print(f"decode speed-up: {ratio:.2f}x transformers' generate (target: at least 1.2x); "
          f"the {N} greedy tokens are identical ({len(set(rows['chat.py'][2]))} distinct)")

    # Batch-1 decoding of the real 13B model is bound by memory bandwidth (every weight is read for
    # every token): tests/bench_gpu.py (part c) measures it on a GPU against that limit.


if __name__ == "__main__":
    main()
