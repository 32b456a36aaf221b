"""Benchmark: serve.py under 1, 4 and 16 concurrent clients, batching what waits (--max-batch 16) against serving
requests one at a time (--max-batch 1). Prints requests/s, tokens/s and p50/p95 latency, and the ratios.

    python tests/bench_serve.py [--model runs/demo-stage2] [--requests 48] [--max-tokens 32]

Each client sends the demo's questions about its images (samples/stage2.json), greedy, non-streamed, through the
official openai client, one request after another; tokens are the answers' completion tokens as usage counts them.
By default every answer is --max-tokens long ("ignore_eos", as vLLM's benchmarks), since the demo's own answers are
a few tokens and would measure the HTTP and image handling rather than decoding; --natural measures those too.
"""

import argparse
import base64
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_serve import start  # noqa: E402  (serve.py as a user starts it)


def workload():
    """(image data URL, question) for every first question of the demo's stage-2 records."""
    out = []
    for record in json.loads((ROOT / "samples" / "stage2.json").read_text(encoding="utf-8")):
        if isinstance(record.get("image"), str):
            data = (ROOT / "samples" / "images" / record["image"]).read_bytes()
            url = "data:image/png;base64," + base64.b64encode(data).decode()
            out.append((url, record["conversations"][0]["value"].replace("<image>", "").strip()))
    return out


def run(base, clients, n_requests, max_tokens, work, ignore_eos):
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
    todo, lock, latencies, tokens = list(range(n_requests)), threading.Lock(), [], [0]

    def loop():
        while True:
            with lock:
                if not todo:
                    return
                k = todo.pop()
            url, question = work[k % len(work)]
            start = time.perf_counter()
            reply = client.chat.completions.create(model="qilin-med-vl", temperature=0, max_tokens=max_tokens,
                                                   extra_body={"ignore_eos": ignore_eos},
                                                   messages=[{"role": "user", "content": [
                                                       {"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": question}]}])
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += reply.usage.completion_tokens

    start = time.perf_counter()
    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20)
    return dict(rps=n_requests / wall, tps=tokens[0] / wall, p50=statistics.median(latencies), p95=q[18])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "runs" / "demo-stage2"))
    p.add_argument("--requests", type=int, default=48, help="requests per measurement")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--natural", action="store_true", help="stop answers at their EOS (the demo's are ~3 tokens); "
                   "default: every answer --max-tokens long (vLLM's ignore_eos), so decoding is what is measured")
    args = p.parse_args()
    work, results = workload(), {}
    with tempfile.NamedTemporaryFile("w", suffix=".log") as log:
        for max_batch in (16, 1):
            proc, base = start(args.model, log, "--max-batch", max_batch, "--max-queue", 256)
            try:
                run(base, 4, 8, args.max_tokens, work, not args.natural)  # warm up
                for clients in (1, 4, 16):
                    results[max_batch, clients] = run(base, clients, args.requests, args.max_tokens, work,
                                                      not args.natural)
            finally:
                proc.terminate()
                proc.wait(10)
    length = "answers stop at their EOS" if args.natural else f"answers of {args.max_tokens} tokens"
    print(f"{args.requests} requests each, greedy, {length}, model {args.model}")
    print(f"{'clients':>8} {'server':>14} {'requests/s':>11} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7}")
    for clients in (1, 4, 16):
        for max_batch, name in ((16, "batched (16)"), (1, "one at a time")):
            r = results[max_batch, clients]
            print(f"{clients:>8} {name:>14} {r['rps']:>11.2f} {r['tps']:>9.1f} {r['p50']:>7.3f} {r['p95']:>7.3f}")
        ratio = results[16, clients]["tps"] / results[1, clients]["tps"]
        print(f"{clients:>8} {'tokens/s ratio':>14} {ratio:>11.2f}x")


if __name__ == "__main__":
    main()
