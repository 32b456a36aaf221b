"""Talk to Qilin-Med-VL about medical images, or score it on a VQA file: the inference of paper section 4.1
(images concatenated into one as in section 3.3, prompts rendered by data.py exactly as training rendered them).
Decoding: one prefill fills a static KV cache (llama.py), then each step feeds one token per row (gpt-fast's loop).
Batches are left-padded, so every row's next token comes from the last column.

    python chat.py samples/images/chest_xray.png --demo            interactive, streamed
    python chat.py IMAGE --model DIR --question "这是什么影像？"   one answer on stdout
    python chat.py --eval test.jsonl --model DIR --out answers.jsonl   batched scoring
"""

import argparse
import csv
import functools
import itertools
import json
import os
import re
import shlex
import sys
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import CheckpointError, read_config
from data import (IMAGE, MAX_IMAGE_PIXELS, MAX_IMAGES, STAGE_TEMPLATE, ImageError, Tokenizer, TooManyImages,
                  build_conversation, expand_images, image_files, image_input, read_records, render)
from model import QilinMedVL
from quantize import SCHEMES, load_quantized

DEMO_MODEL = "runs/demo-stage2"  # what `torchrun --standalone --nproc_per_node 2 train.py --demo --stage 2` writes
HELP = """/image PATH [PATH ...]  talk about other images (a new dialog)     /reset  a new dialog
/help  this list     /quit or Ctrl-D  leave     Ctrl-C  stop an answer (it is then left out of the dialog)"""
ASK, DEMO_KNOWS = "Ask in Chinese or English.", ("The demo learned only the Chinese questions of samples/stage2.json, "
                                                 "e.g. 这是什么类型的医学影像？ 图中显示的是哪个部位？ (others get a guess)")


def load_model(folder, vision=None, dtype=torch.float32, device="cpu", quantize=None, group_size=128):
    """Any layout QilinMedVL.from_pretrained knows, plus the tokenizer.model that must sit beside it; a quantized
    folder, or (quantize "int8"/"int4") a full one quantized while it loads, through quantize.py."""
    if not os.path.isdir(folder):
        hint = " (train the demo model first: torchrun --standalone --nproc_per_node 2 train.py --demo --stage 2)"
        raise CheckpointError(f"{folder}: no such model folder" + (hint if folder == DEMO_MODEL else ""))
    config = read_config(folder, quantized=True)
    if config.get("model_type") == "qilin_med_vl_projector":  # it loads, but can only caption
        raise CheckpointError(f"{folder}: a stage-1 output (the adapter, trained only to caption images); chat needs "
                              f"a stage-2 model. Stage 1's output is for train.py --stage 2 --stage1-output {folder}")
    tokenizer_path = os.path.join(folder, "tokenizer.model")
    if not os.path.isfile(tokenizer_path):
        raise CheckpointError(f"{folder}: no tokenizer.model (copy the LLM's SentencePiece tokenizer.model into it)")
    if quantize or config.get("quantization"):
        model = load_quantized(folder, vision, dtype, device, quantize, group_size).eval()
    else:
        model = QilinMedVL.from_pretrained(folder, vision_path=vision, dtype=dtype, device=device).eval()
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model.config.llm.vocab_size:
        raise CheckpointError(f"{tokenizer_path}: {tokenizer.vocab_size} pieces, but the model has only "
                              f"{model.config.llm.vocab_size} embedding rows (wrong tokenizer?)")
    return model, tokenizer


def load_pixels(paths, model, max_pixels=MAX_IMAGE_PIXELS):
    """1..4 image files -> one composite, fitted as the model was trained: (1, 3, S, S)."""
    return image_input(paths, model.config.vision.image_size, model.config.image_fit, max_pixels)[None]


def prompt_ids(turns, tokenizer, style, has_image=True):
    """Dialog turns, ending with the user's question -> the ids training would have rendered for them."""
    record = {"image": "image" if has_image else None, "conversations": turns}
    return render(build_conversation(record, 2, style), tokenizer, STAGE_TEMPLATE[(2, style)])[0]  # (ids, labels)


