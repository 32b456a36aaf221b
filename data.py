"""What the model sees: images, prompts, dialog templates, samples and batches.

Implements the data side of Qilin-Med-VL (Liu et al., 2023):
- section 3.3 "Data processing": several images that belong to one text are concatenated into
  one composite image, horizontally or vertically, whichever keeps the aspect ratio less extreme;
  samples with more than 4 images or with overly short text are discarded; the paper's prompt
  templates (appendix A.1, in prompts/) turn captions and questions into dialog.
- section 4.2 "Training": stage 1 (feature alignment) learns to caption an image after one of 22
  alignment prompts; stage 2 (instruction tuning) answers a question wrapped in one of 7
  instruction prompts. The released code used LLaVA's `plain` and `v1` templates instead;
  `style="release"` selects those, `style="paper"` (the default) the paper's prompts.

The text side follows LLaVA's conventions, so that LLaVA / ChiMed-VL json files load as they are
and the released weights see the token sequences they were trained on: one `<image>` placeholder
per image becomes the id IMAGE_TOKEN_INDEX here, repeated once per image feature (expand_images);
model.py writes the image's features at those positions.
"""

import argparse
import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104), as LLaVA's expand2square
# The largest image load_image reads, judged by its header before decoding anything. Whole-slide
# pathology tiles and large scans run to 10,000-30,000 pixels a side; a header claiming more is
# refused as a likely decompression bomb (a small file that would fill the memory). A JPEG is
# decoded at down to 1/8 scale, other formats whole before they are reduced: up to 4 bytes a pixel,
# so an image at this limit can take 4 GiB for a moment. --max-image-pixels changes it.
MAX_IMAGE_PIXELS = 2**30  # 32768 x 32768, about 1.07 gigapixels
MAX_IMAGES = 4  # paper 3.3: samples with more images are excluded
IMAGE = "<image>"  # the placeholder in text
IMAGE_TOKEN_INDEX = -200  # LLaVA's id for it in input_ids (no vocabulary row): one per image, then one per feature
IGNORE_INDEX = -100  # the label of a position that is not learned (cross_entropy's default ignore_index)

# Pillow refuses images over 179 megapixels (and warns over 89) as possible decompression bombs.
# load_image applies its own, larger limit (max_pixels) to the header instead, so it is the only one.
Image.MAX_IMAGE_PIXELS = None

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
ALIGNMENT_PROMPTS = json.loads((PROMPT_DIR / "alignment.json").read_text(encoding="utf-8"))  # 22
INSTRUCTION_PROMPTS = json.loads((PROMPT_DIR / "instruction.json").read_text(encoding="utf-8"))  # 7
TEMPLATES = json.loads((PROMPT_DIR / "templates.json").read_text(encoding="utf-8"))
# which dialog template each stage renders into, per style (paper section 4.2, or as released)
STAGE_TEMPLATE = {(1, "paper"): "v1", (2, "paper"): "v1", (1, "release"): "plain", (2, "release"): "v1"}


# ----------------------------------------------------------------------------- images

class ImageError(ValueError):
    """An image file that cannot be used: missing, corrupt, not an image, or too large."""


class TooManyImages(ValueError):
    """More images for one text than the composite takes (paper 3.3: the sample is excluded)."""


