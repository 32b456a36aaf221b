"""chat.py: cached decoding, batching, parity with transformers' generate, the terminal chat,
bad inputs, and streaming of byte-fallback characters (evaluation: test_evaluate.py).

Tiny random models on the CPU, the real demo images and a real LLaMA-style tokenizer. The LLM's
weights are drawn with a larger std than LLaMA's init (0.1, not 0.02) so that random models write
varied text: a model repeating one token would let most comparisons pass by accident.
"""

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import torch
from PIL import Image

import chat
from checkpoint import save_weights
from data import IMAGE_TOKEN_INDEX, Tokenizer, expand_images, image_input, load_image
from export import export_llava_hf
from llama import LlamaArgs
from model import QilinConfig, QilinMedVL
from vit import VisionArgs

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "data" / "mistral-7b-v0.1.model"
IMAGES = ROOT / "samples" / "images"
CHEST, HEAD, BONE = (str(IMAGES / n) for n in ("chest_xray.png", "head_ct.png", "bone_scan.png"))


def tiny_model(seed=0, style="paper", projector="linear", max_seq_len=2048):
    torch.manual_seed(seed)
    llm = dataclasses.replace(LlamaArgs.preset("demo"), vocab_size=32000, max_seq_len=max_seq_len)
    model = QilinMedVL(QilinConfig(projector=projector, style=style, vision=VisionArgs.preset("demo"), llm=llm))
    for p in model.llm.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model().save_pretrained(folder, tokenizer=TOKENIZER)
    return str(folder)


def question(text):
    return [{"from": "human", "value": text}]


def run_cli(*args, cwd=ROOT, script="chat.py"):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120, env=dict(os.environ, PYTHONIOENCODING="utf-8"))


# ----------------------------------------------------------------------------- decoding

def test_cached_greedy_equals_full_forward_argmax(tokenizer):
    model = tiny_model()
    pixels = chat.load_pixels([CHEST], model)
    prompt = chat.prompt_ids(question("这是什么类型的医学影像？"), tokenizer, "paper")
    cached = chat.generate_batch(model, [prompt], pixels, 24, eos_id=None)[0]
    rollout = []
    with torch.no_grad():
        for _ in range(24):  # no cache: the whole sequence again for every token
            logits, _ = model(torch.tensor([expand_images(prompt + rollout, model.num_image_tokens)]), pixels)
            rollout.append(int(logits[0, -1].argmax()))
    assert cached == rollout
    assert len(set(rollout)) > 10  # varied text, so the comparison could fail


def test_compiled_decode_step_equals_eager_token_for_token(tokenizer):
    """The compiled step (a CUDA graph on a GPU; inductor's C++ here) decodes the same greedy
    tokens as eager, for a left-padded batch, and again for a second call that reuses the cache."""
    model = tiny_model()
    pixels = torch.cat([chat.load_pixels([CHEST], model), chat.load_pixels([HEAD], model)])
    prompts = [chat.prompt_ids(question(q), tokenizer, "paper") for q in ("这是什么类型的医学影像？", "Which organ?")]
    eager = chat.generate_batch(model, prompts, pixels, 20, tokenizer.eos_id)
    compiled = chat.generate_batch(model, prompts, pixels, 20, tokenizer.eos_id, compile=True)
    again = chat.generate_batch(model, prompts[:1], pixels[:1], 12, tokenizer.eos_id, compile=True)
    assert compiled == eager and again == chat.generate_batch(model, prompts[:1], pixels[:1], 12, tokenizer.eos_id)
    assert len(set(eager[0])) > 5


