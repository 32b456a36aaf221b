"""train.py end to end on the CPU: real torchrun launches with 2 processes (gloo), the demo towers,
the demo tokenizer and the bundled medical images.

Each launch costs ~10 s of start-up, so runs are short (--max-steps) and shared where possible.
The first DeepSpeed start builds a small communication extension (~45 s), cached under
TORCH_EXTENSIONS_DIR, which the tests keep in one stable place.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import psutil
import pytest
import torch
from torch.utils.cpp_extension import _get_build_directory

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from conftest import ENV, free_port, launch  # noqa: E402
from checkpoint import read_safetensors  # noqa: E402
from model import QilinMedVL  # noqa: E402

def metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def initial_model(*argv):
    """The model train.py starts from, built the same way (the demo towers are seeded)."""
    args = train.parse_args(["--demo", *map(str, argv)])
    model, _ = train.build_model(args, torch.float32)
    return model


def kill_run(proc):
    """kill -9 a torchrun launch and its workers (torchrun starts each worker in a session of its
    own, so killing torchrun's process group would leave them training on)."""
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    for p in workers:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(workers, timeout=30)


def tensors(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "stage1"
    with mock.patch.dict(os.environ, TORCH_EXTENSIONS_DIR=ENV["TORCH_EXTENSIONS_DIR"]):  # the launched runs' cache
        built = any(n.endswith(".so") for n in os.listdir(_get_build_directory("deepspeed_shm_comm", verbose=False)))
    # ZeRO-2 (the stage-1 default); a checkpoint after step 2, for the tests that resume it
    proc = launch("--demo", "--stage", 1, "--max-steps", 3, "--save-every", 2, "--peak-tflops", 0.1, "--output", out)
    return out, proc, built


@pytest.fixture(scope="module")
def stage1(stage1_run):
    return stage1_run[0]


def test_deepspeed_start_is_explained_once(stage1_run):
    """DeepSpeed's notes come once, not once per process, and its one-time build is announced."""
    _, proc, built = stage1_run
    log = proc.stdout + proc.stderr
    assert "Setting accelerator to CPU" not in log and log.count("built successfully") <= 1
    assert ("building its shared-memory communication extension" in log) == (not built)


def test_stage1_trains_only_the_adapter(stage1):
    start = initial_model("--stage", 1)
    out = QilinMedVL.from_pretrained(stage1)  # the adapter + the demo towers it recorded
    assert json.loads((stage1 / "config.json").read_text())["model_type"] == "qilin_med_vl_projector"
    assert not same(tensors(start.projector), tensors(out.projector))
    assert same(tensors(start.vision), tensors(out.vision))
    assert same(tensors(start.llm), tensors(out.llm))
    rows = metrics(stage1)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["tokens"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows)
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] > 0  # warmup starts from 0, as transformers' schedule


def test_stage2_zero3_trains_adapter_and_llm_and_loads(stage1, tmp_path):
    out = tmp_path / "stage2"
    proc = launch("--demo", "--stage", 2, "--stage1-output", stage1, "--max-steps", 3, "--output", out)  # ZeRO-3
    assert "model: 1.3M parameters, 1.20M trained (stage 2)" in proc.stdout + proc.stderr  # whole sizes, not a rank's slice
    start = initial_model("--stage", 2, "--stage1-output", stage1)
    trained = QilinMedVL.from_pretrained(out)
    assert same(tensors(start.vision), tensors(trained.vision))
    assert same(tensors(start.projector), {k: v for k, v in tensors(QilinMedVL.from_pretrained(stage1).projector).items()})
    before, after = tensors(start.llm), tensors(trained.llm)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert set(before) - set(changed) == set(), f"LLM tensors that did not train: {set(before) - set(changed)}"
    assert not same(tensors(start.projector), tensors(trained.projector))
    assert (out / "tokenizer.model").is_file() and not (out.parent / "stage2.tmp").exists()


def test_kill_and_resume_equals_an_uninterrupted_run(stage1, tmp_path):
    # stage 2, ZeRO-3: 28 samples, 2 ranks x batch 2 -> 7 steps an epoch, 3 epochs. One image is
    # corrupt: its 2 samples are dropped each time they come up, and the count must survive the kill.
    images = tmp_path / "images"
    shutil.copytree(ROOT / "samples" / "images", images)
    (images / "retina_fundus.jpg").write_bytes(b"not an image")
    common = ["--demo", "--stage", 2, "--stage1-output", stage1, "--image-root", images, "--batch-size", 2,
              "--epochs", 3, "--log-sample-ids"]
    launch(*common, "--output", tmp_path / "straight", "--save-every", 100)
    reference = metrics(tmp_path / "straight")
    assert len(reference) == 21
    assert 0 < reference[5]["skipped"] < reference[-1]["skipped"] == 6  # drops before any checkpoint, and after

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *map(str, common), "--output", str(killed), "--save-every", "3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:  # kill -9 the whole run once it is past step 8
            path = killed / "metrics.jsonl"
            if path.is_file() and len(path.read_text().splitlines()) >= 8:
                kill_run(proc)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            kill_run(proc)
    done = len((killed / "metrics.jsonl").read_text().splitlines())
    assert proc.returncode == -signal.SIGKILL and done < 21, f"the run ended ({proc.returncode}) before it was killed"
    assert not (killed / "config.json").exists()
    latest = int((killed / "checkpoints" / "latest").read_text().removeprefix("step-"))
    assert latest % 3 == 0 and 6 <= latest <= done, (latest, done)  # a checkpoint mid-run, steps after it to redo
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": %d, "epoch": 1.2, "lo' % (done + 1))  # as if the kill came while a line was written

    launch(*common, "--output", killed, "--save-every", 3, "--resume")
    resumed = metrics(killed)
    assert [r["step"] for r in resumed] == list(range(1, 22))
    for a, b in zip(reference, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
        assert a["ids"] == b["ids"] and a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["skipped"] == b["skipped"], (a, b)
    all_ids = sorted(r["id"] for r in json.loads((ROOT / "samples" / "stage2.json").read_text())
                     if r["image"] != "retina_fundus.jpg")
    for epoch in (0, 1, 2):  # every sample exactly once an epoch: nothing skipped, nothing repeated
        seen = sorted(i for r in resumed[7 * epoch:7 * epoch + 7] for i in r["ids"])
        assert seen == all_ids
    assert same(tensors(QilinMedVL.from_pretrained(tmp_path / "straight")), tensors(QilinMedVL.from_pretrained(killed)))


def test_two_nodes_rendezvous(tmp_path):
    port, out = free_port(), tmp_path / "two-nodes"
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "train.py", "--demo", "--stage", "1", "--max-steps", "2", "--output", str(out)],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "2 processes" in logs[0] and (out / "projector.safetensors").is_file()
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_some_images_missing_are_skipped_and_reported(tmp_path):
    images = tmp_path / "images"
    shutil.copytree(ROOT / "samples" / "images", images)
    (images / "head_ct.png").unlink()
    (images / "retina_fundus.jpg").unlink()
    proc = launch("--demo", "--stage", 1, "--image-root", images, "--max-steps", 1, "--output", tmp_path / "out", nproc=None)
    assert "kept 11 of 13" in proc.stdout + proc.stderr and "missing_image 2" in proc.stdout + proc.stderr
    assert metrics(tmp_path / "out")[0]["skipped"] == 2


@pytest.mark.parametrize("case", ["missing data", "data not JSON", "no images", "no stage 1", "bad stage 1",
                                  "stage 1 lacks keys", "unsupported LLM"])
def test_bad_inputs_fail_clearly_before_writing(case, tmp_path):
    out = tmp_path / "out"
    for folder, config in (("s1", {"model_type": "qilin_med_vl_projector", "projector": "linear"}),
                           ("clip", {}), ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}})):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(json.dumps(config))
    (tmp_path / "cut.json").write_text('[{"id": "a", "image": "chest_xray.png", "conv')
    argv = {"missing data": ["--stage", 1, "--data", tmp_path / "nope.json"],
            "data not JSON": ["--stage", 1, "--data", tmp_path / "cut.json"],
            "no images": ["--stage", 1, "--image-root", tmp_path],
            "no stage 1": ["--stage", 2, "--stage1-output", tmp_path / "nope"],
            "bad stage 1": ["--stage", 2, "--stage1-output", ROOT / "samples"],
            "stage 1 lacks keys": ["--stage", 2, "--stage1-output", tmp_path / "s1"],
            "unsupported LLM": ["--stage", 1, "--vision", tmp_path / "clip", "--llm", tmp_path / "llama"]}[case]
    expected = {"missing data": "nope.json: no such file", "data not JSON": "cut.json: not valid JSON",
                "no images": "missing_image 13",
                "no stage 1": "run stage 1 first", "bad stage 1": "no config.json",
                "stage 1 lacks keys": "lacks style, vision_path, llm_path", "unsupported LLM": "not supported"}[case]
    proc = launch("--demo", *argv, "--output", out, nproc=None, check=False)
    assert proc.returncode != 0 and expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_refuses_an_output_folder_holding_another_run(stage1, tmp_path):
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in stage1.rglob("*") if p.is_file()}
    proc = launch("--demo", "--stage", 1, "--output", stage1, nproc=None, check=False)
    assert proc.returncode != 0 and "already holds another run" in proc.stderr and "--overwrite" in proc.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in stage1.rglob("*") if p.is_file()} == before
    proc = launch("--demo", "--stage", 1, "--output", tmp_path / "empty", "--resume", nproc=None, check=False)
    assert proc.returncode != 0 and "no checkpoints/latest" in proc.stderr
    # A resumption with other settings stops before DeepSpeed starts or anything is loaded or trimmed.
    proc = launch("--demo", "--stage", 1, "--max-steps", 3, "--save-every", 2, "--lr", 0.5, "--output", stage1,
                  "--resume", nproc=None, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "world_size was 2, now 1" in proc.stderr and "lr was 0.002, now 0.5" in proc.stderr
    assert "batch_size" not in proc.stderr  # only what differs
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in stage1.rglob("*") if p.is_file()} == before


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    # Step 1 runs at lr 0 (warmup), step 2 at lr 1e37 blows the adapter up, step 3's loss is NaN.
    proc = launch("--demo", "--stage", 1, "--lr", 1e37, "--max-steps", 6, "--warmup-ratio", 0.1, "--save-every", 1,
                  "--output", out, check=False)
    assert proc.returncode != 0 and "step 3: the loss is nan" in proc.stderr, proc.stderr[-3000:]
    assert "checkpoints/step-00000002" in proc.stderr
    tag = (out / "checkpoints" / "latest").read_text()
    assert tag == "step-00000002" and [d for d in os.listdir(out / "checkpoints") if d.startswith("step-")] == [tag]
    assert any((out / "checkpoints" / tag).iterdir()) and not (out / "projector.safetensors").exists()
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_help_and_deepspeed_config(capsys, tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "--stage1-output" in proc.stdout and "csv_monitor" in proc.stdout
    args = train.parse_args(["--stage", "2", "--stage1-output", "s1", "--data", "d", "--image-root", "i", "--output", "o"])
    assert (args.batch_size, args.lr, args.epochs, args.zero, args.max_length) == (16, 2e-5, 1, 3, 2048)
    config = train.deepspeed_config(args, world_size=8, on_gpu=True)
    assert config["train_batch_size"] == 128 and config["zero_optimization"]["stage"] == 3
    assert config["optimizer"]["params"]["weight_decay"] == 0.0
    assert [round(train.warmup_cosine(s, 3, 100), 6) for s in (0, 3, 100)] == [0.0, 1.0, 0.0]
    override = tmp_path / "ds.json"  # a section is merged key by key; anything else is replaced
    override.write_text(json.dumps({"zero_optimization": {"stage3_max_live_parameters": 10**8},
                                    "gradient_clipping": 0.5, "csv_monitor": {"enabled": True}}))
    args.deepspeed_config = str(override)
    merged = train.deepspeed_config(args, world_size=8, on_gpu=True)
    assert merged["zero_optimization"] == dict(config["zero_optimization"], stage3_max_live_parameters=10**8)
    assert merged["gradient_clipping"] == 0.5 and merged["csv_monitor"] == {"enabled": True}
    assert {k: v for k, v in merged.items() if k not in ("zero_optimization", "gradient_clipping", "csv_monitor")} \
        == {k: v for k, v in config.items() if k not in ("zero_optimization", "gradient_clipping")}
    args = train.parse_args(["--stage", "1", "--vision", "v", "--llm", "l", "--data", "d", "--image-root", "i",
                             "--output", "o", "--local_rank", "3"])  # DeepSpeed's launcher adds --local_rank
    assert (args.batch_size, args.lr, args.zero) == (32, 1e-3, 2)
    for argv, message in ((["--batch-size", "0"], "--batch-size must be at least 1"),
                          (["--max-steps", "-1"], "--max-steps must be at least 1"),
                          (["--lr", "0"], "--lr must be above 0"), (["--warmup-ratio", "1"], "--warmup-ratio must be"),
                          (["--resume", "--overwrite"], "--resume continues the run in --output and --overwrite deletes it")):
        with pytest.raises(SystemExit):
            train.parse_args(["--demo", "--stage", "1", *argv])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 100), (7, 21), (1, 2), (0, 1)])