def sample(logits, temperature, top_p, rng):
    """Next tokens (B,) from logits (B, vocab): argmax at temperature 0, else top-p sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs, order = torch.softmax(logits.float() / temperature, -1).sort(-1, descending=True)  # (B, vocab)
    probs[probs.cumsum(-1) - probs > top_p] = 0  # keep the smallest head with top_p of the mass (at least one)
    return order.gather(-1, torch.multinomial(probs, 1, generator=rng)).squeeze(-1)  # multinomial renormalises


@functools.cache
def compiled(llm):
    """One decode step compiled as in gpt-fast: its shapes never change (one token per row, the static cache, a tensor
    slot), so mode="reduce-overhead" replays its ~1,000 kernel launches (an eager step's limit) as one CUDA graph.
    Once per model and cache size; on the CPU the matmuls dominate, so there is little to gain."""
    return torch.compile(llm, mode="reduce-overhead", fullgraph=True)


@torch.inference_mode()
def generate(model, prompts, pixel_values, max_new_tokens, temperature=0.0, top_p=1.0, eos_id=None, rng=None,
             compile=False):
    """Yield every row's next token, (B,) per step, until all rows have ended or max_new_tokens; an ended row gets
    eos_id. prompts: B lists of ids from data.render; pixel_values: (N, 3, S, S), their images in row order, or None."""
    llm, device = model.llm, model.llm.lm_head.weight.device
    prompts = [expand_images(p, model.num_image_tokens) for p in prompts]
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=device)  # (B, L), left-padded
    real = torch.tensor([[False] * (L - len(p)) + [True] * len(p) for p in prompts], device=device)  # (B, L)
    embeds = model.embed(ids, None if pixel_values is None else pixel_values.to(device))  # (B, L, dim)
    llm.setup_cache(B, L + max_new_tokens, embeds.dtype)  # the activations' dtype (a quantized weight's is not)
    pad_mask = torch.cat([real, real.new_ones(B, llm.cache_len - L)], 1)  # (B, S): False at padding
    # prefill: slots 0..L-1; RoPE positions count each row's real tokens; logits of the last column only
    logits = llm(inputs_embeds=embeds, input_pos=torch.arange(L, device=device), pad_mask=pad_mask,
                 positions=(real.cumsum(1) - 1).clamp(min=0), logits_at=torch.arange(B, device=device) * L + L - 1)
    step = compiled(llm) if compile else llm
    start = real.sum(1, keepdim=True)  # (B, 1): each row's RoPE position for its first new token
    slots = torch.arange(L, L + max_new_tokens, device=device)  # the cache slot of each new token
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_p, rng)  # (B,)
        if eos_id is not None:
            token = token.masked_fill(ended, eos_id)
            ended |= token == eos_id
        yield token
        if i == max_new_tokens - 1 or bool(ended.all()):
            break
        # one token per row into slot L + i, seeing the real slots up to L + i; logits (B, vocab) as the prefill's
        logits = step(token[:, None], input_pos=slots[i:i + 1], positions=start + i, pad_mask=pad_mask)[:, -1]


def generate_batch(model, prompts, pixel_values, max_new_tokens, eos_id, **sampling):
    """Every row's new tokens as a list of ids, up to (without) its EOS."""
    steps = list(generate(model, prompts, pixel_values, max_new_tokens, eos_id=eos_id, **sampling))  # (B,) each
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]
    return [[t for t in row if t != eos_id] for row in rows]  # an ended row gets only eos_id


class TextStream:
    """Ids in, new text out, never half a character: one made of byte pieces (<0xE8><0x83><0xB8>) waits for them all.
    All ids so far are decoded each time, and a trailing U+FFFD (an incomplete character) is held back."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""  # wait for the rest of the character
        new, self.text = text[len(self.text):], text
        return new


def room(model, prompt, max_new_tokens):
    """How many new tokens fit after the prompt in the model's context (0: the prompt does not fit)."""
    length = len(expand_images(prompt, model.num_image_tokens))
    return max(0, min(max_new_tokens, model.config.llm.max_seq_len - length)), length


