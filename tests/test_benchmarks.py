"""The GPU benchmark's own code, run at a tiny size on the CPU (`--cpu-smoke`), so that the one
command that measures a lent GPU cannot rot between GPU runs: every part must run, train.py's
step under ZeRO-2 and ZeRO-3 with and without --compile, and the decoders must agree."""

import subprocess
import sys

from conftest import ENV, ROOT


def test_bench_gpu_runs_every_part_on_the_cpu():
    proc = subprocess.run([sys.executable, "tests/bench_gpu.py", "--cpu-smoke"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    summary = out[out.index("== summary"):]
    print(summary)
    assert "FAILED" not in out, out[-4000:]
    for row in ("ours, forward+backward", "transformers sdpa", "ours stage 1",
                "train.py stage 2, ZeRO-2, batch", "train.py stage 2, ZeRO-2, --compile", "train.py stage 2, ZeRO-3, batch",
                "train.py stage 2, ZeRO-3, --compile", "train.py stage 1, ZeRO-2", "stage 1 on 8 x A100",
                "chat.generate eager", "chat.generate compiled", "transformers generate, static cache"):
        assert f") {row}" in summary, row
    assert "tokens agreeing with eager: chat.generate compiled (CUDA graph) 8 of 8" in summary