def test_warmup_cosine_is_transformers_schedule_step_by_step(warmup, total):
    """The lr multiplier at every step of the run equals transformers' get_cosine_schedule_with_warmup's, which
    LLaVA trains with: the same warmup from 0, the same last step, the same end at 0."""
    from transformers import get_cosine_schedule_with_warmup
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference, theirs = get_cosine_schedule_with_warmup(optimizer, warmup, total), []
    for _ in range(total + 1):  # steps 0 .. total - 1 train; total is where it ends
        theirs.append(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    assert [train.warmup_cosine(step, warmup, total) for step in range(total + 1)] == pytest.approx(theirs, abs=1e-12)


# ----------------------------------------------------------------------------- runs that users break

def start(*args, nproc=2):
    """A run in a session of its own, as from a terminal: (process, its stderr file)."""
    cmd = [sys.executable, "train.py", *map(str, args)]
    if nproc:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = dict(ENV, MASTER_PORT=str(free_port()))
    err = open(Path(str(args[args.index("--output") + 1]) + ".stderr"), "w+")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True), err


def wait_for_steps(proc, out, n, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = out / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {n} ({proc.poll()})")


def test_kill_9_of_torchrun_stops_its_workers(stage1, tmp_path):
    out = tmp_path / "run"
    proc, _ = start("--demo", "--stage", 2, "--stage1-output", stage1, "--save-every", 5, "--output", out)
    try:
        wait_for_steps(proc, out, 3)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) == 2
        proc.kill()  # the launcher alone, as `kill -9 PID` of torchrun does
        proc.wait(timeout=10)
        t = time.time()
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == [], "workers kept running after their launcher was killed"
        print(f"workers gone {time.time() - t:.1f} s after torchrun was killed")
        files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        time.sleep(2)
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files  # nothing more written
    finally:
        if proc.poll() is None:
            kill_run(proc)


