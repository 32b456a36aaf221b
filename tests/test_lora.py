"""lora.py: LoRA on the LLM's linear layers, PEFT's file format, and train.py --lora under torchrun.

In-process tests use a tiny random model in fp32 on the CPU, built as train.py builds it (towers from Hugging Face
folders on disk, the base of a LoRA run); PEFT on transformers' LlamaForCausalLM is the reference. The launched runs
train the demo with 2 processes (gloo) under ZeRO-3 and ZeRO-2, as a user would, and are kept few and short.
"""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import chat
import lora
import train
from checkpoint import CheckpointError, read_safetensors, read_stage1_config
from conftest import launch
from data import IMAGE_TOKEN_INDEX, SAMPLES, Tokenizer, expand_images, load_image
from llama import LlamaArgs
from model import QilinConfig, QilinMedVL
from test_train import kill_run, metrics, start, wait_for_steps
from vit import VisionArgs

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(SAMPLES / "tokenizer.model")
CHEST = str(SAMPLES / "images" / "chest_xray.png")
QUESTION = "这是什么类型的医学影像？"


def tiny(folder, seed=0):
    """A tiny model whose towers come from folders written under `folder` (vision/, llm/), as a LoRA run's base.
    The LLM's weights have a larger std than LLaMA's init so that its logits vary (a flat model hides differences)."""
    torch.manual_seed(seed)
    llm = dataclasses.replace(LlamaArgs.preset("demo"), vocab_size=Tokenizer(TOKENIZER).vocab_size)
    config = QilinConfig(projector="mlp2x_gelu", vision=VisionArgs.preset("demo"), llm=llm)
    model = QilinMedVL(config)
    for p in model.llm.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.05)
    model.save_towers(folder, tokenizer=TOKENIZER)
    return QilinMedVL.from_parts(config, folder / "vision", folder / "llm")


def settings(**kw):
    """train.py's arguments that lora.py reads."""
    return Namespace(**{**dict(lora=8, lora_alpha=16.0, lora_dropout=0.05, seed=0, lr=1e-2, projector_lr=1e-3), **kw})


def batch(model):
    """One real image and a short answer to learn: (input_ids, pixel_values, labels)."""
    ids = torch.tensor([expand_images([1, IMAGE_TOKEN_INDEX, *range(40, 60)], model.num_image_tokens)])
    return ids, chat.load_pixels([CHEST], model), ids.masked_fill(ids < 0, -100)


def trained_lora(folder, steps=3):
    """A tiny model with rank-8 LoRA trained a few AdamW steps (dropout, checkpointing on), and what it started from."""
    model = tiny(folder)
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    lora.apply(model.set_trainable(2), settings())
    optimizer = torch.optim.AdamW(lora.param_groups(model, settings()))
    model.train().llm.gradient_checkpointing = True
    ids, pixels, labels = batch(model)
    for _ in range(steps):
        _, loss = model(ids, pixels, labels)
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), start_state, with_grad


def logits(model, ids, pixels):
    with torch.no_grad():
        return model(ids, pixels)[0]


# ----------------------------------------------------------------------------- the layer

def test_step_0_is_the_base_model_exactly(tmp_path):
    model = tiny(tmp_path).eval()
    ids, pixels, _ = batch(model)
    before = logits(model, ids, pixels)
    lora.apply(model.set_trainable(2), settings())
    wrapped = [n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)]
    assert len(wrapped) == 7 * model.config.llm.n_layers and all(n.rsplit(".", 1)[1] in lora.TARGETS for n in wrapped)
    assert torch.equal(logits(model, ids, pixels), before)  # B = 0: not close, equal
    q = model.llm.layers[0].self_attn.q_proj
    assert q.weight is dict(model.named_parameters())["llm.layers.0.self_attn.q_proj.weight"] and not q.weight.requires_grad
    torch.manual_seed(0)  # A is PEFT's kaiming-uniform draw (PEFT draws from the global generator)
    reference = torch.nn.init.kaiming_uniform_(torch.empty_like(q.lora_A.weight), a=math.sqrt(5))
    assert torch.equal(q.lora_A.weight, reference) and not q.lora_B.weight.any()