def load_image(path, max_pixels=MAX_IMAGE_PIXELS, min_side=None):
    """Read any image file Pillow knows as an upright 8-bit RGB image, or raise ImageError.

    min_side: a large image is read smaller, by the largest whole factor that leaves its shorter
    side at least min_side pixels (image_input asks for a few times the model's input side, all
    the fit to that side can use); None keeps every pixel."""
    path = str(path)
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, not an image file")
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:  # reads the header only
            if image.width * image.height > max_pixels:
                raise ImageError(f"{path}: {image.width}x{image.height} pixels is over the limit of {max_pixels} "
                                 f"(a decompression bomb?); --max-image-pixels N raises it")
            factor = min(image.size) // min_side if min_side else 1
            if factor >= 2:  # a JPEG decodes at 1/2, 1/4 or 1/8 scale itself (other formats ignore the draft)
                image.draft(None, (image.width // factor, image.height // factor))
            image.load()  # decodes now, so a truncated file fails here and not later
            ImageOps.exif_transpose(image, in_place=True)  # phone and scanner photos store rotation in EXIF
            factor = min(image.size) // min_side if min_side else 1  # what is left: other formats, or beyond 1/8
            return _to_rgb(_reduce(image, factor) if factor >= 2 else image)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image file (Pillow cannot identify it)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from e


def _reduce(image, factor):
    """The mean of each factor x factor block (Image.reduce), in a mode whose values can be averaged:
    palette indices, transparency and 1-bit go to RGB first; 16-bit to 32-bit (reduce has no 16-bit)."""
    if image.mode.startswith("I;16"):
        image = image.convert("I")
    elif image.mode not in ("L", "RGB", "I", "F") or "transparency" in image.info:
        image = _to_rgb(image)
    return image.reduce(factor)


def _to_rgb(image):
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float images (CT, MRI exports) are stretched from their own min..max to 0..255:
        # exporters often fill only 12 of 16 bits, so dividing by 65535 would leave them nearly black
        a = np.asarray(image, dtype=np.float64)
        lo, hi = a.min(), a.max()
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # transparent pixels become white (as on a page), never an arbitrary hidden colour
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB


def concat_images(images):
    """Paper 3.3: 1..4 images -> one composite, side by side or stacked, the less elongated one."""
    if not images:
        raise ValueError("concat_images needs at least one image")
    if len(images) > MAX_IMAGES:
        raise TooManyImages(f"{len(images)} images for one sample; at most {MAX_IMAGES} are concatenated")
    if len(images) == 1:
        return images[0]
    # aspect ratio (w/h) of the composite, whatever common height or width is chosen:
    # side by side it is sum(w_i/h_i), stacked it is 1 / sum(h_i/w_i)
    wide = sum(im.width / im.height for im in images)
    tall = 1.0 / sum(im.height / im.width for im in images)
    horizontal = max(wide, 1 / wide) <= max(tall, 1 / tall)
    if horizontal:  # equalise heights to the tallest image
        h = max(im.height for im in images)
        parts = [im.resize((max(1, round(im.width * h / im.height)), h), Image.BICUBIC) for im in images]
        canvas = Image.new("RGB", (sum(p.width for p in parts), h))
    else:  # equalise widths to the widest image
        w = max(im.width for im in images)
        parts = [im.resize((w, max(1, round(im.height * w / im.width))), Image.BICUBIC) for im in images]
        canvas = Image.new("RGB", (w, sum(p.height for p in parts)))
    offset = 0
    for p in parts:
        canvas.paste(p, (offset, 0) if horizontal else (0, offset))
        offset += p.width if horizontal else p.height
    return canvas


def preprocess_image(image, size=336, mode="pad"):
    """RGB PIL image -> CLIP input (3, size, size): bicubic resampling, CLIP's mean and std."""
    w, h = image.size
    if mode == "pad":  # LLaVA's expand2square: centre on a mean-coloured square, then resize
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), PAD_COLOR)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas.resize((size, size), Image.BICUBIC)
    elif mode == "crop":  # CLIP's recipe: shortest side to `size`, then the centre square
        short, long = min(w, h), max(w, h)
        long = int(size * long / short)  # truncated, as CLIPImageProcessor does
        new_w, new_h = (size, long) if w <= h else (long, size)
        image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    else:
        raise ValueError(f"image fit mode must be 'pad' or 'crop', got {mode!r}")
    x = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).astype(np.float32)) / 255  # (3, S, S) in 0..1
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def image_input(paths, size=336, mode="pad", max_pixels=MAX_IMAGE_PIXELS):
    """1..4 image files of one sample -> the model's input: one composite, fitted, (3, size, size).

    A large image is read with its shorter side at 4 x size or a little more. No part of the composite
    keeps more than `size` pixels along its shorter side, so each output pixel still averages 4 x 4
    or more of the pixels read, and all that follows the decoding (colour conversion, the composite,
    the fit) handles a few megapixels, however large the scan."""
    if len(paths) > MAX_IMAGES:  # before reading any of them
        raise TooManyImages(f"{len(paths)} images for one sample; at most {MAX_IMAGES} are concatenated")
    return preprocess_image(concat_images([load_image(p, max_pixels, 4 * size) for p in paths]), size, mode)


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """A SentencePiece model with LLaMA's special ids (unk 0, bos 1, eos 2)."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no SentencePiece tokenizer.model here")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # LLaMA-2 defines no pad piece (pad_id() == -1); like LLaVA we pad with unk. The value never
        # matters: pads come after every real token and their labels are IGNORE_INDEX.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else max(self.sp.unk_id(), 0)
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text, bos=False, eos=False):
        # SentencePiece adds its "dummy prefix" (a leading ▁) to every call, as LLaMA's tokenizer does
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids):
        return self.sp.decode([i for i in ids if i >= 0])  # image placeholders and ignore labels are not text


# ----------------------------------------------------------------------------- prompts and templates

def _strip_image(text):
    """Remove every <image> placeholder together with the newline that joins it to the text."""
    return text.replace(IMAGE + "\n", "").replace("\n" + IMAGE, "").replace(IMAGE, "").strip()


def wrap_question(question, prompt_index=0, with_image=True):
    """Paper stage 2: put a question into instruction prompt `prompt_index`, which places <image>."""
    prompt = INSTRUCTION_PROMPTS[prompt_index]
    if not with_image:
        prompt = _strip_image(prompt)
    return prompt.replace("<question>", _strip_image(question)).strip()  # strip: for an empty question


def _release_turns(turns, has_image):
    """The turns as LLaVA's preprocess_multimodal leaves them for the released model's training.

    A turn holding <image> loses every tag and the whitespace around the rest, then gets one tag
    back in front: "Is <image> normal?" -> "<image>\nIs  normal?" (the double space stays). Other
    turns stay verbatim, whitespace and all. A sample's images are one composite (paper 3.3), so
    where LLaVA would see several tags or none we keep exactly one: only the first human turn
    holding a tag keeps it (LLaVA tags every such turn), and a sample with images but no tag gets
    it before its first question (LLaVA would train without the image). A text-only record loses
    any stray tag (LLaVA would read the letters "<image>").
    """
    tagged = (k for k, t in enumerate(turns) if t["from"] == "human" and IMAGE in t["value"])
    keep = next(tagged, 0) if has_image else None  # the one turn that holds the tag
    out = []
    for k, turn in enumerate(turns):
        value = turn["value"]
        if k == keep:  # .strip() again: a turn that was the tag alone becomes "<image>", not "<image>\n"
            value = (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()
        elif IMAGE in value:
            value = value.replace(IMAGE, "").strip()
        out.append({"from": turn["from"], "value": value})
    return out


def build_conversation(record, stage, style="paper", rng=None):
    """A record's turns as the given stage and style present them (rng picks paper prompts)."""
    has_image = bool(image_files(record))
    if style == "release":  # the text LLaVA's code trained the released weights on
        turns = _release_turns(record["conversations"], has_image)
        if stage == 1:  # LLaVA's preprocess_plain: the image alone, then the caption as it stands
            caption = next(t for t in turns if t["from"] == "gpt")
            return [{"from": "human", "value": IMAGE if has_image else ""}, caption]
        return turns
    # paper: the prompts of appendix A.1 place the image, so the record's own tags go
    turns = [{"from": t["from"], "value": _strip_image(t["value"])} for t in record["conversations"]]
    pick = (lambda n: int(rng.integers(n))) if rng is not None else (lambda n: 0)
    if stage == 1:  # feature alignment: an alignment prompt, then the caption
        human = ALIGNMENT_PROMPTS[pick(len(ALIGNMENT_PROMPTS))]
        caption = next(t for t in turns if t["from"] == "gpt")
        return [{"from": "human", "value": human if has_image else _strip_image(human)}, caption]
    out = []
    for turn in turns:  # instruction tuning: every question wrapped; only the first carries the image
        if turn["from"] == "human":
            with_image = has_image and not out
            turn = {"from": "human", "value": wrap_question(turn["value"], pick(len(INSTRUCTION_PROMPTS)), with_image)}
        out.append(turn)
    return out