@pytest.mark.parametrize("launcher", ["torchrun", "python"])
def test_ctrl_c_stops_with_one_line_and_the_resume_command(stage1, tmp_path, launcher):
    out = tmp_path / "run"
    proc, err = start("--demo", "--stage", 2, "--stage1-output", stage1, "--save-every", 2, "--output", out,
                      nproc=2 if launcher == "torchrun" else None)
    try:
        wait_for_steps(proc, out, 5)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole foreground group
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_run(proc)
    err.seek(0)
    log = err.read()
    ours = [line for line in log.splitlines() if line.startswith("train.py: ")]
    assert len(ours) == 1 and "train.py: stopped at step" in ours[0], log[-3000:]
    assert f"{out}/checkpoints/step-0000000" in ours[0] and ours[0].endswith("--resume")
    assert ("torchrun --nproc_per_node 2 train.py" if launcher == "torchrun" else "python train.py") in ours[0]
    assert 'train.py", line' not in log  # no traceback from our processes (torchrun adds its own report)
    if launcher == "python":
        assert proc.returncode == 130
    step = int(ours[0].split("stopped at step ")[1].split()[0])
    assert len(metrics(out)) == step


def test_an_input_error_under_torchrun_is_the_root_cause_of_its_report(tmp_path):
    proc = launch("--demo", "--stage", 1, "--data", tmp_path / "nope.json", "--output", tmp_path / "out", check=False)
    assert proc.returncode != 0
    report = proc.stderr[proc.stderr.index("Root Cause"):]
    assert f"traceback : train.py: error: --data {tmp_path / 'nope.json'}: no such file" in report, report
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, message", [(["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
                                           (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'")])
def test_a_flag_error_under_torchrun_is_one_line_and_the_root_cause(tmp_path, flag, message):
    """argparse's errors take the path of every input error: one line from rank 0, no usage, and torchrun's error
    file, so that its report names the cause instead of `error_file: <N/A>`."""
    proc = launch("--demo", "--stage", 1, *flag, "--output", tmp_path / "out", check=False)
    ours = [line for line in proc.stderr.splitlines() if line.startswith(("train.py: error", "usage:"))]
    assert proc.returncode != 0 and ours == [f"train.py: error: {message}"], proc.stderr[-3000:]
    assert f"traceback : train.py: error: {message}" in proc.stderr[proc.stderr.index("Root Cause"):]


@pytest.mark.parametrize("stage,zero", [(1, 2), (1, 3), (2, 2), (2, 3)])
def test_mostly_text_only_data_trains(stage1, tmp_path, stage, zero):
    """LLaVA mixes text-only dialogs into stage 2. Micro-batches of text only still run the
    vision tower and the adapter (on a zero image), so backward has a gradient path and ZeRO-3's
    collectives match across ranks; every step ends with a finite loss."""
    records = json.loads((ROOT / "samples" / f"stage{stage}.json").read_text(encoding="utf-8"))
    mixed = [dict(r, id=f"text-{k}") for k, r in enumerate(records) for _ in range(3)]
    for r in mixed:
        r.pop("image")
        for t in r["conversations"]:
            t["value"] = t["value"].replace("<image>\n", "").replace("<image>", "")
    mixed[::8] = [r for r in records[:len(mixed[::8])]]  # one sample in eight has an image
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(mixed, ensure_ascii=False), encoding="utf-8")
    s1 = ["--stage1-output", stage1] if stage == 2 else []
    launch("--demo", "--stage", stage, *s1, "--zero", zero, "--data", data, "--batch-size", 2, "--max-steps", 6,
           "--output", tmp_path / "out")
    rows = metrics(tmp_path / "out")
    assert len(rows) == 6 and all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows)


