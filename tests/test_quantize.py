"""quantize.py: each quantized linear against its float reference, the trained demo model's answers and loss after
int8 and int4, a tiny random model's logits, quantized folders through chat.py (batched, compiled, peak memory),
and the one-line refusals.

The demo model is the README's (runs/demo-stage2, trained by its first command); if it is missing, it is trained
here as tests/test_demo.py does (about two minutes on two cores).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import chat
import export
import quantize
from conftest import ROOT, launch
from data import STAGE_TEMPLATE, Tokenizer, build_conversation, expand_images, image_files, render
from test_chat import CHEST, TOKENIZER, tiny_model

IMAGES, DEMO_TOKENIZER = ROOT / "samples" / "images", ROOT / "samples" / "tokenizer.model"


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    if (ROOT / "runs" / "demo-stage2" / "model.safetensors").is_file():
        return str(ROOT / "runs" / "demo-stage2")
    out = tmp_path_factory.mktemp("demo")
    launch("--demo", "--stage", 1, "--output", out / "stage1", timeout=600)
    launch("--demo", "--stage", 2, "--stage1-output", out / "stage1", "--output", out / "stage2", timeout=600)
    return str(out / "stage2")


@pytest.fixture(scope="module")
def folders(demo_model, tmp_path_factory):
    """The demo model written by quantize.py's command, int8 and int4 (groups of 32: its MLP is 352 wide)."""
    out = tmp_path_factory.mktemp("quantized")
    for scheme, flags in (("int8", ["--int8"]), ("int4", ["--int4", "--group-size", "32"])):
        assert quantize.main([demo_model, str(out / scheme), *flags]) == 0
    return {"int8": str(out / "int8"), "int4": str(out / "int4")}


# ----------------------------------------------------------------------------- one linear at a time

@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_each_quantized_linear_is_within_half_a_step_of_its_float_reference(scheme):
    """Every weight is within half its scale of the float one, so y = x @ W.T is within sum_i |x_i| * scale / 2
    (per output, the scale of input i's group): checked for each of a model's quantized linears, for one row (the
    compiled decode path) and for several (dequantize, then BLAS)."""
    full = tiny_model()
    reference = {name: full.get_submodule(name).weight.clone() for name in quantize.quantized_linears(full)}
    model = quantize.quantize_model(full, scheme, group_size=32)
    assert len(reference) == 4 * 7 + 1 and model.llm.embed_tokens.weight.dtype == torch.float32  # embeddings float
    assert not any(isinstance(m, torch.nn.Linear) for m in model.llm.modules())
    torch.manual_seed(0)
    for name, w in reference.items():
        layer = model.get_submodule(name)
        stored = {k: getattr(layer, k) for k in ("weight", "scales", "zeros") if hasattr(layer, k)}
        w_hat = quantize.dequantize(scheme, *stored.values())
        step = (stored["scales"][:, None].expand_as(w) if scheme == "int8"  # (out, in): each weight's scale
                else stored["scales"].repeat_interleave(32, 1))
        assert ((w - w_hat).abs() <= step / 2 * (1 + 1e-5)).all(), name
        for rows in (1, 5):
            x = torch.randn(rows, w.shape[1])
            bound = x.abs() @ (step / 2).T + 1e-4  # (rows, out)
            error = (layer(x) - F.linear(x, w)).abs()
            assert (error <= bound).all(), (name, rows, (error / bound).max().item())
            assert error.max() > 0  # it is quantized


def test_int4_refuses_a_group_size_that_does_not_divide_a_layer():
    with pytest.raises(ValueError, match="--group-size 128 does not divide llm.layers.0.mlp.down_proj's 352"):
        quantize.quantize_model(tiny_model(), "int4", group_size=128)


# ----------------------------------------------------------------------------- the trained demo model

def demo_questions():
    """Every (image files, dialog up to a question, the trained answer) of the demo's stage-2 data."""
    questions = []
    for record in json.loads((ROOT / "samples" / "stage2.json").read_text(encoding="utf-8")):
        turns = record["conversations"]
        for k in range(1, len(turns), 2):
            questions.append(([str(IMAGES / f) for f in image_files(record)], turns[:k], turns[k]["value"]))
    return questions


def teacher_forced_loss(model, tokenizer, questions):
    """The mean cross-entropy of the trained answers' tokens, given their dialogs (as stage 2 learned them)."""
    losses = []
    with torch.no_grad():
        for paths, turns, answer in questions:
            record = {"image": "image", "conversations": turns + [{"from": "gpt", "value": answer}]}
            ids, labels = render(build_conversation(record, 2, model.config.style), tokenizer,
                                 STAGE_TEMPLATE[(2, model.config.style)])
            ids, labels = expand_images(ids, model.num_image_tokens, labels)
            losses.append(model(torch.tensor([ids]), chat.load_pixels(paths, model), torch.tensor([labels]))[1])
    return torch.stack(losses).mean().item()