def _encode_with_images(text, tokenizer):
    """Text with <image> placeholders -> ids; each chunk between placeholders is encoded on its own,
    as LLaVA's tokenizer_image_token does (with a fresh dummy prefix ▁ for each chunk)."""
    ids = []
    for k, chunk in enumerate(text.split(IMAGE)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            ids.extend(tokenizer.encode(chunk))
    return ids


def render(conversation, tokenizer, template="v1"):
    """Turns -> (input_ids, labels); only assistant answers (and their EOS) are learned.

    Values are rendered as given. Each turn is one segment, encoded on its own and given its own
    mask, so labels can never drift from the tokens. The ids still equal LLaVA's encoding of the
    whole prompt: segments meet only after an EOS, where LLaMA's legacy tokenizer (transformers
    4.31, as LLaVA pins it) also starts afresh with a new ▁, or at the space before an answer,
    which SentencePiece never merges across and which our answer's dummy ▁ stands for. A
    conversation ending with a human turn renders the generation prompt, up to and including
    "ASSISTANT:".
    """
    tpl = TEMPLATES[template]
    if not conversation:
        raise ValueError("empty conversation")
    ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]  # BOS once, at the very start
    for k, turn in enumerate(conversation):
        role = "human" if k % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != role or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {k} should be a {role} turn with a string value, got {turn!r:.80}")
        if role == "human":
            layout = tpl["first_user"] if k == 0 else tpl["user"]
            segment = _encode_with_images(layout.format(system=tpl["system"], message=turn["value"]), tokenizer)
        elif IMAGE in turn["value"]:
            raise ValueError(f"turn {k}: an answer cannot hold an {IMAGE} placeholder")
        else:
            segment = tokenizer.encode(tpl["assistant"].format(message=turn["value"]), eos=tpl["eos_after_answer"])
        ids += segment
        labels += segment if role == "gpt" else [IGNORE_INDEX] * len(segment)
    return ids, labels