def answer(model, tokenizer, turns, pixels, args):
    """Render the dialog, stream the answer to stdout, return its text (None: it did not fit)."""
    prompt = prompt_ids(turns, tokenizer, model.config.style, pixels is not None)
    budget, length = room(model, prompt, args.max_new_tokens or 512)
    if budget == 0:
        print(f"the dialog is {length} tokens with the image's features; it does not fit the model's context "
              f"of {model.config.llm.max_seq_len}", file=sys.stderr)
        return None
    if args.max_new_tokens and budget < args.max_new_tokens:  # only news when the user asked for more
        print(f"(the answer is capped at {budget} tokens: that is the room left in the context)", file=sys.stderr)
    stream = TextStream(tokenizer)
    for token in generate(model, [prompt], pixels, budget, args.temperature, args.top_p, tokenizer.eos_id, args.rng,
                          args.compile):
        if token.item() != tokenizer.eos_id:  # EOS, if it comes, is the last step
            print(stream.push(token.item()), end="", flush=True)
    print(flush=True)
    return stream.text


def chat(model, tokenizer, pixels, args):
    """The interactive loop: each answer re-renders the whole dialog and refills the cache (reusing its buffers)."""
    turns = []
    demo = os.path.abspath(args.model) == os.path.abspath(DEMO_MODEL)
    print(f"Qilin-Med-VL from {args.model} ({model.config.style} prompts). {DEMO_KNOWS if demo else ASK}\n{HELP}")
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:  # Ctrl-D at the prompt: leave quietly
            print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: as Python's REPL, a new prompt and how to leave
            print("\n(/quit or Ctrl-D leaves)")
            continue
        command, _, rest = line.partition(" ")
        if command == "/quit":
            return
        elif command == "/reset":
            turns = []
            print("(new dialog about the same image)")
        elif command == "/image":
            try:
                paths = shlex.split(rest)
                if not paths:
                    raise ValueError("/image needs one to four image paths")
                pixels, turns = load_pixels(paths, model, args.max_image_pixels), []
                print(f"(new dialog about {' and '.join(paths)})")
            except ValueError as e:  # ImageError, TooManyImages, bad quoting: the old image stays
                print(f"error: {e}", file=sys.stderr)
        elif command.startswith("/"):
            print(HELP if command == "/help" else f"unknown command {command}. {HELP}")
        elif line:
            question = {"from": "human", "value": line}
            try:
                reply = answer(model, tokenizer, turns + [question], pixels, args)
            except KeyboardInterrupt:  # stop this answer only; a cut-off answer is not kept as history
                print(" [stopped]", flush=True)
                continue
            if reply is None:  # the dialog has outgrown the context
                print("(/reset starts a new dialog)")
            else:
                turns += [question, {"from": "gpt", "value": reply}]


def pmc_vqa_to_records(csv_path):
    """PMC-VQA's CSV (Figure_path, Question, Anwser [sic], Choice A..D, Answer_label) -> records listing the choices,
    keeping choices and label for scoring; bad rows are skipped with a warning."""
    records, bad = [], []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        for row_number, row in enumerate(csv.DictReader(f), start=2):  # row 1 is the header
            cell = defaultdict(str, {k: (v or "").strip() for k, v in row.items() if k})  # a missing cell is None
            choices = {x: re.sub(rf"^{x}:\s*", "", cell[f"Choice {x}"], flags=re.I)  # "A: text" -> "text"
                       for x in "ABCD" if cell[f"Choice {x}"]}
            figure, question, answer, label = (cell[k] for k in ("Figure_path", "Question", "Anwser", "Answer_label"))
            if not (figure and question and answer) or label not in choices:
                bad.append(f"row {row_number}: empty figure, question or answer, or label {label!r} not a choice")
                continue
            lines = "\n".join(f"{k}: {v}" for k, v in choices.items())
            records.append({"id": f"pmc_vqa_{row_number}", "image": figure, "choices": choices, "answer_label": label,
                            "conversations": [{"from": "human", "value": f"{IMAGE}\n{question}\n{lines}"},
                                              {"from": "gpt", "value": answer}], "caption": cell["Caption"]})
    if bad:
        warnings.warn(f"{csv_path}: skipped {len(bad)} malformed rows, e.g. {bad[0]}")
    return records