def answers(model, tokenizer, questions):
    """Greedy answers, all questions in one left-padded batch."""
    prompts = [chat.prompt_ids(turns, tokenizer, model.config.style) for _, turns, _ in questions]
    pixels = torch.cat([chat.load_pixels(paths, model) for paths, _, _ in questions])
    return [tokenizer.decode(ids) for ids in chat.generate_batch(model, prompts, pixels, 16, tokenizer.eos_id)]


def test_demo_model_quantized_answers_and_loss(demo_model, folders):
    """int8 gives the full model's greedy answer to every demo question; the teacher-forced loss over the trained
    answers moves by at most 1% (int8) and 5% (int4); int4's agreement and both logits' errors are printed."""
    questions = demo_questions()
    full, tokenizer = chat.load_model(demo_model)
    expected, loss = answers(full, tokenizer, questions), teacher_forced_loss(full, tokenizer, questions)
    assert sum(a == q[2] for a, q in zip(expected, questions)) >= 0.9 * len(questions)  # it learned them
    ids = torch.tensor([expand_images(chat.prompt_ids(questions[0][1], tokenizer, "paper"), full.num_image_tokens)])
    with torch.no_grad():
        logits = full(ids, chat.load_pixels(questions[0][0], full))[0]
    for scheme, bound in (("int8", 0.01), ("int4", 0.05)):
        model, _ = chat.load_model(folders[scheme])
        got, q_loss = answers(model, tokenizer, questions), teacher_forced_loss(model, tokenizer, questions)
        with torch.no_grad():
            error = ((model(ids, chat.load_pixels(questions[0][0], model))[0] - logits).norm() / logits.norm()).item()
        agree = sum(a == b for a, b in zip(got, expected))
        print(f"{scheme}: {agree}/{len(questions)} greedy answers as the full model's; teacher-forced loss "
              f"{loss:.4f} -> {q_loss:.4f} ({(q_loss - loss) / loss:+.2%}); logits' relative error {error:.4f}")
        if scheme == "int8":
            assert got == expected
        assert abs(q_loss - loss) <= bound * loss


def test_quantized_folder_chats_from_the_command_line(demo_model, folders, capsys):
    """chat.py --model QUANTIZED and --quantize at load time give the trained answer."""
    question = ["samples/images/head_ct.png", "--question", "图中显示的是哪个部位？"]
    for flags in (["--model", folders["int4"]], ["--model", demo_model, "--quantize", "int8"]):
        assert chat.main([*question, *flags]) == 0
        assert capsys.readouterr().out.strip() == "头部。"  # the trained answer


def test_evaluate_scores_a_quantized_folder_as_the_full_model(demo_model, folders, tmp_path, capsys):
    """evaluate.py on the demo's own questions: the int8 folder's answers are the full model's, batched."""
    import evaluate

    tables = {}
    for name, model in (("full", demo_model), ("int8", folders["int8"])):
        out = tmp_path / f"{name}.jsonl"
        assert evaluate.main(["--model", model, "--data", str(ROOT / "samples" / "stage2.json"), "--image-root",
                              str(ROOT / "samples" / "images"), "--out", str(out), "--batch-size", "8"]) == 0
        tables[name] = [json.loads(line)["prediction"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert tables["int8"] == tables["full"] and len(tables["full"]) >= 13


# ----------------------------------------------------------------------------- a random model

def test_random_model_quantized_logits_and_batched_compiled_decoding(tmp_path):
    """A tiny random model: int8 and int4 logits within a few percent; a quantized folder loads to the same
    module as quantizing at load time; batched left-padded decoding equals one by one, and the compiled
    step (torch.compile, mode reduce-overhead) equals eager."""
    tokenizer = Tokenizer(TOKENIZER)
    tiny_model().save_pretrained(tmp_path / "full", tokenizer=TOKENIZER)
    full, _ = chat.load_model(str(tmp_path / "full"))
    pixels = torch.cat([chat.load_pixels([CHEST], full), chat.load_pixels([IMAGES / "head_ct.png"], full)])
    prompts = [chat.prompt_ids([{"from": "human", "value": q}], tokenizer, "paper") for q in ("What is it?", "这是什么？")]
    ids = torch.tensor([expand_images(prompts[0], full.num_image_tokens)])
    with torch.no_grad():
        logits = full(ids, pixels[:1])[0]
    for scheme, bound in (("int8", 0.05), ("int4", 0.6)):  # 4 bits: ~10% of a random weight
        assert quantize.main([str(tmp_path / "full"), str(tmp_path / scheme), f"--{scheme}", "--group-size", "32"]) == 0
        model, _ = chat.load_model(str(tmp_path / scheme))
        at_load, _ = chat.load_model(str(tmp_path / "full"), quantize=scheme, group_size=32)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), at_load.state_dict().values()))
        with torch.no_grad():
            error = ((model(ids, pixels[:1])[0] - logits).norm() / logits.norm()).item()
        print(f"random model, {scheme}: logits' relative error {error:.4f}")
        assert 0 < error < bound
        batched = chat.generate_batch(model, prompts, pixels, 12, tokenizer.eos_id)
        alone = [chat.generate_batch(model, [p], pixels[b:b + 1], 12, tokenizer.eos_id)[0] for b, p in enumerate(prompts)]
        assert batched == alone and len(set(batched[0])) > 3
        if scheme == "int8":
            assert chat.generate_batch(model, prompts[:1], pixels[:1], 12, tokenizer.eos_id, compile=True) == alone[:1]