def test_only_lora_and_the_adapter_train_and_merging_keeps_the_logits(tmp_path):
    model, start_state, with_grad = trained_lora(tmp_path)
    expected = {n for n, _ in model.named_parameters() if ".lora_" in n or n.startswith("projector.")}
    assert with_grad == expected and {n for n, p in model.named_parameters() if p.requires_grad} == expected
    base = {k: v for k, v in model.state_dict().items() if ".lora_" not in k and not k.startswith("projector.")}
    assert base.keys() == {k for k in start_state if not k.startswith("projector.")}  # the base keeps its names
    assert all(torch.equal(v, start_state[k]) for k, v in base.items())  # bit-identical after training
    groups = lora.param_groups(model, settings())
    assert [(len(g["params"]), g["lr"]) for g in groups] == [(2 * 7 * model.config.llm.n_layers, 1e-2), (4, 1e-3)]
    ids, pixels, _ = batch(model)
    unmerged = logits(model, ids, pixels)
    lora.merge(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    merged = logits(model, ids, pixels)
    diff, moved = (merged - unmerged).abs().max().item(), (unmerged - logits(tiny(tmp_path / "again"), ids, pixels))
    print(f"merged vs unmerged logits: max |diff| {diff:.1e}; trained vs base {moved.abs().max():.1e}")
    assert diff < 1e-5 and moved.abs().max() > 1e-2  # training changed the answer; merging did not


# ----------------------------------------------------------------------------- PEFT's format

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A trained tiny LoRA saved as train.py saves a run: (model before saving, the run folder, the base folder)."""
    base = tmp_path_factory.mktemp("base")
    model, _, _ = trained_lora(base)
    out = base / "run"
    lora.save_run(model, Namespace(**vars(settings()), vision=str(base / "vision"), llm=str(base / "llm"),
                                   output=str(out)), TOKENIZER)
    return model, out, base


def test_peft_loads_our_lora_onto_transformers_llama_and_gives_our_logits(saved_run, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    model, out, base = saved_run
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "config.json",
                                       "projector.safetensors", "tokenizer.model"]
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base / "llm"), out).eval()
    ids = torch.randint(0, model.config.llm.vocab_size, (2, 24))
    with torch.no_grad():
        diff = (model.llm(ids) - peft(ids).logits).abs().max().item()
    print(f"PEFT on transformers' LlamaForCausalLM vs ours: max |logit diff| {diff:.1e}")
    assert diff < 1e-5
    # PEFT's own save of a LoRA of the same shape: the same keys, shapes and dtypes, and the same config values
    get_peft_model(LlamaForCausalLM.from_pretrained(base / "llm"),
                   LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(lora.TARGETS),
                              task_type="CAUSAL_LM")).save_pretrained(tmp_path / "peft")
    ours, theirs = (read_safetensors(str(d / "adapter_model.safetensors")) for d in (out, tmp_path / "peft"))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    ours, theirs = (json.loads((d / "adapter_config.json").read_text()) for d in (out, tmp_path / "peft"))
    for key, value in ours.items():
        if key not in ("base_model_name_or_path", "target_modules"):
            assert theirs[key] == value, key
    assert set(ours["target_modules"]) == set(theirs["target_modules"])
    assert ours["base_model_name_or_path"] == str((base / "llm").resolve())


def test_chat_loads_a_lora_run_merged_and_finds_a_moved_base(saved_run, tmp_path):
    model, out, base = saved_run
    ids, pixels, _ = batch(model)
    loaded, _ = chat.load_model(str(out))
    assert not any(isinstance(m, lora.LoRALinear) for m in loaded.modules())  # merged: the base's matmuls only
    diff = (logits(loaded, ids, pixels) - logits(model, ids, pixels)).abs().max().item()
    print(f"chat.load_model (merged) vs the trained model: max |logit diff| {diff:.1e}")
    assert diff < 1e-5
    moved = tmp_path / "moved"
    shutil.copytree(base / "llm", moved)
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, llm_path=str(tmp_path / "gone"))))
    with pytest.raises(CheckpointError, match="base folder .*gone is not there .* with --llm DIR"):
        chat.load_model(str(copy))
    again, _ = chat.load_model(str(copy), llm=str(moved))
    assert torch.equal(logits(again, ids, pixels), logits(loaded, ids, pixels))


def test_serve_answers_from_a_lora_run_as_chat_does(saved_run, tmp_path):
    import openai
    import test_serve

    out = saved_run[1]
    want = test_serve.expected(chat.load_model(str(out)), [{"from": "human", "value": QUESTION}], [CHEST], 8)
    proc, base = test_serve.start(out, open(tmp_path / "serve.log", "w"))
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="qilin-med-vl", messages=[test_serve.user(QUESTION, CHEST)],
                                               temperature=0, max_tokens=8)
        assert reply.choices[0].message.content == want and want
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_lora_run_where_a_whole_model_is_expected_and_the_reverse(saved_run, tmp_path):
    model, out, base = saved_run
    whole = tmp_path / "whole"
    tiny(tmp_path / "towers").save_pretrained(whole, tokenizer=TOKENIZER)
    for call, message in (
            (lambda: QilinMedVL.from_pretrained(out), "a LoRA run, not a whole model: chat.py loads it"),
            (lambda: read_stage1_config(str(out)), "not a stage-1 output .*'qilin_med_vl_lora'"),  # --stage1-output
            (lambda: train.build_model(train.parse_args(["--demo", "--stage", "1", "--vision", str(base / "vision"),
                                                         "--llm", str(out)]), torch.float32),
             "--llm .* is a LoRA run .*, not a LLaMA folder"),  # train.py's --llm, and chat's (below)
            (lambda: lora.base_folder(str(whole)), "is a Qilin-Med-VL output, not a LLaMA folder"),
            (lambda: chat.load_model(str(whole), llm=str(base / "llm")), "is for a LoRA run's base LLM")):
        with pytest.raises(CheckpointError, match=message):
            call()


def test_flags_defaults_and_one_line_refusals(capsys):
    need = ["--stage", "2", "--stage1-output", "s1", "--data", "d", "--image-root", "i", "--output", "o"]
    args = train.parse_args([*need, "--lora", "128"])  # LLaVA's finetune_lora.sh
    assert (args.lora_alpha, args.lora_dropout, args.lr, args.projector_lr) == (256.0, 0.05, 2e-4, 2e-5)
    assert train.parse_args(["--demo", "--stage", "2", "--lora", "8"]).lr == train.DEMO[2]["lr"]
    assert train.parse_args(need).projector_lr is None  # a full run: the adapter at --lr, as before
    for argv, message in ((["--demo", "--stage", "1", "--lora", "8"], "--lora is for stage 2"),
                          ([*need, "--lora", "0"], "--lora (the rank) must be at least 1, not 0"),
                          ([*need, "--lora-alpha", "16"], "--lora-alpha and --lora-dropout go with --lora R"),
                          ([*need, "--lora", "8", "--lora-dropout", "1"], "--lora-dropout must be at least 0"),
                          ([*need, "--batch-size", "x"], "argument --batch-size: invalid int value")):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        err = capsys.readouterr().err  # one line, as every input error: no usage
        assert err.startswith("train.py: error: ") and err.count("\n") == 1 and message in err, err


# ----------------------------------------------------------------------------- train.py --lora under torchrun

@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-runs") / "stage1"  # as released (mlp2x_gelu exports), as LLaVA's LoRA script
    launch("--demo", "--stage", 1, "--style", "release", "--projector", "mlp2x_gelu", "--max-steps", 2, "--output", out)
    return out


def falls(rows):
    losses = [r["loss"] for r in rows]
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3


def test_zero3_lora_trains_small_and_a_kill_and_resume_gives_the_same_losses(stage1, tmp_path):
    common = ["--demo", "--stage", 2, "--stage1-output", stage1, "--lora", 8, "--max-steps", 12, "--save-every", 4]
    proc = launch(*common, "--output", tmp_path / "straight")  # ZeRO-3, the stage-2 default
    assert "0.10M trained (stage 2)" in proc.stderr + proc.stdout
    reference = metrics(tmp_path / "straight")
    assert len(reference) == 12 and falls(reference), [r["loss"] for r in reference]
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["llm_path"] == str((stage1 / "llm").resolve()) and config["lora"] == dict(r=8, alpha=16.0, dropout=0.05)
    base = sum(t.numel() for t in read_safetensors(str(stage1 / "llm" / "model.safetensors")).values())
    saved = sum(f.stat().st_size for f in (tmp_path / "straight" / "checkpoints").rglob("*") if f.is_file())
    assert saved < 4 * base  # DeepSpeed's checkpoint has no copy and no Adam state of the frozen base

    killed = tmp_path / "killed"
    run, _ = start(*common, "--output", killed)
    try:
        wait_for_steps(run, killed, 6)  # past the checkpoint of step 4
    finally:
        kill_run(run)
    assert not (killed / "config.json").exists() and (killed / "checkpoints" / "latest").is_file()
    launch(*common, "--output", killed, "--resume")
    resumed = metrics(killed)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(reference, resumed):  # the dropout masks too: each step is seeded by its number
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    straight, again = (read_safetensors(str(d / "adapter_model.safetensors")) for d in (tmp_path / "straight", killed))
    assert all(torch.allclose(straight[k], again[k], atol=1e-6) for k in straight)
    assert all(t.any() for k, t in straight.items() if ".lora_B." in k)  # gathered whole from ZeRO-3, and trained
    chat.load_model(str(tmp_path / "straight"))

    proc = launch(*common, "--lora", 16, "--output", killed, "--resume", nproc=None, check=False)
    assert proc.returncode == 2 and "lora was 8, now 16" in proc.stderr and "Traceback" not in proc.stderr


def test_zero2_lora_with_compile_chats_and_exports_for_transformers(stage1, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "run"
    launch("--demo", "--stage", 2, "--stage1-output", stage1, "--lora", 8, "--zero", 2, "--compile", "--max-steps", 12,
           "--output", out)
    assert falls(metrics(out)), [r["loss"] for r in metrics(out)]
    answer = subprocess.run([sys.executable, "chat.py", CHEST, "--model", str(out), "--question", QUESTION,
                             "--max-new-tokens", "8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0 and answer.stdout.strip() and not answer.stderr, answer.stderr
    exported = subprocess.run([sys.executable, "export.py", str(out), str(tmp_path / "hf")], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr
    model, tokenizer = chat.load_model(str(out))
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    served = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    inputs = processor(images=load_image(CHEST), text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    ours, pixels = chat.prompt_ids([{"from": "human", "value": QUESTION}], tokenizer, model.config.style), \
        chat.load_pixels([CHEST], model)
    with torch.no_grad():
        out_ids = served.generate(**inputs, do_sample=False, max_new_tokens=8)
        diff = (served(**inputs).logits[0, -1, :-1] - logits(model, torch.tensor([expand_images(
            ours, model.num_image_tokens)]), pixels)[0, -1]).abs().max().item()  # the <image> row left out
    theirs = [t for t in out_ids[0, inputs["input_ids"].shape[1]:].tolist() if t != tokenizer.eos_id]
    expected = chat.generate_batch(model, [ours], pixels, 8, tokenizer.eos_id)[0]
    print(f"export served by transformers: next-token logits max |diff| {diff:.1e}; answer {tokenizer.decode(theirs)!r}")
    assert theirs == expected and tokenizer.decode(expected).strip() == answer.stdout.strip() and diff < 1e-5