YES, NO = ("yes", "是", "是的", "对", "有"), ("no", "否", "不是", "不对", "不", "没有", "无")
LEADING_LETTER = re.compile(r"[(（\[]?([A-D])\s*(?:$|[:：.)）\],，、])")  # "B", "(C)", "A: CT"; not "A chest"
STATED_LETTER = re.compile(r"(?i:answer|option|choice|答案|选项|选择|选)\s*(?i:is|是|为)?\s*[:：]?\s*[(（]?([A-D])(?![A-Za-z])")


def yes_no(text, strict=True):
    """'yes', 'no' or None by whole words: "No, ..." is no, "normal" is not (LLaVA-Med's bug). strict (references):
    a first clause that is a yes/no word; else (predictions) one starting so, or a lone "yes"/"no" anywhere."""
    clause = re.split(r"[\s,.;:!?，。；：！？、]", text.strip().lower(), maxsplit=1)[0]
    for word in NO + YES:  # negatives first: "不是" starts with "不", not "是"
        if clause == word or (not strict and not word.isascii() and clause.startswith(word)):
            return "no" if word in NO else "yes"
    found = set() if strict else set(re.findall(r"\b(yes|no)\b", text.lower()))
    return found.pop() if len(found) == 1 else None


def choice_letter(prediction, choices):
    """The letter a prediction picks from {"A": text, ...}: "(C) ...", "答案是B", else the one choice it quotes."""
    text = prediction.strip()
    m = LEADING_LETTER.match(text) or STATED_LETTER.search(text)
    if m and m.group(1) in choices:
        return m.group(1)
    hits = sorted((len(v), k) for k, v in choices.items() if v and v.lower() in text.lower())  # the longest wins
    return hits[-1][1] if hits and (len(hits) == 1 or hits[-1][0] > hits[-2][0]) else None


def recall(prediction, reference):
    """Share of the reference's tokens (Latin words, numbers, single CJK characters) the prediction contains."""
    ref, pred = (Counter(re.findall(r"[0-9a-z\u00c0-\u024f]+|[^\W_]", t.lower())) for t in (reference, prediction))
    return sum((ref & pred).values()) / sum(ref.values()) if ref else None


def score(prediction, reference, record, turn):
    """(kind, result): a multiple-choice first turn by its letter, a yes/no reference by yes or no, else recall."""
    if turn == 0 and record.get("choices") and record.get("answer_label"):
        return "multiple_choice", {"correct": choice_letter(prediction, record["choices"]) == record["answer_label"]}
    if yes_no(reference) is not None:
        return "yes_no", {"correct": yes_no(prediction, strict=False) == yes_no(reference)}
    return "open", {"recall": recall(prediction, reference)}


def record_questions(record, model, tokenizer, image_root, args, skipped):
    """A record's questions: each gpt turn after its reference dialog; none if unusable, and `skipped` says why."""
    try:
        turns, paths = record["conversations"], [os.path.join(image_root, f) for f in image_files(record)]
        pixels = load_pixels(paths, model, args.max_image_pixels) if paths else None
        questions = []
        for k in range(1, len(turns), 2):
            prompt = prompt_ids(turns[:k], tokenizer, model.config.style, pixels is not None)
            budget = room(model, prompt, args.max_new_tokens or 512)[0]  # as if alone, whatever it is batched with
            if budget == 0:
                skipped["answers_over_context"] += 1
            else:
                questions.append(dict(record=record, turn=k // 2, prompt=prompt, pixels=pixels, room=budget,
                                      question=turns[k - 1]["value"], reference=turns[k]["value"]))
        return questions
    except ImageError:
        skipped["records_missing_or_corrupt_image"] += 1
    except TooManyImages:
        skipped["records_too_many_images"] += 1
    except (ValueError, KeyError, TypeError, AttributeError):  # not a record of alternating turns
        skipped["records_malformed"] += 1
    return []