def test_batched_left_padding_equals_one_by_one(tokenizer):
    model = tiny_model()
    dialogs = [question("这是什么类型的医学影像？"),
               question("Is there a fracture?"),
               question("What is it?") + [{"from": "gpt", "value": "A head CT."}] + question("Is it normal?")]
    prompts = [chat.prompt_ids(d, tokenizer, "paper") for d in dialogs]
    assert len({len(p) for p in prompts}) == 3  # different lengths: rows are padded differently
    pixels = torch.cat([chat.load_pixels([f], model) for f in (CHEST, BONE, HEAD)])
    batched = chat.generate_batch(model, prompts, pixels, 16, tokenizer.eos_id)
    alone = [chat.generate_batch(model, [p], pixels[b:b + 1], 16, tokenizer.eos_id)[0] for b, p in enumerate(prompts)]
    assert batched == alone
    assert len(set(map(tuple, alone))) == 3


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(tokenizer):
    model = tiny_model()
    pixels = chat.load_pixels([CHEST], model)
    prompt = chat.prompt_ids(question("What is this?"), tokenizer, "paper")

    def run(seed, **sampling):
        rng = torch.Generator().manual_seed(seed)
        return chat.generate_batch(model, [prompt], pixels, 12, None, rng=rng, **sampling)[0]

    assert run(1, temperature=1.0, top_p=0.95) == run(1, temperature=1.0, top_p=0.95)
    assert run(1, temperature=1.0, top_p=0.95) != run(2, temperature=1.0, top_p=0.95)
    assert run(1, temperature=1.0, top_p=1e-6) == run(0, temperature=0.0)


@pytest.mark.parametrize("temperature", [0.2, 0.7, 1.0])
def test_sample_is_softmax_over_temperature_then_top_p(temperature, top_p=0.9):
    """One distribution drawn 20,000 times: the tokens equal a by-hand top-p draw with the same
    generator, and their frequencies match softmax(logits / T) cut to the top_p head (which drops
    1 to 3 of the 6 tokens here)."""
    logits = torch.tensor([0.6, 2.0, -1.0, 1.2, 0.0, 1.6])  # out of order: a draw must be mapped back from the sort
    batch = logits.repeat(20_000, 1)  # (B, vocab)
    tokens = chat.sample(batch, temperature, top_p, torch.Generator().manual_seed(1))

    probs, order = torch.softmax(batch / temperature, -1).sort(-1, descending=True)
    probs = probs * (probs.cumsum(-1) - probs <= top_p)  # the head that first holds top_p of the mass
    by_hand = order.gather(-1, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1))).squeeze(-1)
    assert torch.equal(tokens, by_hand)

    def distribution(t):  # the exact target, in float64, in vocabulary order
        p, o = torch.softmax(logits.double() / t, -1).sort(descending=True)
        p = p * (p.cumsum(0) - p <= top_p)
        return torch.zeros(6, dtype=torch.float64).scatter(0, o, p / p.sum())
    frequencies = torch.bincount(tokens, minlength=6).double() / len(tokens)
    assert (frequencies - distribution(temperature)).abs().max() < 0.015  # 4 standard errors at most
    for other in {0.2, 0.7, 1.0} - {temperature}:  # another temperature would have been caught
        assert (distribution(other) - distribution(temperature)).abs().max() > 0.1