def expand_images(ids, num_image_tokens, labels=None):
    """One placeholder per image (LLaVA's records) -> one image token per image feature, the ids
    the model reads (model.embed writes the features there). Labels are repeated alike (the
    placeholder's is IGNORE_INDEX). Returns ids, or (ids, labels)."""
    n = [num_image_tokens if i == IMAGE_TOKEN_INDEX else 1 for i in ids]
    out = [i for i, k in zip(ids, n) for _ in range(k)]
    return out if labels is None else (out, [x for x, k in zip(labels, n) for _ in range(k)])


# ----------------------------------------------------------------------------- dataset

def image_files(record):
    """The record's image file names as a list ([] for a text-only record)."""
    image = record.get("image")
    if image is None or image == "":
        return []
    return [image] if isinstance(image, str) else list(image)


def read_records(path):
    """A LLaVA / ChiMed-VL file: a JSON list, or JSONL (one record a line; a bad line becomes None)."""
    text = Path(path).read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    records = []
    for line in text.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                records.append(None)  # excluded later as malformed, with the line's index
    return records


def _schema_problem(record):
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "'conversations' is missing or not a non-empty list"
    for k, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in ("human", "gpt") or not isinstance(t.get("value"), str):
            return f"turn {k} must be {{'from': 'human'|'gpt', 'value': str}}"
    if not any(t["from"] == "gpt" for t in turns):
        return "no 'gpt' turn to learn from"
    image = record.get("image")
    if not (image is None or isinstance(image, str) or
            (isinstance(image, list) and all(isinstance(p, str) and p for p in image))):
        return "'image' must be a file name or a list of file names"
    return None