def evaluate(model, tokenizer, args):
    """Answer every gpt turn of every record, batch_size at a time as the records are read (one batch of images in
    memory); write one JSON line per answer, then report the metrics."""
    records = pmc_vqa_to_records(args.eval) if args.eval.lower().endswith(".csv") else read_records(args.eval)
    image_root = args.image_root or os.path.dirname(os.path.abspath(args.eval))
    skipped, results = Counter(), []
    # the progress bar only in a terminal (disable=None), so that a log holds the results and errors alone
    progress = tqdm(records, desc="evaluating", unit="record", file=sys.stderr, disable=None)
    questions = (q for r in progress for q in record_questions(r, model, tokenizer, image_root, args, skipped))
    with open(args.out, "w", encoding="utf-8") as out:
        while batch := list(itertools.islice(questions, args.batch_size)):  # reads records as far as this batch needs
            # decoded for the largest room, each answer cut to its own; positions are per row, so batching changes none
            pixels = [q["pixels"] for q in batch if q["pixels"] is not None]
            answers = generate_batch(model, [q["prompt"] for q in batch], torch.cat(pixels) if pixels else None,
                                     max(q["room"] for q in batch), tokenizer.eos_id, temperature=args.temperature,
                                     top_p=args.top_p, rng=args.rng, compile=args.compile)
            for q, ids in zip(batch, answers):
                prediction = tokenizer.decode(ids[:q["room"]])
                kind, result = score(prediction, q["reference"], q["record"], q["turn"])
                results.append(dict(id=q["record"].get("id"), turn=q["turn"], question=q["question"],
                                    reference=q["reference"], prediction=prediction, kind=kind, **result))
                out.write(json.dumps(results[-1], ensure_ascii=False) + "\n")
    if not results:  # rather than a table of dashes: why (the most common skip), and what to change
        counts = ", ".join(f"{k} {v}" for k, v in skipped.most_common()) or "none"
        hint = {"records_missing_or_corrupt_image": f"image names are relative to {image_root}; see --image-root",
                "records_too_many_images": f"a record takes at most {MAX_IMAGES} images",
                "records_malformed": "a record needs 'conversations' of alternating human and gpt turns",
                "answers_over_context": "the questions with the image's features are longer than the model's context",
                }.get(skipped.most_common(1)[0][0] if skipped else None, "no record has a gpt turn to answer")
        raise ValueError(f"{args.eval}: no answers from {len(records)} records (skipped: {counts}); {hint}")
    report(results, len(records), skipped, args.out)


def report(results, n_records, skipped, out):
    """The metrics as a table on stdout and as JSON in STEM.metrics.json, beside the answers file `out`."""
    m = {"records": n_records, "answers": len(results), "skipped": dict(skipped)}
    print(f"{'metric':<28}{'n':>7}{'value':>9}")
    for name, kind, field in (("multiple_choice_accuracy", "multiple_choice", "correct"),
                              ("yes_no_accuracy", "yes_no", "correct"), ("open_recall", "open", "recall")):
        values = [r[field] for r in results if r["kind"] == kind]
        known = [v for v in values if v is not None]  # a reference without words has no recall
        value = sum(known) / len(known) if known else None
        m[name] = {"n": len(values), "value": value}
        print(f"{name:<28}{len(values):>7}{'-' if value is None else f'{value:.3f}':>9}")
    counts = ", ".join(f"{k} {v}" for k, v in skipped.items()) or "none"
    print(f"{len(results)} answers from {n_records} records; skipped: {counts}")
    path = Path(out).with_suffix(".metrics.json")
    path.write_text(json.dumps(m, indent=2), encoding="utf-8")
    print(f"wrote {out} and {path}")


def add_model_flags(p):
    """The flags that choose and load a model, shared by chat.py, evaluate.py and serve.py."""
    p.add_argument("--model", help="model folder: ours, LLaVA's original layout, or llava-hf; holds tokenizer.model")
    p.add_argument("--vision", help="CLIP ViT folder, for a checkpoint in the original LLaVA layout")
    p.add_argument("--demo", action="store_true", help=f"use the demo model, --model {DEMO_MODEL}")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N", help="refuse larger images, "
                   "judged by the header (default 2**30, about a gigapixel: slides pass, decompression bombs do not)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bfloat16 on GPU, else float32")
    p.add_argument("--quantize", choices=SCHEMES, help="quantize the LLM's linear layers while loading (quantize.py)")
    p.add_argument("--group-size", type=int, default=128, help="--quantize int4: input channels per scale (128)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="decode with a compiled, graph-captured "
                   "step (default: on with CUDA, ~2x faster; off on CPU: a slower first answer for little gain)")


