"""Talk to Qilin-Med-VL about medical images: the inference of paper section 4.1
(images concatenated into one as in section 3.3, prompts rendered by data.py exactly as training rendered them).
Decoding: one prefill fills a static KV cache (llama.py), then each step feeds one token per row (gpt-fast's loop).
Batches are left-padded, so every row's next token comes from the last column.

    python chat.py samples/images/chest_xray.png --demo            interactive, streamed
    python chat.py IMAGE --model DIR --question "这是什么影像？"   one answer on stdout
"""

import argparse
import functools
import os
import shlex
import sys

import torch

from attention_map import save_map
from checkpoint import CheckpointError, read_config
from data import (MAX_IMAGE_PIXELS, STAGE_TEMPLATE, ImageError, Tokenizer, build_conversation, expand_images, image_input,
                  render)
import lora
from model import QilinMedVL
from quantize import COMPILER, SCHEMES, is_quantized, load_quantized, quantize_model

DEMO_MODEL = "runs/demo-stage2"  # what `torchrun --standalone --nproc_per_node 2 train.py --demo --stage 2` writes
HELP = """/image PATH [PATH ...]  talk about other images (a new dialog)     /reset  a new dialog
/help  this list     /quit or Ctrl-D  leave     Ctrl-C  stop an answer (it is then left out of the dialog)"""
ASK, DEMO_KNOWS = "Ask in Chinese or English.", ("The demo learned only the Chinese questions of samples/stage2.json, "
                                                 "e.g. 这是什么类型的医学影像？ 图中显示的是哪个部位？ (others get a guess)")


def load_model(folder, vision=None, dtype=torch.float32, device="cpu", llm=None, quantize=None, group_size=128):
    """Any layout QilinMedVL.from_pretrained knows, a LoRA run (merged at load; `llm`: its base, if moved), or a
    quantized folder, plus the tokenizer.model that must sit beside it; quantize "int8"/"int4": quantized while it
    loads (quantize.py)."""
    if not os.path.isdir(folder):
        hint = " (train the demo model first: torchrun --standalone --nproc_per_node 2 train.py --demo --stage 2)"
        raise CheckpointError(f"{folder}: no such model folder" + (hint if folder == DEMO_MODEL else ""))
    config = read_config(folder, quantized=True)
    if (kind := config.get("model_type")) == "qilin_med_vl_projector":  # it loads, but can only caption
        raise CheckpointError(f"{folder}: a stage-1 output (the adapter, trained only to caption images); chat needs "
                              f"a stage-2 model. Stage 1's output is for train.py --stage 2 --stage1-output {folder}")
    if llm is not None and kind != lora.LORA_RUN:
        raise CheckpointError(f"--llm {llm} is for a LoRA run's base LLM, but {folder} holds a whole model")
    tokenizer_path = os.path.join(folder, "tokenizer.model")
    if not os.path.isfile(tokenizer_path):
        raise CheckpointError(f"{folder}: no tokenizer.model (copy the LLM's SentencePiece tokenizer.model into it)")
    if kind == lora.LORA_RUN:  # merged in full precision, then quantized if asked
        model = lora.load_run(folder, vision, llm, dtype, device)
        model = quantize_model(model, quantize, group_size, device, dtype) if quantize else model
    elif quantize or config.get("quantization"):
        model = load_quantized(folder, vision, dtype, device, quantize, group_size)
    else:
        model = QilinMedVL.from_pretrained(folder, vision_path=vision, dtype=dtype, device=device)
    model.eval()
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model.config.llm.vocab_size:
        raise CheckpointError(f"{tokenizer_path}: {tokenizer.vocab_size} pieces, but the model has only "
                              f"{model.config.llm.vocab_size} embedding rows (wrong tokenizer?)")
    return model, tokenizer