def test_greedy_matches_transformers_llava_generate(tmp_path, tokenizer):
    """A random llava-hf model loaded through chat.py writes the same tokens as transformers'."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=112, patch_size=14, hidden_size=64,
                           num_hidden_layers=3, num_attention_heads=4, intermediate_size=128),
        text_config=dict(model_type="llama", hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=256, vocab_size=32001, rms_norm_eps=1e-5,
                         max_position_embeddings=1024, initializer_range=0.1),
        image_token_index=32000, image_seq_length=64, vision_feature_layer=-2)
    reference = LlavaForConditionalGeneration(config).eval()
    reference.save_pretrained(tmp_path)
    shutil.copyfile(TOKENIZER, tmp_path / "tokenizer.model")

    model, tok = chat.load_model(str(tmp_path))
    assert model.config.style == "release"
    pixels = chat.load_pixels([CHEST], model)
    prompt = chat.prompt_ids(question("这是什么类型的医学影像？"), tok, "release")
    ours = chat.generate_batch(model, [prompt], pixels, 30, tok.eos_id)[0]

    k = prompt.index(IMAGE_TOKEN_INDEX)  # transformers: the image id once per feature vector
    hf_ids = torch.tensor([prompt[:k] + [config.image_token_index] * 64 + prompt[k + 1:]])
    with torch.no_grad():
        out = reference.generate(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=pixels,
                                 do_sample=False, max_new_tokens=30, eos_token_id=tok.eos_id, pad_token_id=0)
    theirs = [t for t in out[0, hf_ids.shape[1]:].tolist() if t != tok.eos_id]
    assert ours == theirs
    assert len(set(ours)) > 10


def test_llava_layout_with_vision_folder_answers_like_our_layout(tmp_path, tokenizer):
    """The original LLaVA layout (LLM + mm_projector in one folder, CLIP in another) loads through
    --vision and answers exactly as the same weights saved in our layout."""
    model = tiny_model(style="release", projector="mlp2x_gelu")
    ours_dir, llava_dir, clip_dir = tmp_path / "ours", tmp_path / "llava", tmp_path / "clip"
    model.save_pretrained(ours_dir, tokenizer=TOKENIZER)
    write_llava_layout(model, llava_dir, clip_dir)
    answers = []
    for folder, vision in ((ours_dir, None), (llava_dir, clip_dir)):
        loaded, tok = chat.load_model(str(folder), vision and str(vision))
        prompt = chat.prompt_ids(question("Which body part?"), tok, loaded.config.style)
        answers.append(chat.generate_batch(loaded, [prompt], chat.load_pixels([HEAD], loaded), 12, tok.eos_id)[0])
    assert answers[0] == answers[1] and answers[0]


def write_llava_layout(model, folder, clip_folder, clip_width=None):
    state = {(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in model.llm.state_dict().items()}
    state.update({f"model.mm_projector.{k}": v for k, v in model.projector.state_dict().items()})
    save_weights(state, folder)
    config = dict(model.config.llm.to_hf_config(), model_type="llava", mm_projector_type="mlp2x_gelu",
                  mm_hidden_size=model.config.vision.dim, mm_vision_select_layer=-2, image_aspect_ratio="pad",
                  mm_vision_tower="openai/clip-vit-large-patch14-336")
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copyfile(TOKENIZER, folder / "tokenizer.model")
    vision = model.vision if clip_width is None else \
        type(model.vision)(dataclasses.replace(model.config.vision, dim=clip_width))
    save_weights({f"vision_model.{k}": v for k, v in vision.state_dict().items()}, clip_folder)
    (clip_folder / "config.json").write_text(json.dumps(vision.args.to_hf_config()))


def hf_messages(turns):
    """Our dialog turns as transformers' chat messages, the image in the first question."""
    messages = []
    for k, turn in enumerate(turns):
        content = [{"type": "text", "text": turn["value"]}]
        if k == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": content})
    return messages