def test_grad_accum_kill_and_resume_mid_accumulation(tmp_path):
    """Three micro-batches per optimizer step; the kill most likely lands inside an accumulation.
    The resumed run redoes the step from its checkpoint: the same losses and samples as a run
    that was never interrupted."""
    common = ["--demo", "--stage", 1, "--batch-size", 1, "--grad-accum", 3, "--epochs", 4, "--save-every", 2,
              "--log-sample-ids"]
    launch(*common, "--output", tmp_path / "straight")
    reference = metrics(tmp_path / "straight")
    assert len(reference) == 8 and all(len(r["ids"]) == 2 * 3 for r in reference)  # 2 ranks x 3 micro-batches
    out = tmp_path / "killed"
    proc, _ = start(*common, "--output", out)
    try:
        wait_for_steps(proc, out, 3)
        time.sleep(0.05)
    finally:
        kill_run(proc)
    launch(*common, "--output", out, "--resume")
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(reference, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and a["ids"] == b["ids"], (a, b)


def test_release_style_with_mlp2x_gelu_trains_and_chats(tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    launch("--demo", "--stage", 1, "--style", "release", "--projector", "mlp2x_gelu", "--max-steps", 2, "--output", s1)
    launch("--demo", "--stage", 2, "--stage1-output", s1, "--max-steps", 2, "--output", s2)  # takes stage 1's choices
    model = QilinMedVL.from_pretrained(s2)
    assert (model.config.projector, model.config.style) == ("mlp2x_gelu", "release")
    assert all(math.isfinite(r["loss"]) for r in metrics(s1) + metrics(s2))
    proc = subprocess.run([sys.executable, "chat.py", "samples/images/head_ct.png", "--model", str(s2), "--question",
                           "这是什么类型的医学影像？", "--max-new-tokens", "8"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


def test_overwrite_replaces_an_earlier_run(stage1, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stage1, out)
    (out / "notes.txt").write_text("from the earlier run")
    launch("--demo", "--stage", 1, "--max-steps", 1, "--output", out, "--overwrite")
    assert not (out / "notes.txt").exists() and not (out / "checkpoints").exists()
    assert [r["step"] for r in metrics(out)] == [1] and (out / "projector.safetensors").is_file()


def test_bf16_on_the_cpu(tmp_path):
    """bf16 weights with float32 master copies, as on a GPU, where the CPU has bf16 kernels."""
    launch("--demo", "--stage", 1, "--precision", "bf16", "--max-steps", 3, "--output", tmp_path / "out")
    rows = metrics(tmp_path / "out")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert json.loads((tmp_path / "out" / "args.json").read_text())["precision"] == "bf16"
    projector = read_safetensors(str(tmp_path / "out" / "projector.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in projector.values())
