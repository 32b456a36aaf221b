"""Figures for the data pipeline: preprocessing throughput on one core, and the share of padding
per batch with length_grouped_batches against random batches. Run: python tests/bench_data.py"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import (ALIGNMENT_PROMPTS, INSTRUCTION_PROMPTS, Tokenizer, concat_images,  # noqa: E402
                  length_grouped_batches, load_image, preprocess_image, render)

IMAGES = ROOT / "samples" / "images"
BATCH, RANKS, IMAGE_TOKENS, MAX_LENGTH = 16, 8, 576, 2048


def preprocessing_throughput(seconds=5.0):
    torch.set_num_threads(1)
    files = sorted(IMAGES.iterdir())
    samples = [[f] for f in files] + [files[0:2], files[2:5], files[5:9]]  # plus composites of 2, 3, 4
    n, images, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for sample in samples:
            x = preprocess_image(concat_images([load_image(f) for f in sample]), 336, "pad")
            n, images = n + 1, images + len(sample)
    rate = n / (time.perf_counter() - start)
    print(f"preprocessing: load_image + concat_images + preprocess_image(336, 'pad'), one thread, "
          f"{len(files)} real images (<= 512 px) and 3 composites of 2-4 images")
    print(f"  {rate:.0f} samples/s per core ({images / n:.2f} images per sample), output {tuple(x.shape)}")
    print(f"  needed: ~30 samples/s per 8-GPU node = ~4 per GPU's data worker -> {rate / 4:.0f}x headroom "
          f"(full-size PMC figures decode slower; JPEG decoding dominates there)")


def template_overhead(tok, stage):
    """Tokens a sample carries besides its own text and image features (mean over paper prompts)."""
    prompts = ALIGNMENT_PROMPTS if stage == 1 else [p.replace("<question>", "") for p in INSTRUCTION_PROMPTS]
    sizes = [len(render([{"from": "human", "value": p}, {"from": "gpt", "value": ""}], tok)[0]) - 1 for p in prompts]
    return int(round(np.mean(sizes)))  # -1: the placeholder becomes the image features


def padding_share(lengths, order):
    batches = lengths[np.asarray(order)].reshape(-1, BATCH)  # (n_batches, BATCH), one rank's batches
    return 1 - batches.sum() / (batches.max(1).sum() * BATCH)


def padding(name, lengths):
    grouped = [i for rank in range(RANKS) for batch in length_grouped_batches(lengths, BATCH, RANKS, rank, 0, 0)
               for i in batch]
    grouped_share = padding_share(lengths, grouped)
    shuffled = np.random.default_rng(0).permutation(len(lengths))
    shuffled = shuffled[:len(shuffled) // BATCH * BATCH]
    random_share = padding_share(lengths, shuffled)
    q = np.percentile(lengths, [5, 50, 95]).astype(int)
    print(f"  {name}: {len(lengths):,} samples, length p5/median/p95 {q[0]}/{q[1]}/{q[2]}: padding "
          f"{100 * random_share:.1f}% random batches -> {100 * grouped_share:.2f}% length-grouped "
          f"(target <= 5%) {'OK' if grouped_share <= 0.05 else 'OVER'}")


def main():
    preprocessing_throughput()
    tok = Tokenizer(ROOT / "tests" / "data" / "mistral-7b-v0.1.model")
    rng = np.random.default_rng(0)
    over1, over2 = template_overhead(tok, 1), template_overhead(tok, 2)
    print(f"padding per batch of {BATCH} x {RANKS} ranks; assumed lengths (ChiMed-VL, paper section 3): text tokens lognormal "
          f"around the medians, sigma 0.5 (stage 1 context, median 435) and 0.7 (stage 2 question, median 20; "
          f"answer, median 22), + {IMAGE_TOKENS} image tokens + the v1 template with a paper prompt "
          f"({over1} / {over2} tokens, LLaMA-style tokenizer), cut at {MAX_LENGTH}")
    stage1 = rng.lognormal(np.log(435), 0.5, 580_014) + over1 + IMAGE_TOKENS
    stage2 = rng.lognormal(np.log(20), 0.7, 469_441) + rng.lognormal(np.log(22), 0.7, 469_441) + over2 + IMAGE_TOKENS
    padding("stage 1", np.minimum(stage1.astype(int), MAX_LENGTH))
    padding("stage 2", np.minimum(stage2.astype(int), MAX_LENGTH))


if __name__ == "__main__":
    main()