def load_from_args(args):
    """load_model with the flags of add_model_flags (chat.py, evaluate.py and serve.py alike). On a CPU the decode step
    is compiled by default only for a quantized model: its int8 matvecs gain 2x inside one graph, ~1x eager."""
    model, tokenizer = load_model(args.model, args.vision, args.dtype, args.device, args.llm, args.quantize,
                                  args.group_size)
    if args.compile is None:
        args.compile = COMPILER is not None and is_quantized(model)
        if args.compile:
            print("(compiling the decode step for the quantized model, once: the first answer waits ~30 s; "
                  "--no-compile skips it)", file=sys.stderr, flush=True)
    return model, tokenizer


def load_pixels(paths, model, max_pixels=MAX_IMAGE_PIXELS, frame=None):
    """1..4 image files -> one composite, fitted as the model was trained: (1, 3, S, S)."""
    return image_input(paths, model.config.vision.image_size, model.config.image_fit, max_pixels, frame)[None]


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
    eos_id. prompts: B lists of ids from data.render; pixel_values: (N, 3, S, S), their images in row order, or None.
    A caller may write eos_id into a row of the yielded tokens to end that row (serve.py: its client has gone)."""
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
        yield token
        if eos_id is not None:
            ended |= token == eos_id
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
    if args.attention:  # where the model looked: its attention over the image's patches, rerun only when asked
        save_map(model, prompt, stream.ids, pixels, args.attention)
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


def add_model_flags(p):
    """The flags that choose and load a model, shared by chat.py, evaluate.py and serve.py."""
    p.add_argument("--model", help="model folder: ours, LLaVA's original layout, or llava-hf; holds tokenizer.model")
    p.add_argument("--vision", help="CLIP ViT folder, for a checkpoint in the original LLaVA layout")
    p.add_argument("--llm", help="a LoRA run's base LLaMA folder, if it has moved since training (--vision: its CLIP)")
    p.add_argument("--demo", action="store_true", help=f"use the demo model, --model {DEMO_MODEL}")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N", help="refuse larger images, "
                   "judged by the header (default 2**30, about a gigapixel: slides pass, decompression bombs do not)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bfloat16 on GPU, else float32")
    p.add_argument("--quantize", choices=SCHEMES, help="quantize the LLM's linear layers while loading (quantize.py)")
    p.add_argument("--group-size", type=int, default=128, help="--quantize int4: input channels per scale (128)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="decode with a compiled, graph-captured "
                   "step (default: on with CUDA, ~2x faster; on a CPU only for a quantized model, where it doubles "
                   "int8's speed; otherwise a slower first answer for little gain)")


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
    args.compile = True if cuda and args.compile is None else args.compile  # None on a CPU: load_from_args decides
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
    p = argparse.ArgumentParser(description="Chat with Qilin-Med-VL about medical images.")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="1 to 4 images, concatenated into one")
    add_model_flags(p)
    p.add_argument("--question", help="answer this one question, print only the answer, and exit")
    p.add_argument("--attention", metavar="PNG", help="--question: draw where the answer's attention went in the image")
    p.add_argument("--frame", type=int, metavar="N", help="of a multi-frame DICOM file (0 first; default the middle)")
    add_sampling_flags(p, "with --question")
    args = p.parse_args(argv)
    return check_args(p, args, greedy=args.question is not None, checks=(
        (not args.images, "give an image"),
        (args.question is not None and not args.question.strip(), "--question is empty"),
        (args.attention and args.question is None, "--attention needs --question")))


def one_line(error):
    """An error's message on one line (a checkpoint mismatch spans several), for a command's report."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def main(argv=None):
    args = parse_args(argv)
    try:
        model, tokenizer = load_from_args(args)
        pixels = load_pixels(args.images, model, args.max_image_pixels, args.frame)
        if args.question is None:
            chat(model, tokenizer, pixels, args)
        elif answer(model, tokenizer, [{"from": "human", "value": args.question}], pixels, args) is None:
            return 1  # it does not fit the context
        return 0
    except (CheckpointError, ImageError, ValueError, OSError) as e:  # bad input: one line, no traceback
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while loading
        return 130


if __name__ == "__main__":
    sys.exit(main())