PEAK_RSS = """import re, sys, torch, chat, quantize
def rss(key):  # MiB, from /proc: VmHWM is the peak since the process started
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
quantize.int8_matvec(torch.ones(1, 64), torch.ones(8, 64, dtype=torch.int8), torch.ones(8))  # the compiler's ~70 MB
before = rss("VmRSS")
model, tokenizer = chat.load_model(sys.argv[1])
chat.generate_batch(model, [[1, 2, 3]], None, 2, None)  # as chat.py decodes: every weight read
print(rss("VmHWM") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures memory through Linux's /proc")
def test_a_quantized_folder_loads_in_less_memory(tmp_path):
    """Width 512, 16 layers, the demo's vocabulary: the LLM's linears are nearly all of its 220 MB; loading and running
    the int8 folder peaks at well under the full model's resident memory."""
    import dataclasses
    from llama import LlamaArgs
    from model import QilinConfig, QilinMedVL
    from vit import VisionArgs
    llm = dataclasses.replace(LlamaArgs.preset("demo"), dim=512, n_layers=16, n_heads=8, n_kv_heads=8,
                              intermediate_size=1536, vocab_size=Tokenizer(DEMO_TOKENIZER).vocab_size)
    QilinMedVL(QilinConfig(vision=VisionArgs.preset("demo"), llm=llm)).save_pretrained(tmp_path / "full", DEMO_TOKENIZER)
    assert quantize.main([str(tmp_path / "full"), str(tmp_path / "int8"), "--int8"]) == 0
    peaks = {}
    for name in ("full", "int8"):
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path / name)], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr
        peaks[name] = float(proc.stdout.split()[-1])
    print(f"peak RSS while loading and running: full {peaks['full']:.0f} MiB, int8 {peaks['int8']:.0f} MiB")
    assert peaks["int8"] < 0.7 * peaks["full"]


# ----------------------------------------------------------------------------- bad input: one line each

def test_refusals_are_one_line(demo_model, folders, tmp_path, capsys):
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    for f in os.listdir(folders["int8"]):
        (unknown / f).write_bytes((ROOT / folders["int8"] / f).read_bytes())
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(dict(config, quantization={"scheme": "nf4"})))
    head = ["samples/images/head_ct.png", "--question", "?"]
    for main, args, expected in (
            (quantize.main, (demo_model, tmp_path / "x", "--int4"),
             "--group-size 128 does not divide llm.layers.0.mlp.down_proj's 352 input channels"),
            (quantize.main, (folders["int8"], tmp_path / "y", "--int4", "--group-size", "32"), "is already quantized"),
            (chat.main, (*head, "--model", folders["int8"], "--quantize", "int4"), "is already quantized (int8): load"),
            (chat.main, (*head, "--model", unknown), "quantization {'scheme': 'nf4'} is not a scheme this loader knows"),
            (chat.main, (*head, "--model", demo_model, "--quantize", "int4", "--group-size", "100"), "does not divide"),
            (export.main, (folders["int4"], tmp_path / "exported"), "a quantized model")):
        assert main(list(map(str, args))) == 1
        err = capsys.readouterr().err
        assert expected in err and len(err.splitlines()) == 1, err
    assert not any(os.path.exists(tmp_path / name) for name in ("x", "y", "exported"))
    proc = launch("--demo", "--stage", 2, "--stage1-output", folders["int8"], "--output", tmp_path / "t", nproc=None,
                  check=False)
    assert proc.returncode != 0 and "a quantized model" in proc.stderr and "Traceback" not in proc.stderr
