"""Tests for data.py on real images and a real LLaMA-style tokenizer (CPU, a few seconds)."""

import json
import math
import re
import struct
import sys
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import (ALIGNMENT_PROMPTS, CLIP_MEAN, CLIP_STD, INSTRUCTION_PROMPTS, STAGE_TEMPLATE, TEMPLATES,  # noqa: E402
                  ChiMedDataset, IGNORE_INDEX, IMAGE_TOKEN_INDEX, ImageError, Tokenizer,
                  TooManyImages, build_conversation, collate, expand_images, length_grouped_batches,
                  concat_images, load_image, preprocess_image, render, wrap_question)

IMAGES = ROOT / "samples" / "images"
SYSTEM = TEMPLATES["v1"]["system"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(ROOT / "tests" / "data" / "mistral-7b-v0.1.model")


@pytest.fixture(scope="module")
def demo_tok():
    return Tokenizer(ROOT / "samples" / "tokenizer.model")


def human(v):
    return {"from": "human", "value": v}


def gpt(v):
    return {"from": "gpt", "value": v}


def learned_runs(ids, labels):
    """The contiguous runs of learned tokens; a learned label must equal its input id."""
    runs, run = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    return runs + [run] if run else runs


# ----------------------------------------------------------------------------- LLaVA's rendering, as a reference
# Written from reading LLaVA (haotian-liu/LLaVA: llava/train/train.py, llava/mm_utils.py,
# llava/conversation.py), which trained the released weights, and transformers 4.31's
# tokenization_llama.py and tokenization_utils.py, the tokenizer LLaVA pinned. It works on whole
# prompt strings and masks labels by LLaVA's round arithmetic; data.render works turn by turn.

class LegacyLlamaTokenizer:
    """`tokenizer(text).input_ids` in LLaVA's training: transformers 4.31's slow LlamaTokenizer
    (use_fast=False) with legacy=True. The text is cut at the special tokens, which are kept whole
    with no space stripped beside them (LlamaTokenizer makes them AddedTokens with lstrip and rstrip
    off); each stretch between them goes through SentencePiece on its own, so each gets the dummy
    prefix ▁; BOS goes in front (add_bos_token=True, add_eos_token=False)."""

    def __init__(self, sp):
        self.sp, self.bos_token_id = sp, sp.bos_id()
        self.special = {sp.id_to_piece(i): i for i in (sp.unk_id(), sp.bos_id(), sp.eos_id())}  # <unk> <s> </s>
        self.pattern = "(" + "|".join(map(re.escape, self.special)) + ")"

    def __call__(self, text):
        ids = [self.bos_token_id]
        for stretch in re.split(self.pattern, text):
            ids += [self.special[stretch]] if stretch in self.special else self.sp.encode(stretch)
        return SimpleNamespace(input_ids=ids)


def llava_tokenizer_image_token(prompt, tokenizer):
    """mm_utils.tokenizer_image_token: each chunk between <image> tags through the tokenizer, the
    BOS that starts every chunk but the first dropped, IMAGE_TOKEN_INDEX between chunks."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids = chunks[0]
    for chunk in chunks[1:]:
        ids = ids + [IMAGE_TOKEN_INDEX] + chunk[1:]
    return ids


def llava_preprocess_multimodal(turns):
    """train.preprocess_multimodal: every turn holding the tag gets it, once, at its front."""
    out = []
    for turn in turns:
        value = turn["value"]
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        out.append({"from": turn["from"], "value": value})
    return out


def llava_v1_prompt(turns):
    """conv_vicuna_v1.get_prompt (SeparatorStyle.TWO, sep " ", sep2 "</s>")."""
    prompt = SYSTEM + " "
    for k, turn in enumerate(turns):
        role, sep = ("USER", " ") if k % 2 == 0 else ("ASSISTANT", "</s>")
        prompt += f"{role}: {turn['value']}{sep}" if turn["value"] else f"{role}:"
    return prompt


def llava_v1(turns, tokenizer, has_image):
    """train.preprocess_v1: the whole prompt tokenized at once, labels masked by round arithmetic."""
    if turns[0]["from"] != "human":
        turns = turns[1:]
    prompt = llava_v1_prompt(turns)
    if has_image:
        encode = lambda text: llava_tokenizer_image_token(text, tokenizer)  # noqa: E731
    else:
        encode = lambda text: tokenizer(text).input_ids  # noqa: E731
    ids = encode(prompt)
    learned = [False] + [True] * (len(ids) - 1)  # BOS is not learned
    sep, cur = " ASSISTANT: ", 1
    for rnd in prompt.split("</s>"):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        round_len = len(encode(rnd))  # its own BOS stands for the "</s>" the split removed
        instruction_len = len(encode(parts[0] + sep)) - 2  # less BOS and the ▁ of the trailing space
        # (with legacy=True there is no "- 1 after the first round": that is for legacy=False)
        for i in range(cur, min(cur + instruction_len, len(ids))):
            learned[i] = False
        cur += round_len
    learned[cur:] = [False] * len(learned[cur:])
    if cur != len(ids):  # "tokenization mismatch": LLaVA learns nothing from the sample (checked below its max length)
        learned = [False] * len(ids)
    return ids, [i if keep else IGNORE_INDEX for i, keep in zip(ids, learned)]


def llava_plain(turns, tokenizer):
    """train.preprocess_plain: the tag, the caption and a newline; BOS and the tag masked."""
    assert len(turns) == 2 and "<image>" in turns[0]["value"]
    ids = llava_tokenizer_image_token("<image>" + turns[1]["value"] + "\n", tokenizer)
    n = len(llava_tokenizer_image_token("<image>", tokenizer))
    return ids, [IGNORE_INDEX] * n + ids[n:]


def llava_sample(record, stage, tokenizer):
    """LazySupervisedDataset.__getitem__'s text path: stage 1 `plain`, stage 2 `v1` (as released)."""
    has_image = "image" in record
    turns = record["conversations"]
    if has_image:
        turns = llava_preprocess_multimodal(turns)
    return llava_plain(turns, tokenizer) if stage == 1 else llava_v1(turns, tokenizer, has_image)


@pytest.fixture(scope="module")
def llava_tok(tok):
    return LegacyLlamaTokenizer(tok.sp)


# ----------------------------------------------------------------------------- rendering

def test_v1_single_turn_learns_only_the_answer(tok, llava_tok):
    conv = [human("<image>\nWhat is shown?"), gpt("A frontal chest X-ray.")]
    ids, labels = render(conv, tok, "v1")
    assert len(ids) == len(labels)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    prefix = tok.sp.encode(SYSTEM + " USER: ")  # LLaVA's first chunk, before the placeholder
    assert ids[1:1 + len(prefix)] == prefix and ids[1 + len(prefix)] == IMAGE_TOKEN_INDEX
    runs = learned_runs(ids, labels)
    assert len(runs) == 1 and runs[0][-1] == tok.eos_id
    assert tok.decode(runs[0][:-1]) == "A frontal chest X-ray."
    prompt = f"{SYSTEM} USER: <image>\nWhat is shown? ASSISTANT: A frontal chest X-ray.</s>"
    assert ids == llava_tokenizer_image_token(prompt, llava_tok)


def test_v1_multi_turn_chinese(tok, llava_tok):
    answers = ["胸部X光片。", "否。", "The heart looks normal."]
    conv = [human("<image>\n这是什么类型的医学影像？"), gpt(answers[0]),
            human("这是超声图像吗？"), gpt(answers[1]), human("Heart?"), gpt(answers[2])]
    ids, labels = render(conv, tok, "v1")
    runs = learned_runs(ids, labels)
    assert [tok.decode(r[:-1]) for r in runs] == answers
    assert all(r[-1] == tok.eos_id for r in runs)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids.count(tok.bos_id) == 1
    prompt = (f"{SYSTEM} USER: <image>\n这是什么类型的医学影像？ ASSISTANT: {answers[0]}</s>"
              f"USER: 这是超声图像吗？ ASSISTANT: {answers[1]}</s>USER: Heart? ASSISTANT: {answers[2]}</s>")
    assert ids == llava_tokenizer_image_token(prompt, llava_tok)


def test_plain_learns_caption_and_newline(tok):
    ids, labels = render([human("<image>"), gpt("一张正位胸部X光片。")], tok, "plain")
    assert ids[:2] == [tok.bos_id, IMAGE_TOKEN_INDEX] and labels[:2] == [IGNORE_INDEX] * 2
    assert ids[2:] == tok.sp.encode("一张正位胸部X光片。\n") == labels[2:]
    assert tok.decode(ids[2:]) == "一张正位胸部X光片。\n"
    assert tok.eos_id not in ids


def test_generation_prompt_is_the_training_prefix(tok):
    conv = [human("<image>\n这是什么类型的医学影像？"), gpt("头部CT。"), human("这是CT图像吗？")]
    ids, labels = render(conv, tok, "v1")
    tail = tok.sp.encode("ASSISTANT:")
    assert ids[-len(tail):] == tail
    assert all(label == IGNORE_INDEX for label in labels[-len(tail):])
    assert len(learned_runs(ids, labels)) == 1  # only the first, answered turn
    full, _ = render(conv + [gpt("是。")], tok, "v1")
    assert full[:len(ids)] == ids  # chat sees exactly what training saw
    prompt, prompt_labels = render(conv[:1], tok, "v1")
    assert set(prompt_labels) == {IGNORE_INDEX}


@pytest.mark.parametrize("conv", [[], [gpt("a")], [human("q"), human("q")], [human("q"), gpt("<image> a")],
                                  [human("q"), {"from": "gpt", "value": 3}]])
def test_render_rejects_bad_turns(tok, conv):
    with pytest.raises(ValueError):
        render(conv, tok, "v1")


def test_paper_style_prompts_from_files_and_seeded():
    record = {"id": "x", "image": "a.png", "conversations": [human("<image>\n图中显示的是哪个部位？"), gpt("胸部。"),
                                                            human("<image>这是超声图像吗？"), gpt("否。")]}
    stage1 = build_conversation(record, 1, "paper", np.random.default_rng([0, 7]))
    assert stage1[0]["value"] in ALIGNMENT_PROMPTS and stage1[1]["value"] == "胸部。"
    assert stage1 == build_conversation(record, 1, "paper", np.random.default_rng([0, 7]))
    picks = {build_conversation(record, 1, "paper", np.random.default_rng([0, i]))[0]["value"] for i in range(40)}
    assert len(picks) > 5
    stage2 = build_conversation(record, 2, "paper", np.random.default_rng([0, 7]))
    wrapped = [INSTRUCTION_PROMPTS[k].replace("<question>", "图中显示的是哪个部位？") for k in range(7)]
    assert stage2[0]["value"] in wrapped
    assert "<image>" not in stage2[2]["value"] and "这是超声图像吗？" in stage2[2]["value"]
    assert stage2[1:4:2] == [gpt("胸部。"), gpt("否。")]
    assert wrap_question("<image>\n哪个部位？", 5) == "哪个部位？\n请根据图中内容尽量简洁作答。\n<image>"
    assert wrap_question("哪个部位？", 0, with_image=False) == "哪个部位？\n请尽量简洁地回答。"
    release = build_conversation(record, 1, "release")
    assert release == [human("<image>"), gpt("胸部。")]


def test_dataset_paper_prompts_are_reproducible(demo_tok):
    kwargs = dict(data_path=ROOT / "samples" / "stage2.json", image_root=IMAGES, tokenizer=demo_tok, stage=2)
    a = ChiMedDataset(**kwargs, seed=0)
    b = ChiMedDataset(**kwargs, seed=0)
    c = ChiMedDataset(**kwargs, seed=1)
    ids = lambda ds: [ds._render(i)[0] for i in ds.kept]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert a.lengths == b.lengths
    # A new epoch draws new prompts, reproducibly; every sample still fits max_length.
    epoch0 = ids(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert ids(a) == ids(b) != epoch0
    assert all(s is None or len(s["input_ids"]) <= a.max_length for s in (a[k] for k in range(len(a))))
    a.set_epoch(0)
    assert ids(a) == epoch0


def test_one_placeholder_per_sample(demo_tok, tmp_path):
    records = [
        {"id": "two", "image": ["chest_xray.png", "head_ct.png"],
         "conversations": [human("看<image>和<image>\n哪张是CT？"), gpt("第二张。")]},
        {"id": "none-in-text", "image": "head_ct.png", "conversations": [human("哪个部位？"), gpt("头部。")]},
        {"id": "text-only", "conversations": [human("<image>\n什么是CT？"), gpt("计算机断层扫描。")]},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    ds = ChiMedDataset(data_path=path, image_root=IMAGES, tokenizer=demo_tok, stage=2, style="release")
    assert len(ds) == 3
    n_image_tokens = [(s["input_ids"] == IMAGE_TOKEN_INDEX).sum().item() for s in ds]
    assert n_image_tokens == [576, 576, 0]  # one per feature of the one composite image
    assert [tuple(s["pixel_values"].shape) for s in ds] == [(1, 3, 336, 336)] * 2 + [(0, 3, 336, 336)]
    turns = build_conversation(records[0], 2, "release")
    assert turns[0]["value"] == "<image>\n看和\n哪张是CT？"  # one tag, at the front, as LLaVA puts it
    assert build_conversation(records[1], 2, "release")[0]["value"] == "<image>\n哪个部位？"


# Records as they come in LLaVA / ChiMed-VL files: the tag anywhere in its turn, whitespace kept.
LLAVA_RECORDS = {
    "tag-first": {"image": "a.png", "conversations": [human("<image>\n这是什么类型的医学影像？"),
                                                      gpt("胸部X光片。")]},
    "tag-last": {"image": "a.png", "conversations": [human("What is shown in this image?\n<image>"),
                                                     gpt("A frontal chest X-ray.")]},
    "tag-mid-sentence": {"image": "a.png", "conversations": [human("Is the lesion in <image> benign?"),
                                                             gpt("Yes, it looks benign.")]},
    "tag-after-chinese-text": {"image": "a.png", "conversations": [human("请描述这张图像：<image>"),
                                                                   gpt("腹部CT，肝脏形态正常。")]},
    "spaces-and-newlines": {"image": "a.png", "conversations": [
        human("  \n<image>  \n  图中显示的是哪个部位？ \n"), gpt(" 头部。\n")]},
    "tag-alone": {"image": "a.png", "conversations": [human(" <image>\n"),
                                                      gpt("一张头部CT平扫图像，可见脑室对称。")]},
    "two-images-two-tags": {"image": ["a.png", "b.png"], "conversations": [
        human("看<image>和<image>\n哪张是CT？"), gpt("第二张。")]},
    "two-rounds": {"image": "a.png", "conversations": [human("这是CT图像吗？ <image>"), gpt("是。"),
                                                       human(" 哪个部位？ "), gpt("头部。 ")]},
    "three-rounds-tag-in-second": {"image": "a.png", "conversations": [
        human("Hello."), gpt("Hello, how can I help?"), human("What is this?\n<image>"), gpt("A head CT."),
        human("Any bleeding?"), gpt("No bleeding is visible.")]},
    "three-rounds-chinese": {"image": "a.png", "conversations": [
        human("<image>\n这是什么类型的医学影像？"), gpt("超声心动图。"),
        human("这是彩色多普勒吗？"), gpt("否。"),
        human("能看到几个心腔？"), gpt("四个心腔。")]},
    "text-only": {"conversations": [human("什么是CT？"), gpt("计算机断层扫描。"),
                                    human("What does MRI stand for?"), gpt("Magnetic resonance imaging.")]},
}
# LLaVA's stage 1 (`plain`) takes only records of one image, one question, one caption
PLAIN_RECORDS = [name for name, r in LLAVA_RECORDS.items() if "image" in r and len(r["conversations"]) == 2]


@pytest.mark.parametrize("name,stage", [(name, 2) for name in LLAVA_RECORDS] + [(name, 1) for name in PLAIN_RECORDS])
def test_release_rendering_is_llava_token_for_token(tok, llava_tok, name, stage):
    record = LLAVA_RECORDS[name]
    ids, labels = render(build_conversation(record, stage, "release"), tok, STAGE_TEMPLATE[(stage, "release")])
    llava_ids, llava_labels = llava_sample(record, stage, llava_tok)
    assert ids == llava_ids
    assert labels == llava_labels
    assert ids.count(IMAGE_TOKEN_INDEX) == ("image" in record)
    assert any(label != IGNORE_INDEX for label in llava_labels)  # LLaVA's arithmetic did not give up


def test_llava_reference_tells_tag_placements_apart(tok, llava_tok):
    # Keeping the tag where the record had it (what release style did before) is not what LLaVA trained on.
    record = LLAVA_RECORDS["tag-last"]
    llava_ids, _ = llava_sample(record, 2, llava_tok)
    in_place, _ = render(record["conversations"], tok, "v1")
    assert in_place != llava_ids and in_place.count(IMAGE_TOKEN_INDEX) == 1
    assert llava_ids.index(IMAGE_TOKEN_INDEX) < in_place.index(IMAGE_TOKEN_INDEX)
    # The legacy tokenizer encodes the text after "</s>" afresh, with the dummy prefix ▁: what lets
    # render encode turn by turn. One SentencePiece call over the same text would not give EOS at all.
    ids = llava_tok("a</s>USER: b").input_ids
    assert ids == [tok.bos_id] + tok.sp.encode("a") + [tok.eos_id] + tok.sp.encode("USER: b")
    assert tok.sp.id_to_piece(ids[ids.index(tok.eos_id) + 1]).startswith("▁")
    assert tok.eos_id not in tok.sp.encode("a</s>USER: b")


# ----------------------------------------------------------------------------- images

def reference_pixels(image, size, mode):
    """CLIP input computed another way: numpy canvas / slicing around Pillow's resize, torch maths."""
    a = np.asarray(image)
    h, w = a.shape[:2]
    if mode == "pad":
        side = max(h, w)
        canvas = np.empty((side, side, 3), np.uint8)
        canvas[:] = (122, 116, 104)
        canvas[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = a
        a = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC))
    else:
        scale = size / min(h, w)
        new_w, new_h = (size, int(h * scale)) if w <= h else (int(w * scale), size)
        a = np.asarray(Image.fromarray(a).resize((new_w, new_h), Image.BICUBIC))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        a = a[top:top + size, left:left + size]
    t = torch.from_numpy(a.copy()).permute(2, 0, 1).double() / 255
    return ((t - torch.tensor(CLIP_MEAN).double()[:, None, None]) / torch.tensor(CLIP_STD).double()[:, None, None]).float()


@pytest.mark.parametrize("name", ["chest_xray.png", "bone_scan.png", "echocardiogram.png", "ct_small_16bit.png",
                                  "retina_fundus.jpg"])
@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_preprocess_matches_reference(name, mode):
    image = load_image(IMAGES / name)
    x = preprocess_image(image, 336, mode)
    assert x.shape == (3, 336, 336) and x.dtype == torch.float32
    torch.testing.assert_close(x, reference_pixels(image, 336, mode), atol=1e-5, rtol=0)
    if mode == "pad":  # the padding really has CLIP's mean colour, which normalises to about 0
        if image.width != image.height:
            assert x[:, 0, 0].abs().max() < 0.02


def test_preprocess_matches_transformers_clip_processor():
    transformers = pytest.importorskip("transformers")
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None)
    if processor_class is None:
        pytest.skip("this transformers has no Pillow CLIP processor")
    processor = processor_class(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    for name in ("echocardiogram.png", "bone_scan.png"):
        image = load_image(IMAGES / name)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(preprocess_image(image, 336, "crop"), theirs, atol=1e-5, rtol=0)


def test_load_image_modes(tmp_path):
    raw = np.asarray(Image.open(IMAGES / "ct_small_16bit.png")).astype(np.float64)
    ct = load_image(IMAGES / "ct_small_16bit.png")
    assert ct.mode == "RGB" and ct.size == (128, 128)
    expected = np.round((raw - raw.min()) * 255 / (raw.max() - raw.min())).astype(np.uint8)
    assert np.array_equal(np.asarray(ct)[..., 0], expected)
    assert all(load_image(p).mode == "RGB" for p in IMAGES.iterdir())

    rgb = Image.open(IMAGES / "echocardiogram.png").convert("RGB")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", rgb.size, 0))  # fully transparent -> white
    rgba.save(tmp_path / "rgba.png")
    assert np.all(np.asarray(load_image(tmp_path / "rgba.png")) == 255)
    la = Image.open(IMAGES / "chest_xray.png").convert("LA")
    la.save(tmp_path / "la.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "la.png"))[..., 0], np.asarray(la)[..., 0])
    p = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    loaded = np.asarray(load_image(tmp_path / "p.png"))
    assert np.all(loaded[np.asarray(p) == 0] == 255)
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    cmyk = load_image(tmp_path / "cmyk.jpg")
    assert cmyk.mode == "RGB" and np.abs(np.asarray(cmyk, float) - np.asarray(rgb, float)).mean() < 10

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rgb.save(tmp_path / "rotated.jpg", exif=exif)
    assert rgb.size == (512, 384) and load_image(tmp_path / "rotated.jpg").size == (384, 512)


def png_declaring(width, height):
    """A tiny PNG whose header claims width x height pixels."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_load_image_errors(tmp_path):
    with pytest.raises(ImageError, match="no such image file") as e:
        load_image(tmp_path / "missing.png")
    assert "missing.png" in str(e.value)
    whole = (IMAGES / "chest_xray.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ImageError, match="truncated.png: corrupt or truncated"):
        load_image(tmp_path / "truncated.png")
    (tmp_path / "notes.png").write_text("these are not pixels")
    with pytest.raises(ImageError, match="notes.png: not an image"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageError, match=f"{tmp_path}: is a directory, not an image file"):
        load_image(tmp_path)
    (tmp_path / "large.png").write_bytes(png_declaring(12_000, 10_000))  # Pillow alone would refuse it
    with pytest.raises(ImageError, match="large.png: corrupt or truncated"):  # read, and its pixels are missing
        load_image(tmp_path / "large.png")
    for side in (40_000, 1_000_000):  # 1.6 and 1,000 gigapixels claimed by a 60-byte file
        (tmp_path / f"bomb{side}.png").write_bytes(png_declaring(side, side))
        with pytest.raises(ImageError, match=r"over the limit .* decompression bomb.*--max-image-pixels"):
            load_image(tmp_path / f"bomb{side}.png")
    with pytest.raises(ImageError, match="over the limit"):
        load_image(IMAGES / "chest_xray.png", max_pixels=100_000)


def test_large_images_are_read_smaller_in_every_mode(tmp_path):
    """min_side reads an image smaller by a whole factor (a JPEG at 1/2 to 1/8 scale, others by
    block means), keeping its modes right: small images and a small min_side keep this cheap."""
    for path in IMAGES.iterdir():
        full, small = load_image(path), load_image(path, min_side=100)
        assert small.mode == "RGB" and 100 <= min(small.size) < 200, path.name  # reduced when 2x or more fits
        assert abs(np.asarray(small, float).mean() - np.asarray(full, float).mean()) < 2, path.name
    # 16-bit: block means at full precision, then windowed from their own min..max
    raw = np.asarray(Image.open(IMAGES / "ct_small_16bit.png")).astype(np.float64)
    ct = np.asarray(load_image(IMAGES / "ct_small_16bit.png", min_side=32))[..., 0]
    blocks = raw.reshape(32, 4, 32, 4).mean(axis=(1, 3))
    assert ct.shape == (32, 32) and ct.min() == 0 and ct.max() == 255
    assert np.abs(ct - (blocks - blocks.min()) * 255 / (blocks.max() - blocks.min())).max() <= 1
    # EXIF rotation survives a JPEG decoded at 1/4 scale
    rgb = Image.open(IMAGES / "echocardiogram.png").convert("RGB")  # 512 x 384
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rgb.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg", min_side=96).size == (96, 128)
    # a palette image is made RGB (transparent -> white) before averaging: indices are not intensities
    p = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    p.save(tmp_path / "p.png", transparency=0)
    small = np.asarray(load_image(tmp_path / "p.png", min_side=96), float)  # 128 x 96: 4 x 4 blocks
    assert np.all(small[(np.asarray(p) == 0).reshape(96, 4, 128, 4).all(axis=(1, 3))] == 255)
    assert np.abs(small - np.asarray(load_image(tmp_path / "p.png").resize((128, 96), Image.BOX), float)).mean() < 1


def test_concat_layouts():
    echo, doppler = load_image(IMAGES / "echocardiogram.png"), load_image(IMAGES / "lymph_node_doppler_us.png")
    bone, chest = load_image(IMAGES / "bone_scan.png"), load_image(IMAGES / "chest_xray.png")
    ct = load_image(IMAGES / "ct_small_16bit.png")
    wide = concat_images([echo, doppler])  # two 512x384 -> stacked, 512x768
    assert wide.size == (512, 768)
    assert np.array_equal(np.asarray(wide)[:384], np.asarray(echo))
    assert np.array_equal(np.asarray(wide)[384:], np.asarray(doppler))
    tall = concat_images([bone, bone])  # two 128x512 -> side by side, 256x512
    assert tall.size == (256, 512)
    assert np.array_equal(np.asarray(tall)[:, 128:], np.asarray(bone))
    # 4 mixed: side by side has w/h = 482/512 + 128/512 + 512/384 + 1 = 3.52, stacked h/w = 6.8
    mixed = concat_images([chest, bone, echo, ct])
    assert mixed.size == (482 + 128 + 683 + 512, 512)
    assert concat_images([ct]) is ct
    with pytest.raises(TooManyImages):
        concat_images([ct] * 5)
    with pytest.raises(ValueError):
        concat_images([])


def test_concat_tie_goes_side_by_side():
    """Equal squares make a composite as elongated either way (w/h 2 or 1/2): the tie is broken towards side by
    side, each image at its own size, in order."""
    a, b = (Image.fromarray(np.full((64, 64, 3), v, np.uint8)) for v in (10, 200))
    pair = concat_images([a, b])
    assert pair.size == (128, 64)
    assert np.all(np.asarray(pair)[:, :64] == 10) and np.all(np.asarray(pair)[:, 64:] == 200)
    assert concat_images([a, b, a, b]).size == (256, 64)


# ----------------------------------------------------------------------------- dataset

@pytest.fixture
def messy(tmp_path):
    """A data folder with every kind of bad record next to good ones."""
    for name in ("chest_xray.png", "head_ct.png", "bone_scan.png"):
        (tmp_path / name).write_bytes((IMAGES / name).read_bytes())
    whole = (IMAGES / "abdomen_ct.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[:len(whole) // 3])
    long_answer = "这是一段很长的回答。" * 60
    records = [
        {"id": "good", "image": "chest_xray.png", "conversations": [human("<image>\n这是什么？"), gpt("胸部X光片。")]},
        {"id": "missing", "image": "nowhere.png", "conversations": [human("<image>\n这是什么？"), gpt("胸部X光片。")]},
        {"id": "five", "image": ["head_ct.png"] * 5, "conversations": [human("<image>\n这是什么？"), gpt("头部CT。")]},
        {"id": "short", "image": "head_ct.png", "conversations": [human("<image>\n这是什么？"), gpt("头")]},
        {"id": "no-conversations", "image": "head_ct.png"},
        {"id": "wrong-types", "image": 5, "conversations": [human("<image>\n这是什么？"), gpt("头部CT。")]},
        {"id": "answer-first", "image": "head_ct.png", "conversations": [gpt("头部CT。"), human("这是什么？")]},
        ["not", "a", "record"],
        {"id": "too-long", "image": "bone_scan.png", "conversations": [human("<image>\n" + long_answer), gpt("是。")]},
        {"id": "truncated", "image": "truncated.png", "conversations": [human("<image>\n这是什么？"), gpt("腹部CT。")]},
        {"id": "text-only", "conversations": [human("CT是什么？"), gpt("计算机断层扫描。")]},
    ]
    return tmp_path, records


EXPECTED_SKIPS = Counter(missing_image=1, too_many_images=1, too_short=1, malformed=4, too_long=1)


def make(path, root, tok, **kw):
    return ChiMedDataset(data_path=path, image_root=root, tokenizer=tok, stage=2, **kw)


def test_exclusions_are_counted_json_and_jsonl(messy, demo_tok):
    root, records = messy
    (root / "d.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    ds = make(root / "d.json", root, demo_tok, max_length=700)
    assert ds.skipped == EXPECTED_SKIPS
    assert [ds.records[i]["id"] for i in ds.kept] == ["good", "truncated", "text-only"]
    assert "kept 3 of 11" in ds.report() and "too_long 1" in ds.report()
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + ["{broken json"]
    (root / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    dsl = make(root / "d.jsonl", root, demo_tok, max_length=700)
    assert dsl.skipped == EXPECTED_SKIPS + Counter(malformed=1) and dsl.lengths == ds.lengths


def test_strict_names_the_sample(messy, demo_tok):
    root, records = messy
    (root / "d.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match=r"sample 1 \(id 'missing'\) excluded: missing_image"):
        make(root / "d.json", root, demo_tok, strict=True)


def test_unreadable_image_at_load_time_is_dropped(messy, demo_tok):
    root, records = messy
    (root / "d.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    ds = make(root / "d.json", root, demo_tok, max_length=700)
    with pytest.warns(UserWarning, match="truncated.png: corrupt or truncated"):
        samples = [ds[k] for k in range(len(ds))]
    assert samples[1] is None and ds.skipped["unreadable_image"] == 1
    batch = collate(samples, demo_tok.pad_id, 336)
    assert batch["n_dropped"] == 1 and batch["ids"] == ["good", "text-only"]
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape == (1, 3, 336, 336)


def test_truncation_after_image_expansion(tmp_path, tok):
    answer = "The lesion in the distal tibia is benign. " * 40
    records = [{"id": "long", "image": "head_ct.png",
                "conversations": [human("<image>\nDescribe."), gpt(answer)]}]
    (tmp_path / "d.json").write_text(json.dumps(records), encoding="utf-8")
    full, _ = render(build_conversation(records[0], 2, "release"), tok)
    for n_feat, max_length in ((576, 700), (576, 2048), (16, 100)):
        ds = ChiMedDataset(data_path=tmp_path / "d.json", image_root=IMAGES, tokenizer=tok, stage=2,
                           style="release", max_length=max_length, num_image_tokens=n_feat)
        sample = ds[0]
        ids, labels = sample["input_ids"], sample["labels"]
        assert len(ids) == ds.lengths[0] == min(max_length, len(full) - 1 + n_feat)
        assert (ids == IMAGE_TOKEN_INDEX).sum() == n_feat and (labels != IGNORE_INDEX).any()
        assert ids.tolist() == expand_images(full, n_feat)[:len(ids)]
    # an image in a later turn that the cut would split: the sample goes, though turn 1 would fit
    late = {"id": "late", "image": "head_ct.png", "conversations": [
        human("Hello."), gpt("Hello, how can I help?"), human("<image>\nWhat is this?"), gpt("A head CT.")]}
    (tmp_path / "late.json").write_text(json.dumps([late]), encoding="utf-8")
    for max_length, kept in ((700, 1), (500, 0)):
        ds = ChiMedDataset(data_path=tmp_path / "late.json", image_root=IMAGES, tokenizer=tok, stage=2,
                           style="release", max_length=max_length)
        assert len(ds) == kept and ds.skipped == Counter(too_long=1 - kept)
    # the prompt alone with its image features overflows: nothing to learn, the sample goes
    ds = ChiMedDataset(data_path=tmp_path / "d.json", image_root=IMAGES, tokenizer=tok, stage=2,
                       style="release", max_length=590)
    assert len(ds) == 0 and ds.skipped == Counter(too_long=1)


def test_demo_samples_load_in_every_stage_and_style(demo_tok):
    for stage in (1, 2):
        for style in ("paper", "release"):
            ds = ChiMedDataset(data_path=ROOT / "samples" / f"stage{stage}.json", image_root=IMAGES,
                               tokenizer=demo_tok, stage=stage, style=style)
            assert len(ds) == len(ds.records) and not ds.skipped
    type_answers = [r["conversations"][1]["value"] for r in ds.records if r["id"].endswith("-type")]
    assert len(type_answers) == 13 == len(set(type_answers))
    texts = [t["value"] for r in ds.records for t in r["conversations"]] + ALIGNMENT_PROMPTS + [SYSTEM]
    assert all(demo_tok.decode(demo_tok.encode(t)) == t for t in texts)  # exact round trips
    assert demo_tok.sp.piece_to_id("<0x0A>") != demo_tok.sp.unk_id()


def test_collate_pads_right_and_finds_positions_on_the_cpu(demo_tok):
    ds = ChiMedDataset(data_path=ROOT / "samples" / "stage2.json", image_root=IMAGES, tokenizer=demo_tok,
                       stage=2, style="release", num_image_tokens=16)
    samples = [ds[0], ds[len(ds) - 1], ds[13]]
    batch = collate(samples, pad_id=demo_tok.pad_id, image_size=336)
    T = max(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, T)
    assert batch["lengths"] == [len(s["input_ids"]) for s in samples]
    flat_ids, flat_labels = batch["input_ids"].flatten(), batch["labels"].flatten()
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        assert torch.equal(batch["input_ids"][b, :n], s["input_ids"])
        assert torch.equal(batch["labels"][b, :n], s["labels"])
        assert (batch["input_ids"][b, n:] == demo_tok.pad_id).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
        # the positions collate hands over: where the features go, and which positions predict a learned token
        image = batch["image_positions"][(batch["image_positions"] // T) == b] % T
        assert image.tolist() == [t for t in range(n) if s["input_ids"][t] == IMAGE_TOKEN_INDEX]
        loss = batch["loss_positions"][(batch["loss_positions"] // T) == b] % T
        assert loss.tolist() == [t - 1 for t in range(1, n) if s["labels"][t] != IGNORE_INDEX]
    assert (flat_ids[batch["image_positions"]] == IMAGE_TOKEN_INDEX).all()
    assert (flat_labels[batch["loss_positions"] + 1] != IGNORE_INDEX).all()
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in samples]))
    assert batch["n_dropped"] == 0


# ----------------------------------------------------------------------------- length-grouped batches

def padding_share(lengths, batches):
    lengths = np.asarray(lengths)
    real = sum(lengths[b].sum() for b in batches)
    padded = sum(lengths[b].max() * len(b) for b in batches)
    return 1 - real / padded


def sampler_order(lengths, batch_size, num_replicas, rank, seed, epoch, mega_batch_mult=50):
    """The order the former LengthGroupedSampler(...).__iter__ gave, verbatim: the batches a resumed
    run skips must stay the same ones, so length_grouped_batches must reproduce it exactly."""
    lengths, global_batch = np.asarray(lengths), batch_size * num_replicas
    total = math.ceil(len(lengths) / global_batch) * global_batch
    rng = np.random.default_rng([seed, epoch])
    order = np.resize(rng.permutation(len(lengths)), total)
    mega = global_batch * mega_batch_mult
    batches = []
    for start in range(0, total, mega):
        chunk = order[start:start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[b:b + global_batch] for b in range(0, len(chunk), global_batch)]
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    for b in rng.permutation(len(batches)):
        yield from batches[b][mine].tolist()


@pytest.mark.parametrize("n,batch_size,num_replicas", [(1, 4, 1), (37, 4, 3), (5000, 16, 4), (9001, 2, 8)])
def test_length_grouped_batches_keep_the_sampler_order(n, batch_size, num_replicas):
    lengths = np.random.default_rng(n).integers(1, 2048, n)
    for rank in range(num_replicas):
        for seed, epoch in ((0, 0), (3, 2)):
            batches = length_grouped_batches(lengths, batch_size, num_replicas, rank, seed, epoch)
            assert all(len(b) == batch_size for b in batches)
            assert [i for b in batches for i in b] == list(sampler_order(lengths, batch_size, num_replicas,
                                                                         rank, seed, epoch))


@pytest.mark.parametrize("n", [6400, 6403])
def test_length_grouped_batches_cover_every_index_once(n):
    lengths = np.random.default_rng(0).lognormal(np.log(650), 0.3, n).astype(int)
    seen = Counter()
    for rank in range(8):
        seen.update(i for b in length_grouped_batches(lengths, 16, 8, rank, seed=3, epoch=2) for i in b)
    assert set(seen) == set(range(n))
    assert sum(seen.values()) - n == (-n) % 128  # only what the last global batch needs is repeated
    assert max(seen.values()) <= 2


def test_length_grouped_batches_deterministic_per_epoch_and_grouped():
    lengths = np.random.default_rng(1).lognormal(np.log(1000), 0.5, 5000).astype(int)

    def batches(epoch, seed=0):
        return length_grouped_batches(lengths, 16, num_replicas=4, rank=1, seed=seed, epoch=epoch)

    assert batches(0) == batches(0) and batches(1) == batches(1)
    assert batches(0) != batches(1) and batches(0, seed=1) != batches(0)
    assert all(len(b) == 16 for b in batches(0)) and len(batches(0)) == 5000 // 64 + 1
    grouped = padding_share(lengths, batches(0))
    maxima = [lengths[b].max() for b in batches(0)]
    assert maxima[:40] != sorted(maxima[:40], reverse=True)  # batches are shuffled, not longest first
    shuffled = np.random.default_rng(0).permutation(len(lengths))
    random = padding_share(lengths, [shuffled[i:i + 16] for i in range(0, len(lengths), 16)])
    assert grouped < 0.05 < random