class ChiMedDataset(torch.utils.data.Dataset):
    """LLaVA-format records -> rendered token ids, labels and one preprocessed (composite) image.

    Records are checked, rendered and measured once here, so exclusions are known before training
    and counted in self.skipped by reason (measured with epoch 0's prompts). Images are read in
    __getitem__; an image that turns out to be unreadable there, or a later epoch's prompt that no
    longer fits max_length, makes __getitem__ return None (with a warning) and `collate` drops it,
    so a bad file cannot stop an epoch. With DataLoader workers that count lives in the worker's
    copy; the trainer sees the drops as each batch's n_dropped.
    """

    def __init__(self, *, data_path, image_root, tokenizer, stage, style="paper", image_size=336,
                 image_fit="pad", max_length=2048, num_image_tokens=576, seed=0, strict=False,
                 min_answer_chars=2, max_image_pixels=MAX_IMAGE_PIXELS):
        # min_answer_chars=2: an answer of 0-1 characters ("", ".", "A") marks a broken record, while
        # short real answers such as "是。" pass; raise it to filter short captions harder.
        if (stage, style) not in STAGE_TEMPLATE or image_fit not in ("pad", "crop"):
            raise ValueError(f"need stage 1|2, style 'paper'|'release', image_fit 'pad'|'crop'; "
                             f"got {stage!r}, {style!r}, {image_fit!r}")
        self.data_path, self.image_root, self.tokenizer = str(data_path), str(image_root), tokenizer
        self.stage, self.style, self.template = stage, style, STAGE_TEMPLATE[(stage, style)]
        self.image_size, self.image_fit, self.seed = image_size, image_fit, seed
        self.max_length, self.num_image_tokens, self.strict = max_length, num_image_tokens, strict
        self.min_answer_chars, self.max_image_pixels = min_answer_chars, max_image_pixels
        self.records = read_records(data_path)
        self.skipped = Counter()
        self.epoch = 0  # exclusions and lengths are measured with epoch 0's prompts
        self.kept, self.lengths = [], []  # record index, expanded length
        for index, record in enumerate(self.records):
            reason, detail, length = self._check(index, record)
            if reason:
                self._exclude(index, record, reason, detail)
            else:
                self.kept.append(index)
                self.lengths.append(length)

    def set_epoch(self, epoch):
        """Draw fresh paper prompts: over several epochs each sample meets several of them, so the
        model cannot tie an answer to one prompt's wording. (The paper trains one epoch.)"""
        self.epoch = epoch

    def _render(self, index):
        """Record i as the model reads it: ids and labels with each image expanded to its features.
        The paper prompt for record i is seeded by (seed, epoch, i): the same whatever the order or worker."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        turns = build_conversation(self.records[index], self.stage, self.style, rng)
        ids, labels = render(turns, self.tokenizer, self.template)
        return expand_images(ids, self.num_image_tokens, labels)

    def _cut(self, ids, labels):
        """How many ids to keep so that the sequence fits max_length, never cutting into an image
        and keeping something to learn; None if that is impossible."""
        cut = min(len(ids), self.max_length)
        if IMAGE_TOKEN_INDEX in ids[cut:] or all(x == IGNORE_INDEX for x in labels[:cut]):
            return None
        return cut

    def _check(self, index, record):
        """(reason, detail, expanded length once truncated): reason is None for a sample to keep."""
        problem = _schema_problem(record)
        if problem:
            return "malformed", problem, 0
        files = image_files(record)
        if len(files) > MAX_IMAGES:
            return "too_many_images", f"{len(files)} images (at most {MAX_IMAGES})", 0
        missing = [f for f in files if not os.path.isfile(os.path.join(self.image_root, f))]
        if missing:
            return "missing_image", f"{os.path.join(self.image_root, missing[0])} does not exist", 0
        short = [t["value"] for t in record["conversations"]
                 if t["from"] == "gpt" and len(t["value"].strip()) < self.min_answer_chars]
        if short:
            return "too_short", f"answer {short[0]!r} is under {self.min_answer_chars} characters", 0
        try:
            ids, labels = self._render(index)
        except ValueError as e:
            return "malformed", str(e), 0
        cut = self._cut(ids, labels)
        if cut is None:
            return "too_long", (f"{len(ids)} tokens with image features; "
                                f"no learned token fits in max_length={self.max_length}"), 0
        return None, "", cut

    def _exclude(self, index, record, reason, detail):
        name = record.get("id", "?") if isinstance(record, dict) else "?"
        if self.strict:
            raise ValueError(f"{self.data_path}: sample {index} (id {name!r}) excluded: {reason}: {detail}")
        self.skipped[reason] += 1

    def report(self):
        skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"{self.data_path}: kept {len(self.kept)} of {len(self.records)} records "
                f"(stage {self.stage}, {self.style} style, template {self.template}); skipped: {skipped}")

    def __len__(self):
        return len(self.kept)

    def __getitem__(self, k):
        index = self.kept[k]
        record = self.records[index]
        ids, labels = self._render(index)
        cut = self._cut(ids, labels)  # another epoch's prompt may be longer than epoch 0's
        if cut is None:
            self.skipped["too_long"] += 1
            warnings.warn(f"skipping sample {index} (id {record.get('id')!r}) this epoch: its prompt leaves "
                          f"no answer token within max_length={self.max_length}")
            return None
        ids, labels = ids[:cut], labels[:cut]
        files = image_files(record)
        try:
            paths = [os.path.join(self.image_root, f) for f in files]
            pixels = [image_input(paths, self.image_size, self.image_fit, self.max_image_pixels)] if files else []
        except ImageError as e:
            self.skipped["unreadable_image"] += 1
            warnings.warn(f"skipping sample {index} (id {record.get('id')!r}): {e}")
            return None
        return dict(input_ids=torch.tensor(ids, dtype=torch.long),  # (T,)
                    labels=torch.tensor(labels, dtype=torch.long),  # (T,)
                    pixel_values=torch.stack(pixels) if pixels else
                    torch.zeros(0, 3, self.image_size, self.image_size),  # (n_img, 3, S, S), n_img 0 or 1
                    id=record.get("id", index))


def collate(batch, pad_id, image_size):
    """Samples -> a right-padded batch; None samples (see ChiMedDataset) are dropped and counted.

    Everything the model would otherwise have to look up on the device is computed here, on the
    CPU, so that the training step never waits for the GPU:
      image_positions (N * P,): flat indices into the B*T positions where image features go;
      loss_positions (M,): flat indices of the positions whose next token is learned.
    A batch without any image carries one zero image that the model encodes and splices nowhere,
    and a batch whose every sample was dropped one padding row with nothing to learn: every rank
    then runs the same modules in every micro-step, which ZeRO-3's collectives need.
    """
    samples = [s for s in batch if s is not None]
    rows = samples or [dict(input_ids=torch.tensor([pad_id]), labels=torch.tensor([IGNORE_INDEX]))]
    T = max(len(s["input_ids"]) for s in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(rows):
        input_ids[b, :len(s["input_ids"])], labels[b, :len(s["labels"])] = s["input_ids"], s["labels"]
    learned_next = torch.zeros_like(labels, dtype=torch.bool)
    learned_next[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    pixels = [s["pixel_values"] for s in samples if len(s["pixel_values"])]
    return dict(input_ids=input_ids, labels=labels,  # (B, T) each
                pixel_values=torch.cat(pixels) if pixels else torch.zeros(1, 3, image_size, image_size),
                image_positions=(input_ids.flatten() == IMAGE_TOKEN_INDEX).nonzero().squeeze(1),
                loss_positions=learned_next.flatten().nonzero().squeeze(1),
                lengths=[len(s["input_ids"]) for s in samples],  # tokens the LLM really reads, per sample
                ids=[s["id"] for s in samples], n_dropped=len(batch) - len(samples))


# ----------------------------------------------------------------------------- batching

class LengthGroupedSampler(torch.utils.data.Sampler):
    """Batches of similar length, so little compute goes to padding; a pure function of the epoch.

    Each epoch: shuffle (seeded by seed and epoch), cut into mega-batches of K global batches,
    sort each by length, split into global batches of batch_size * num_replicas (one batch per
    rank), shuffle the order of the global batches. This rank's indices come batch by batch, so
    consecutive runs of batch_size indices are one batch, and a resumed trainer may skip batches.
    When the data does not divide into global batches, the first indices of the shuffled order are
    repeated to fill the last one (drop_last=True drops the remainder instead).
    """

    def __init__(self, lengths, batch_size, num_replicas=1, rank=0, seed=0, drop_last=False, mega_batch_mult=50):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.mega_batch_mult, self.epoch = seed, mega_batch_mult, 0
        self.global_batch = batch_size * num_replicas
        n_batches = len(self.lengths) // self.global_batch if drop_last else math.ceil(len(self.lengths) / self.global_batch)
        self.total = n_batches * self.global_batch  # indices per epoch over all ranks

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.total // self.num_replicas

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = np.resize(rng.permutation(len(self.lengths)), self.total)  # resize repeats from the start
        mega = self.global_batch * self.mega_batch_mult
        batches = []
        for start in range(0, self.total, mega):
            chunk = order[start:start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]  # longest first
            batches += [chunk[b:b + self.global_batch] for b in range(0, len(chunk), self.global_batch)]
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for b in rng.permutation(len(batches)):
            yield from batches[b][mine].tolist()


# ----------------------------------------------------------------------------- demo

SAMPLES = Path(__file__).resolve().parent / "samples"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Show how a demo sample is rendered.")
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2))
    parser.add_argument("--style", default="paper", choices=("paper", "release"))
    args = parser.parse_args()
    tok = Tokenizer(SAMPLES / "tokenizer.model")
    ds = ChiMedDataset(data_path=SAMPLES / f"stage{args.stage}.json", image_root=SAMPLES / "images",
                       tokenizer=tok, stage=args.stage, style=args.style)
    print(ds.report())
    sample = ds[0]
    print(f"id {sample['id']}: pixel_values {tuple(sample['pixel_values'].shape)}, "
          f"{len(sample['input_ids'])} ids, image features included")
    ids = sample["input_ids"].tolist()
    for k, (i, label) in enumerate(zip(ids, sample["labels"].tolist())):
        if i == IMAGE_TOKEN_INDEX and k and ids[k - 1] == IMAGE_TOKEN_INDEX:
            continue  # one line for the image's run of feature positions
        piece = f"<image> x{ids.count(IMAGE_TOKEN_INDEX)}" if i == IMAGE_TOKEN_INDEX else tok.sp.id_to_piece(i)
        print(f"{i:6d} {piece!r:14} {'learned' if label != IGNORE_INDEX else ''}")