@pytest.mark.parametrize("style", ["paper", "release"])
@pytest.mark.parametrize("image_fit", ["pad", "crop"])
def test_llava_hf_export_serves_with_transformers_as_chat_answers(tmp_path, tokenizer, style, image_fit):
    """`python export.py` writes a folder that AutoProcessor and LlavaForConditionalGeneration serve
    as they are: the processor's chat template and tokenizer give chat.prompt_ids' ids (the image's
    run of tokens collapsed to one placeholder), its image processor gives load_pixels' values, and
    greedy generate writes chat.generate_batch's tokens, for one question and for a second turn."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = tiny_model(style=style, projector="mlp2x_gelu")
    model.config.image_fit = image_fit
    model.save_pretrained(tmp_path / "trained", tokenizer=TOKENIZER)
    result = run_cli(tmp_path / "trained", tmp_path / "export", script="export.py")
    assert result.returncode == 0 and not result.stderr, result.stderr
    tmp_path = tmp_path / "export"
    reloaded, _ = chat.load_model(str(tmp_path))  # chat.py on the export renders and fits as trained
    assert (reloaded.config.style, reloaded.config.image_fit) == (style, image_fit)
    processor = AutoProcessor.from_pretrained(tmp_path)
    served = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    image_id, n = model.config.llm.vocab_size, model.num_image_tokens
    pixels = chat.load_pixels([BONE], model)  # 128x512: "pad" and "crop" see very different squares
    first = question("这是什么类型的医学影像？")
    for turns in (first, first + [{"from": "gpt", "value": "骨扫描。"}] + question("Is there a fracture?")):
        prompt = processor.apply_chat_template(hf_messages(turns), add_generation_prompt=True)
        inputs = processor(images=load_image(BONE), text=prompt, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        k = ids.index(image_id)
        assert ids[k:k + n] == [image_id] * n and image_id not in ids[k + n:]
        ours = chat.prompt_ids(turns, tokenizer, style)
        assert ids[:k] + [IMAGE_TOKEN_INDEX] + ids[k + n:] == ours
        diff = (inputs["pixel_values"] - pixels).abs().max().item()
        print(f"{style}/{image_fit}, {len(turns)} turns: max |pixel difference| {diff:.1e} "
              f"({type(processor.image_processor).__name__})")
        assert diff < 1e-6
        with torch.no_grad():
            out = served.generate(**inputs, do_sample=False, max_new_tokens=20)
        theirs = [t for t in out[0, len(ids):].tolist() if t != tokenizer.eos_id]
        expected = chat.generate_batch(model, [ours], pixels, 20, tokenizer.eos_id)[0]
        assert theirs == expected
        assert len(set(expected)) > 10  # varied text, so the comparison could fail


def test_llava_hf_export_refuses_a_tokenizer_that_does_not_fit_the_vocabulary(tmp_path):
    llm = dataclasses.replace(LlamaArgs.preset("demo"), vocab_size=32008)  # rows padded past the 32000 pieces
    model = QilinMedVL(QilinConfig(projector="mlp2x_gelu", vision=VisionArgs.preset("demo"), llm=llm))
    with pytest.raises(ValueError, match="32000 pieces but the model has 32008 embedding rows"):
        export_llava_hf(model, tmp_path, tokenizer=TOKENIZER)
    assert not (tmp_path / "model.safetensors").exists()  # refused before the weights were written


def test_export_command_refuses_what_it_cannot_write(model_dir, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep")
    result = run_cli(model_dir, taken, script="export.py")
    assert result.returncode == 2 and "is not empty" in result.stderr and os.listdir(taken) == ["notes.txt"]
    result = run_cli(model_dir, tmp_path / "out", script="export.py")  # the paper's linear adapter
    assert result.returncode == 1 and "export.py: error: export_llava_hf needs projector='mlp2x_gelu'" in result.stderr
    assert "Traceback" not in result.stderr and os.listdir(tmp_path) == ["taken"]  # nothing half-written
    result = run_cli(stage1_output(tmp_path), tmp_path / "out", script="export.py")
    assert result.returncode == 1 and "export needs a stage-2 model" in result.stderr and "chat needs" not in result.stderr


# ----------------------------------------------------------------------------- the command line

def test_question_prints_only_the_answer(model_dir, tokenizer):
    result = run_cli(CHEST, "--model", model_dir, "--question", "这是什么？", "--temperature", "0",
                     "--max-new-tokens", "10")
    assert result.returncode == 0, result.stderr
    model, _ = chat.load_model(model_dir)
    prompt = chat.prompt_ids(question("这是什么？"), tokenizer, "paper")
    expected = tokenizer.decode(chat.generate_batch(model, [prompt], chat.load_pixels([CHEST], model), 10,
                                                    tokenizer.eos_id)[0])
    assert result.stdout == expected + "\n"


def sampled(model_dir, tokenizer, text, temperature, seed, n):
    """What generate writes for one question with top-p 0.9 (the default) and a seeded generator."""
    model, _ = chat.load_model(model_dir)
    prompt = chat.prompt_ids(question(text), tokenizer, "paper")
    rng = torch.Generator().manual_seed(seed)
    return tokenizer.decode(chat.generate_batch(model, [prompt], chat.load_pixels([CHEST], model), n,
                                                tokenizer.eos_id, temperature=temperature, top_p=0.9, rng=rng)[0])


def test_temperature_flag_reaches_sampling(model_dir, tokenizer, capsys):
    """--temperature 0.7 --seed 1 answers the same twice, and exactly what sampling at 0.7 with
    that seed writes; not what 0 (greedy) or 1.0 would."""
    answers = []
    for temperature in ("0.7", "0.7", "0"):
        assert chat.main([CHEST, "--model", model_dir, "--question", "What is this?", "--temperature", temperature,
                          "--seed", "1", "--max-new-tokens", "16"]) == 0
        answers.append(capsys.readouterr().out.strip())
    assert answers[0] == answers[1] == sampled(model_dir, tokenizer, "What is this?", 0.7, 1, 16)
    assert answers[0] != answers[2] and answers[0] != sampled(model_dir, tokenizer, "What is this?", 1.0, 1, 16)


def test_interactive_chat_samples_at_temperature_0_2_by_default(model_dir, tokenizer, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is this?\n"))  # one question, then end of input
    assert chat.main([CHEST, "--model", model_dir, "--seed", "5", "--max-new-tokens", "16"]) == 0
    answer = capsys.readouterr().out.split(">>> ")[1].strip()
    assert answer == sampled(model_dir, tokenizer, "What is this?", 0.2, 5, 16)
    assert answer not in (sampled(model_dir, tokenizer, "What is this?", t, 5, 16) for t in (0.0, 1.0))


def test_context_limit_is_respected(tmp_path, tokenizer, capsys):
    prompt = chat.prompt_ids(question("What is it?"), tokenizer, "paper")
    length = len(prompt) - 1 + 64  # the placeholder becomes 64 features
    for max_seq_len, code, message in ((length, 1, "does not fit"), (length + 3, 0, "capped at 3 tokens")):
        folder = tmp_path / str(max_seq_len)
        tiny_model(max_seq_len=max_seq_len).save_pretrained(folder, tokenizer=TOKENIZER)
        assert chat.main([CHEST, "--model", str(folder), "--question", "What is it?", "--temperature", "0",
                          "--max-new-tokens", "10"]) == code
        out, err = capsys.readouterr()
        assert message in err
        if code == 0:
            assert len(tokenizer.encode(out.strip())) <= 3 + 1


def test_interactive_chat_in_a_terminal(model_dir):
    child = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), CHEST, "--model", model_dir, "--seed", "0",
                                           "--max-new-tokens", "12"],
                          cwd=str(ROOT), encoding="utf-8", timeout=60, env=dict(os.environ, LANG="C.UTF-8"))
    child.expect(">>> ")
    assert "/reset" in child.before  # the help line
    for text in ("这是什么类型的医学影像？", "Is it normal?"):
        child.sendline(text)
        child.expect(">>> ")
        answer = child.before.replace(text, "", 1).strip()
        assert answer and "\ufffd" not in answer
    child.sendline("/reset")
    child.expect("new dialog about the same image")
    child.sendline("/image " + str(IMAGES / "missing.png"))
    child.expect("no such image file")
    child.sendline("/image " + str(IMAGES))
    child.expect("is a directory, not an image file")
    child.sendline(f"/image {HEAD} {BONE}")
    child.expect("new dialog about")
    child.expect(">>> ")
    child.sendline("What is it?")
    child.expect(">>> ")
    assert child.before.replace("What is it?", "", 1).strip()
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_at_the_prompt_says_how_to_leave(model_dir):
    child = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), CHEST, "--model", model_dir, "--temperature", "0",
                                           "--max-new-tokens", "1900"],
                          cwd=str(ROOT), encoding="utf-8", timeout=60, env=dict(os.environ, LANG="C.UTF-8"))
    child.expect(">>> ")
    child.sendline("Describe the image.")
    child.expect("Describe the image.\r\n")
    child.expect(r"\S")  # the answer has started streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(">>> ")
    child.sendintr()  # at the prompt: as Python's REPL, a new prompt and how to leave
    child.expect(r"\(/quit or Ctrl-D leaves\)")
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_the_demo_banner_says_what_the_demo_knows(tokenizer, monkeypatch, capsys):
    import argparse
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # end of input at once
    for folder, expected in ((chat.DEMO_MODEL, "learned only the Chinese questions"), ("elsewhere", "Ask in Chinese")):
        chat.chat(tiny_model(), tokenizer, None, argparse.Namespace(model=folder))
        assert expected in capsys.readouterr().out.splitlines()[0]


PEAK_RSS = """import re, sys, torch, data
def rss(key):  # MiB; VmHWM is the peak resident memory of this process since it started, VmRSS the current
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) // 1024
before = rss("VmRSS")
pixels = data.image_input([sys.argv[1]], 336)
print(rss("VmHWM") - before)
torch.save(pixels, sys.argv[2])
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures memory through Linux's /proc")
def test_large_images_are_answered_in_bounded_memory(tmp_path, model_dir, capsys):
    """A pathology image upscaled to 12,000 x 10,000 (120 megapixels, which Pillow alone refuses)
    is read at a few times 336 (a JPEG decoded at 1/4 scale, a PNG decoded whole and block-averaged)
    and gives the model what a 1,200 x 1,000 copy gives, up to resampling differences. The peak
    memory of each read is measured in a fresh process (pytest -s prints it)."""
    big = Image.open(IMAGES / "colon_ihc_pathology.png").resize((12_000, 10_000), Image.BICUBIC)
    big.save(tmp_path / "large.jpg", quality=90)
    big.save(tmp_path / "large.png", compress_level=1)
    big.resize((1200, 1000), Image.BICUBIC).save(tmp_path / "small.png")
    del big
    reference = image_input([tmp_path / "small.png"], 336)
    assert (reference.flip(-1) - reference).abs().mean() > 0.2  # another picture is far outside the tolerance
    decoded = 12_000 * 10_000 * 4 / 2**20  # MiB: Pillow holds an RGB pixel in 4 bytes
    for name, bound in (("large.jpg", decoded / 4), ("large.png", 1.25 * decoded)):
        probe = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path / name), str(tmp_path / "pixels.pt")],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr
        with capsys.disabled():
            print(f"\n{name}: peak RSS grew {int(probe.stdout)} MiB (decoded whole it is {decoded:.0f} MiB)", end="")
        assert int(probe.stdout) < bound
        diff = (torch.load(tmp_path / "pixels.pt") - reference).abs()
        assert diff.mean() < 0.02 and diff.max() < 0.3  # CLIP-normalised: 0.02 is about 1.4 of 255 levels
    assert chat.main([str(tmp_path / "large.jpg"), "--model", model_dir, "--question", "What is it?",
                      "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip()


def corrupt_image(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes((IMAGES / "chest_xray.png").read_bytes()[:300])
    return str(path)


def unknown_layout(tmp_path):
    folder = tmp_path / "bert"
    save_weights({"bert.embeddings.weight": torch.zeros(2, 2)}, folder)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    shutil.copyfile(TOKENIZER, folder / "tokenizer.model")
    return str(folder)


def mismatched_vision(tmp_path):
    write_llava_layout(tiny_model(style="release", projector="mlp2x_gelu"), tmp_path / "llava", tmp_path / "clip",
                       clip_width=32)
    return [str(tmp_path / "llava"), "--vision", str(tmp_path / "clip")]


def no_tokenizer(tmp_path, model_dir):
    shutil.copytree(model_dir, tmp_path / "bare")
    os.remove(tmp_path / "bare" / "tokenizer.model")
    return str(tmp_path / "bare")


def stage1_output(tmp_path):
    """What train.py writes in stage 1: the adapter alone, with the tower folders it trained against."""
    model = tiny_model()
    save_weights({f"vision_model.{k}": v for k, v in model.vision.state_dict().items()}, tmp_path / "vision")
    (tmp_path / "vision" / "config.json").write_text(json.dumps(model.vision.args.to_hf_config()))
    save_weights({(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in model.llm.state_dict().items()},
                 tmp_path / "llm")
    (tmp_path / "llm" / "config.json").write_text(json.dumps(model.config.llm.to_hf_config()))
    model.save_projector(tmp_path / "stage1", tmp_path / "vision", tmp_path / "llm", tokenizer=TOKENIZER)
    return str(tmp_path / "stage1")


@pytest.mark.parametrize("case, expected", [
    ("missing image", "no such image file"),
    ("corrupt image", "corrupt or truncated"),
    ("missing model folder", "no such model folder"),
    ("unknown layout", "not a Qilin-Med-VL, LLaVA or llava-hf checkpoint"),
    ("vision folder that does not match", "does not match"),
    ("no tokenizer", "no tokenizer.model"),
    ("demo model not trained", "train.py --demo --stage 2"),
    ("image is a directory", "samples/images: is a directory, not an image file"),
    ("image over --max-image-pixels", "482x512 pixels is over the limit of 100000"),
    ("stage-1 output", "chat needs a stage-2 model. Stage 1's output is for train.py --stage 2 --stage1-output"),
])
def test_bad_inputs_give_one_line_and_no_traceback(tmp_path, model_dir, case, expected):
    images, model, mode = [CHEST], ["--model", model_dir], ["--question", "What is it?"]
    if case == "missing image":
        images = [str(tmp_path / "nope.png")]
    elif case == "corrupt image":
        images = [corrupt_image(tmp_path)]
    elif case == "missing model folder":
        model = ["--model", str(tmp_path / "nowhere")]
    elif case == "unknown layout":
        model = ["--model", unknown_layout(tmp_path)]
    elif case == "vision folder that does not match":
        model = ["--model"] + mismatched_vision(tmp_path)
    elif case == "no tokenizer":
        model = ["--model", no_tokenizer(tmp_path, model_dir)]
    elif case == "demo model not trained":
        model = ["--demo"]  # run where there is no runs/demo-stage2
    elif case == "image is a directory":
        images = [str(IMAGES)]
    elif case == "image over --max-image-pixels":
        mode += ["--max-image-pixels", "100000"]
    elif case == "stage-1 output":
        model = ["--model", stage1_output(tmp_path)]
    result = run_cli(*images, *model, *mode, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr


def test_a_stage1_output_is_refused_in_chat_and_question(tmp_path, capsys):
    """Stage 1 learned only to caption. Its folder loads as a whole model, so chat would answer
    with garbage; every mode refuses it instead, and says what it is for (evaluate.py too: test_evaluate.py)."""
    folder = stage1_output(tmp_path)
    assert QilinMedVL.from_pretrained(folder).num_image_tokens == 64  # loadable: the refusal is chat's
    for mode in ([CHEST], [CHEST, "--question", "What is it?"]):
        assert chat.main([*mode, "--model", folder]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"a stage-2 model. Stage 1's output is for train.py --stage 2 " \
                                          f"--stage1-output {folder}" in err


# ----------------------------------------------------------------------------- streaming

def test_streaming_never_splits_a_character(tokenizer):
    text = "胸部X光片显示右下肺野有一处磨玻璃影，考虑为肺炎。龘 Normal heart size."
    ids = tokenizer.encode(text)
    assert sum(tokenizer.sp.id_to_piece(i).startswith("<0x") for i in ids) >= 6  # byte-fallback pieces
    stream = chat.TextStream(tokenizer)
    chunks = [stream.push(i) for i in ids]
    assert "".join(chunks) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)
    assert chunks.count("") >= 4  # held back while a character was incomplete


@pytest.mark.parametrize("flags, expected", [
    (["--top-p", "0"], "--top-p must be above 0"),
    (["--top-p", "1.5"], "--top-p must be above 0"),
    (["--temperature", "-1"], "--temperature must be 0"),
    (["--question", ""], "--question is empty"),
    (["--question", "  "], "--question is empty"),
    (["--max-image-pixels", "0"], "--max-image-pixels must be at least 1"),
])
def test_bad_flags_are_refused_before_loading(flags, expected, capsys):
    with pytest.raises(SystemExit):
        chat.main([CHEST, "--model", "nowhere", *flags])
    assert expected in capsys.readouterr().err