def add_sampling_flags(p, greedy_default):
    """How answers are drawn; `greedy_default` names when --temperature defaults to 0."""
    p.add_argument("--temperature", type=float, help=f"0 is greedy (default 0.2 in chat; 0 {greedy_default}, "
                   "so scripts get the same answer every time)")
    p.add_argument("--top-p", type=float, default=0.9, help="sample from the smallest set with this much mass")
    p.add_argument("--max-new-tokens", type=int, help="answer length limit (default 512 or what fits the context)")
    p.add_argument("--seed", type=int, help="seed for sampling (default: a random one)")


def check_args(p, args, greedy, checks=()):
    """The shared flags checked (then `checks`, (bad, message) pairs), defaults filled in: `dtype` as a torch dtype,
    `rng` the seeded sampling generator, temperature 0 when `greedy`. The first failure exits through p.error."""
    args.model = DEMO_MODEL if args.demo else args.model
    for bad, message in (  # the first that fails, before anything loads
            (not args.model, "give --model DIR (or --demo)"), *checks,
            (args.max_image_pixels < 1, f"--max-image-pixels must be at least 1, not {args.max_image_pixels}"),
            (args.max_new_tokens is not None and args.max_new_tokens < 1, "--max-new-tokens must be at least 1"),
            (not 0 < args.top_p <= 1, f"--top-p must be above 0 and at most 1, not {args.top_p}"),
            (not (args.temperature is None or args.temperature >= 0),
             f"--temperature must be 0 (greedy) or above, not {args.temperature}")):
        if bad:
            p.error(message)
    if args.temperature is None:
        args.temperature = 0.0 if greedy else 0.2
    cuda = args.device.startswith("cuda")
    args.compile = cuda if args.compile is None else args.compile
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    try:
        args.rng = torch.Generator(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device}: {e}")
    if args.seed is None:
        args.rng.seed()  # a random one
    else:
        args.rng.manual_seed(args.seed)
    return args


def parse_args(argv=None):
    """The checked flags, defaults filled in, `dtype` as a torch dtype, and `rng`, the seeded sampling generator."""
    p = argparse.ArgumentParser(description="Chat with Qilin-Med-VL about medical images, or evaluate it.")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="1 to 4 images, concatenated into one")
    add_model_flags(p)
    p.add_argument("--question", help="answer this one question, print only the answer, and exit")
    p.add_argument("--eval", metavar="FILE", help="answer every record of a JSON/JSONL file or PMC-VQA CSV")
    p.add_argument("--out", default="answers.jsonl", help="--eval: answers file; metrics go to STEM.metrics.json")
    p.add_argument("--image-root", help="--eval: folder the records' image names are relative to (default: FILE's)")
    p.add_argument("--batch-size", type=int, default=8, help="--eval: answers generated together")
    add_sampling_flags(p, "with --question and --eval")
    args = p.parse_args(argv)
    return check_args(p, args, greedy=bool(args.eval or args.question is not None), checks=(
        (not args.eval and not args.images, "give an image (or --eval FILE)"),
        (args.question is not None and not args.question.strip(), "--question is empty"),
        (args.batch_size < 1, f"--batch-size must be at least 1, not {args.batch_size}")))


def one_line(error):
    """An error's message on one line (a checkpoint mismatch spans several), for a command's report."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def main(argv=None):
    args = parse_args(argv)
    try:
        model, tokenizer = load_model(args.model, args.vision, args.dtype, args.device, args.quantize, args.group_size)
        pixels = None if args.eval else load_pixels(args.images, model, args.max_image_pixels)
        if args.eval:
            evaluate(model, tokenizer, args)
        elif args.question is None:
            chat(model, tokenizer, pixels, args)
        elif answer(model, tokenizer, [{"from": "human", "value": args.question}], pixels, args) is None:
            return 1  # it does not fit the context
        return 0
    except (CheckpointError, ImageError, ValueError, OSError) as e:  # bad input: one line, no traceback
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while loading or evaluating
        return 130


if __name__ == "__main__":
    sys.exit(main())
