"""What the model sees: a record becomes token ids, labels and one image; samples become batches.

Qilin-Med-VL (Liu et al., 2023), section 3.3 "Data processing": one text's images are concatenated into one
composite; samples with more than 4 images or too short text are excluded. Section 4.2 "Training": stage 1
captions an image after one of 22 alignment prompts, stage 2 answers a question wrapped in one of 7 instruction
prompts (appendix A.1, in prompts/); style="release" renders as the released weights were trained instead.

The main idea first: record -> build_conversation -> render (ids and labels, one IMAGE_TOKEN_INDEX per image) ->
expand_images (one per image feature, where model.py writes them) -> ChiMedDataset -> collate, batches of similar
lengths. Then images, long only because medical files are 16-bit, rotated, transparent or huge.
"""

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

from dicom import is_dicom, read_dicom

IMAGE = "<image>"  # the placeholder in text
IMAGE_TOKEN_INDEX = -200  # LLaVA's id for it in input_ids (no vocabulary row): one per image, then one per feature
IGNORE_INDEX = -100  # the label of a position that is not learned (cross_entropy's default ignore_index)
MAX_IMAGES = 4  # paper 3.3: samples with more images are excluded
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104), as LLaVA's expand2square
# The largest image load_image reads, judged by its header: pathology tiles and large scans run to 10,000-30,000
# pixels a side; more is likely a decompression bomb. Formats other than JPEG decode whole: 4 GiB at this limit.
MAX_IMAGE_PIXELS = 2**30  # 32768 x 32768
Image.MAX_IMAGE_PIXELS = None  # Pillow's own limit (179 megapixels) would refuse real scans before ours

SAMPLES = Path(__file__).resolve().parent / "samples"  # the demo data (train.py --demo, chat.py --demo)
PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
ALIGNMENT_PROMPTS = json.loads((PROMPT_DIR / "alignment.json").read_text(encoding="utf-8"))  # 22
INSTRUCTION_PROMPTS = json.loads((PROMPT_DIR / "instruction.json").read_text(encoding="utf-8"))  # 7
TEMPLATES = json.loads((PROMPT_DIR / "templates.json").read_text(encoding="utf-8"))
# which dialog template each stage renders into, per style (paper section 4.2, or as released)
STAGE_TEMPLATE = {(1, "paper"): "v1", (2, "paper"): "v1", (1, "release"): "plain", (2, "release"): "v1"}


# ----------------------------------------------------------------------------- text

class Tokenizer:
    """A SentencePiece model with LLaMA's special ids (unk 0, bos 1, eos 2)."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no SentencePiece tokenizer.model here")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id, self.vocab_size = self.sp.bos_id(), self.sp.eos_id(), self.sp.get_piece_size()
        # LLaMA-2 has no pad piece: like LLaVA, pad with unk (pads follow every real token and are never learned)
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else max(self.sp.unk_id(), 0)

    def encode(self, text, bos=False, eos=False):  # with SentencePiece's "dummy prefix" ▁, as LLaMA's tokenizer
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids):
        return self.sp.decode([i for i in ids if i >= 0])  # image placeholders and ignore labels are not text


def _strip_image(text):
    """Remove every <image> placeholder together with the newline that joins it to the text."""
    return text.replace(IMAGE + "\n", "").replace("\n" + IMAGE, "").replace(IMAGE, "").strip()


def wrap_question(question, prompt_index=0, with_image=True):
    """Paper stage 2: put a question into instruction prompt `prompt_index`, which places <image>."""
    prompt = INSTRUCTION_PROMPTS[prompt_index] if with_image else _strip_image(INSTRUCTION_PROMPTS[prompt_index])
    return prompt.replace("<question>", _strip_image(question)).strip()  # strip: for an empty question


def _release_turns(turns, has_image):
    """The turns as LLaVA's preprocess_multimodal left them for the released model: a tagged turn loses its tags and
    the whitespace around the rest, then gets one tag in front ("Is <image> ok?" -> "<image>\nIs  ok?"); others stay
    verbatim. All images become one composite (paper 3.3), so one tag is kept: in the first human turn that has one
    (LLaVA keeps a tag per image) or, if none has, at the start of the first question (where LLaVA would have trained
    without the image). A text-only record loses any stray tag (LLaVA would read it as text)."""
    out = [{"from": t["from"], "value": t["value"].replace(IMAGE, "").strip() if IMAGE in t["value"] else t["value"]}
           for t in turns]
    if has_image and out:  # .strip() again: a turn that was the tag alone becomes "<image>", not "<image>\n"
        keep = next((k for k, t in enumerate(turns) if t["from"] == "human" and IMAGE in t["value"]), 0)
        out[keep]["value"] = (IMAGE + "\n" + out[keep]["value"].strip()).strip()
    return out


def build_conversation(record, stage, style="paper", rng=None):
    """A record's turns as the given stage and style present them (rng picks paper prompts)."""
    has_image = bool(image_files(record))
    if style == "release":  # the text LLaVA's code trained the released weights on
        turns = _release_turns(record["conversations"], has_image)
    else:  # paper: the prompts of appendix A.1 place the image, so the record's own tags go
        turns = [{"from": t["from"], "value": _strip_image(t["value"])} for t in record["conversations"]]
    pick = (lambda n: int(rng.integers(n))) if rng is not None else (lambda n: 0)
    if stage == 1:  # feature alignment: an alignment prompt (release: the image alone, LLaVA's preprocess_plain)
        human = IMAGE if style == "release" else ALIGNMENT_PROMPTS[pick(len(ALIGNMENT_PROMPTS))]
        caption = next(t for t in turns if t["from"] == "gpt")  # then the caption
        return [{"from": "human", "value": human if has_image else _strip_image(human)}, caption]
    if style == "release":
        return turns
    # instruction tuning: every question wrapped; only the first carries the image
    return [{"from": "human", "value": wrap_question(t["value"], pick(len(INSTRUCTION_PROMPTS)), has_image and k == 0)}
            if t["from"] == "human" else t for k, t in enumerate(turns)]


def render(conversation, tokenizer, template="v1"):
    """Turns -> (input_ids, labels); only assistant answers (and their EOS) are learned. A conversation ending with a
    human turn renders the generation prompt, up to and including "ASSISTANT:". Each turn is encoded and masked on
    its own, so labels cannot drift from the tokens, and the ids still equal LLaVA's encoding of the whole prompt:
    turns meet only after an EOS, where LLaMA's legacy tokenizer (transformers 4.31, as LLaVA pins it) also starts
    afresh with a ▁, or at the space before an answer, which SentencePiece never merges across (the answer's ▁)."""
    tpl = TEMPLATES[template]
    if not conversation:
        raise ValueError("empty conversation")
    ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]  # BOS once, at the very start
    for k, turn in enumerate(conversation):
        role = "human" if k % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != role or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {k} should be a {role} turn with a string value, got {turn!r:.80}")
        if role == "human":
            text = (tpl["first_user"] if k == 0 else tpl["user"]).format(system=tpl["system"], message=turn["value"])
            # as LLaVA's tokenizer_image_token: each chunk between placeholders encoded on its own (its own ▁)
            segment = [i for chunk in text.split(IMAGE) for i in [IMAGE_TOKEN_INDEX] + tokenizer.encode(chunk)][1:]
        elif IMAGE in turn["value"]:
            raise ValueError(f"turn {k}: an answer cannot hold an {IMAGE} placeholder")
        else:
            segment = tokenizer.encode(tpl["assistant"].format(message=turn["value"]), eos=tpl["eos_after_answer"])
        ids += segment
        labels += segment if role == "gpt" else [IGNORE_INDEX] * len(segment)
    return ids, labels


def expand_images(ids, num_image_tokens, labels=None):
    """One placeholder per image -> one image token per image feature: the ids the model reads, so the one
    place a sample's length is counted. Labels are repeated alike. Returns ids, or (ids, labels)."""
    n = [num_image_tokens if i == IMAGE_TOKEN_INDEX else 1 for i in ids]
    out = [i for i, k in zip(ids, n) for _ in range(k)]
    return out if labels is None else (out, [x for x, k in zip(labels, n) for _ in range(k)])


# ----------------------------------------------------------------------------- dataset and batch

def image_files(record):
    """The record's image file names as a list ([] for a text-only record)."""
    image = record.get("image")
    return [] if image is None or image == "" else [image] if isinstance(image, str) else list(image)


def read_records(path):
    """A LLaVA / ChiMed-VL file: a JSON list, or JSONL (one record a line; a bad line becomes None)."""
    text = Path(path).read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    records = []
    for line in filter(str.strip, text.splitlines()):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append(None)  # excluded later as malformed, with the line's index
    return records


class ChiMedDataset(torch.utils.data.Dataset):
    """LLaVA-format records -> samples: ids and labels cut to max_length, and one composite image. Records are
    checked, rendered and measured once, here, so exclusions are known before training (self.skipped, by reason).
    So that one file cannot stop an epoch, an unreadable image or a later epoch's prompt that no longer fits makes
    __getitem__ warn and return None, for collate to drop and count as n_dropped (a worker's self.skipped is a copy)."""

    def __init__(self, *, data_path, image_root, tokenizer, stage, style="paper", image_size=336,
                 image_fit="pad", max_length=2048, num_image_tokens=576, seed=0, strict=False,
                 min_answer_chars=2, max_image_pixels=MAX_IMAGE_PIXELS):
        # min_answer_chars=2: an answer of 0-1 characters ("", ".", "A") marks a broken record; "是。" passes
        if (stage, style) not in STAGE_TEMPLATE or image_fit not in ("pad", "crop"):
            raise ValueError(f"want stage 1|2, style paper|release, fit pad|crop; got {stage}, {style}, {image_fit}")
        self.data_path, self.image_root, self.tokenizer = str(data_path), str(image_root), tokenizer
        self.stage, self.style, self.template, self.seed = stage, style, STAGE_TEMPLATE[(stage, style)], seed
        self.image_size, self.image_fit, self.max_image_pixels = image_size, image_fit, max_image_pixels
        self.max_length, self.num_image_tokens, self.min_answer_chars = max_length, num_image_tokens, min_answer_chars
        self.records, self.skipped, self.epoch = read_records(data_path), Counter(), 0
        self.kept, self.lengths = [], []  # record index; its tokens once cut, image features included
        for index, record in enumerate(self.records):
            reason, detail, length = self._check(index, record)
            if reason is None:
                self.kept.append(index)
                self.lengths.append(length)
            elif strict:
                name = record.get("id", "?") if isinstance(record, dict) else "?"
                raise ValueError(f"{self.data_path}: sample {index} (id {name!r}) excluded: {reason}: {detail}")
            else:
                self.skipped[reason] += 1

    def set_epoch(self, epoch):  # fresh paper prompts, so that over epochs an answer is not tied to one wording
        self.epoch = epoch

    def _render(self, index):
        """Record `index` as the model reads it: (ids, labels, cut), images expanded to their features; cut is None if
        cutting at max_length splits an image or leaves nothing to learn. Prompts do not depend on order or worker."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        turns = build_conversation(self.records[index], self.stage, self.style, rng)
        ids, labels = render(turns, self.tokenizer, self.template)
        ids, labels = expand_images(ids, self.num_image_tokens, labels)
        cut = min(len(ids), self.max_length)
        fits = IMAGE_TOKEN_INDEX not in ids[cut:] and any(x != IGNORE_INDEX for x in labels[:cut])
        return ids, labels, cut if fits else None

    def _check(self, index, record):
        """Why a record is excluded, (reason, detail, 0), or (None, "", its length once cut) to keep it."""
        if not isinstance(record, dict):
            return "malformed", f"a record must be a JSON object, got {type(record).__name__}", 0
        turns, image = record.get("conversations"), record.get("image")
        if not isinstance(turns, list) or not turns:
            return "malformed", "'conversations' is missing or not a non-empty list", 0
        for k, t in enumerate(turns):
            if not isinstance(t, dict) or t.get("from") not in ("human", "gpt") or not isinstance(t.get("value"), str):
                return "malformed", f"turn {k} must be {{'from': 'human'|'gpt', 'value': str}}", 0
        if not any(t["from"] == "gpt" for t in turns):
            return "malformed", "no 'gpt' turn to learn from", 0
        if not (image is None or isinstance(image, str) or
                isinstance(image, list) and all(isinstance(p, str) and p for p in image)):
            return "malformed", "'image' must be a file name or a list of file names", 0
        paths = [os.path.join(self.image_root, f) for f in image_files(record)]
        if len(paths) > MAX_IMAGES:
            return "too_many_images", f"{len(paths)} images (at most {MAX_IMAGES})", 0
        if missing := [p for p in paths if not os.path.isfile(p)]:
            return "missing_image", f"{missing[0]} does not exist", 0
        short = [t["value"] for t in turns if t["from"] == "gpt" and len(t["value"].strip()) < self.min_answer_chars]
        if short:
            return "too_short", f"answer {short[0]!r} is under {self.min_answer_chars} characters", 0
        try:
            ids, _, cut = self._render(index)
        except ValueError as e:  # render's word on the order of the turns
            return "malformed", str(e), 0
        if cut is None:
            return "too_long", f"{len(ids)} tokens with image features, none to learn within {self.max_length}", 0
        return None, "", cut

    def report(self):
        skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"{self.data_path}: kept {len(self.kept)} of {len(self.records)} records "
                f"(stage {self.stage}, {self.style} style, template {self.template}); skipped: {skipped}")

    def __len__(self):
        return len(self.kept)

    def __getitem__(self, k):
        index = self.kept[k]
        record = self.records[index]
        ids, labels, cut = self._render(index)
        if cut is None:  # another epoch's prompt may be longer than epoch 0's
            self.skipped["too_long"] += 1
            warnings.warn(f"skipping sample {index} (id {record.get('id')!r}) this epoch: no answer in max_length")
            return None
        paths, S = [os.path.join(self.image_root, f) for f in image_files(record)], self.image_size
        try:  # (1, 3, S, S): the one composite; (0, 3, S, S) for a text-only record
            pixels = (image_input(paths, S, self.image_fit, self.max_image_pixels)[None] if paths
                      else torch.zeros(0, 3, S, S))
        except ImageError as e:
            self.skipped["unreadable_image"] += 1
            warnings.warn(f"skipping sample {index} (id {record.get('id')!r}): {e}")
            return None
        return dict(input_ids=torch.tensor(ids[:cut]), labels=torch.tensor(labels[:cut]),  # (T,) each
                    pixel_values=pixels, id=record.get("id", index))


def collate(batch, pad_id, image_size):
    """Samples -> a right-padded batch; None samples (see ChiMedDataset) are dropped and counted. The positions
    the model would otherwise look up on the device come from here, so a step never waits for the GPU:
    image_positions (N * P,), flat indices into B*T where image features go; loss_positions (M,), those whose
    next token is learned. A batch without images carries one zero image, spliced nowhere, and a batch of dropped
    samples one row with nothing to learn: each rank runs every module each step, as ZeRO-3 needs."""
    samples = [s for s in batch if s is not None]
    rows = samples or [dict(input_ids=torch.tensor([pad_id]), labels=torch.tensor([IGNORE_INDEX]))]
    pad = lambda key, value: torch.nn.utils.rnn.pad_sequence([s[key] for s in rows], True, value)  # noqa: E731
    input_ids, labels = pad("input_ids", pad_id), pad("labels", IGNORE_INDEX)  # (B, T) each, padded on the right
    learned_next = torch.nn.functional.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1))  # (B, T): is the next token learned
    pixels = [s["pixel_values"] for s in samples if len(s["pixel_values"])]
    return dict(input_ids=input_ids, labels=labels,
                pixel_values=torch.cat(pixels) if pixels else torch.zeros(1, 3, image_size, image_size),
                image_positions=(input_ids.flatten() == IMAGE_TOKEN_INDEX).nonzero().squeeze(1),
                loss_positions=learned_next.flatten().nonzero().squeeze(1),
                lengths=[len(s["input_ids"]) for s in samples],  # tokens the LLM really reads, per sample
                ids=[s["id"] for s in samples], n_dropped=len(batch) - len(samples))


def length_grouped_batches(lengths, batch_size, num_replicas, rank, seed, epoch):
    """This rank's batches (lists of dataset indices) of one epoch, of similar lengths so little compute goes to
    padding, and the same for a resumed run. Shuffle, cut into mega-batches of 50 global batches (batch_size *
    num_replicas), sort each by length, split into global batches, shuffle those; repeat a few to fill the last."""
    lengths, global_batch = np.asarray(lengths), batch_size * num_replicas
    total = math.ceil(len(lengths) / global_batch) * global_batch  # indices per epoch over all ranks
    rng = np.random.default_rng([seed, epoch])
    order = np.resize(rng.permutation(len(lengths)), total)  # resize repeats from the start
    batches = []
    for start in range(0, total, 50 * global_batch):
        chunk = order[start:start + 50 * global_batch]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]  # longest first
        batches += [chunk[b:b + global_batch] for b in range(0, len(chunk), global_batch)]
    return [batches[b][rank * batch_size:(rank + 1) * batch_size].tolist() for b in rng.permutation(len(batches))]


# ----------------------------------------------------------------------------- images

class ImageError(ValueError):
    """An image file that cannot be used: missing, corrupt, not an image, or too large."""


class TooManyImages(ValueError):
    """More images for one text than the composite takes (paper 3.3: the sample is excluded)."""


def image_input(paths, size=336, mode="pad", max_pixels=MAX_IMAGE_PIXELS, frame=None):
    """1..4 image files of one sample -> one composite, fitted: (3, size, size). A large image is read with its
    shorter side at 4 x size or a little more: enough for each output pixel, and all after decoding stays small.
    frame: which frame of a multi-frame DICOM file (default its middle one)."""
    if len(paths) > MAX_IMAGES:  # before reading any of them
        raise TooManyImages(f"{len(paths)} images for one sample; at most {MAX_IMAGES} are concatenated")
    return preprocess_image(concat_images([load_image(p, max_pixels, 4 * size, frame) for p in paths]), size, mode)


def load_image(path, max_pixels=MAX_IMAGE_PIXELS, min_side=None, frame=None):
    """Any image file Pillow knows, or a DICOM file (dicom.py) -> an upright 8-bit RGB image, or ImageError naming the
    file. min_side: read a large image smaller, by the largest whole factor leaving its shorter side at least
    min_side; None keeps all."""
    if not os.path.isfile(path):  # Pillow would call both corrupt
        raise ImageError(f"{path}: {'is a directory, not an' if os.path.isdir(path) else 'no such'} image file")
    if str(path).lower().endswith(".dcm") or is_dicom(path):  # by name or by its DICM magic; pydicom only now
        try:
            return _to_rgb(read_dicom(path, max_pixels, frame))
        except ValueError as e:
            raise ImageError(f"{path}: {e}") from e
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
            # Image.reduce averages factor x factor blocks. It has no 16-bit mode (widen to 32-bit), and averaging
            # palette indices or 1-bit values, or dropping transparency, would be wrong (RGB first).
            if factor >= 2:
                if image.mode.startswith("I;16"):
                    image = image.convert("I")
                elif image.mode not in ("L", "RGB", "I", "F") or "transparency" in image.info:
                    image = _to_rgb(image)
                image = image.reduce(factor)
            return _to_rgb(image)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image file (Pillow cannot identify it)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what Pillow's decoders raise on broken data
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from e


def _to_rgb(image):
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float images (CT, MRI) are stretched from their own min..max to 0..255: exporters often
        # fill only 12 of 16 bits, so dividing by 65535 would leave them nearly black
        a = np.asarray(image, dtype=np.float64)
        lo, hi = a.min(), a.max()
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")  # transparent pixels become white, as on a page, never a hidden colour
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB


def concat_images(images):
    """Paper 3.3: 1..4 RGB images -> one composite, side by side or stacked, the less elongated one."""
    if not images:
        raise ValueError("concat_images needs at least one image")
    if len(images) > MAX_IMAGES:
        raise TooManyImages(f"{len(images)} images for one sample; at most {MAX_IMAGES} are concatenated")
    if len(images) == 1:
        return images[0]
    # the composite's aspect ratio (w/h), whatever the common side: sum(w_i/h_i) side by side, 1/sum(h_i/w_i) stacked
    wide = sum(im.width / im.height for im in images)
    tall = 1.0 / sum(im.height / im.width for im in images)
    horizontal = max(wide, 1 / wide) <= max(tall, 1 / tall)
    if horizontal:  # equalise heights to the tallest image
        h = max(im.height for im in images)
        parts = [im.resize((max(1, round(im.width * h / im.height)), h), Image.BICUBIC) for im in images]
    else:  # equalise widths to the widest image
        w = max(im.width for im in images)
        parts = [im.resize((w, max(1, round(im.height * w / im.width))), Image.BICUBIC) for im in images]
    return Image.fromarray(np.concatenate([np.asarray(p.convert("RGB")) for p in parts], axis=1 if horizontal else 0))


def preprocess_image(image, size=336, mode="pad"):
    """RGB PIL image -> CLIP input (3, size, size): bicubic resampling, CLIP's mean and std."""
    w, h = image.size
    if mode == "pad":  # LLaVA's expand2square: centre on a mean-coloured square, then resize
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), PAD_COLOR)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas.resize((size, size), Image.BICUBIC)
    elif mode == "crop":  # CLIP's recipe: shortest side to `size` (the other truncated, as CLIP's), centre square
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.resize((new_w, new_h), Image.BICUBIC).crop((left, top, left + size, top + size))
    else:
        raise ValueError(f"image fit mode must be 'pad' or 'crop', got {mode!r}")
    x = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).astype(np.float32)) / 255  # (3, S, S) in 0..1
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


if __name__ == "__main__":
    # How a demo sample is rendered: `python data.py [stage] [paper|release]`
    import sys

    stage, style = int(sys.argv[1]) if len(sys.argv) > 1 else 2, sys.argv[2] if len(sys.argv) > 2 else "paper"
    tok = Tokenizer(SAMPLES / "tokenizer.model")
    ds = ChiMedDataset(data_path=SAMPLES / f"stage{stage}.json", image_root=SAMPLES / "images", tokenizer=tok,
                       stage=stage, style=style)
    sample, shown = ds[0], None
    print(f"{ds.report()}\nid {sample['id']}: pixel_values {tuple(sample['pixel_values'].shape)}, "
          f"{len(sample['input_ids'])} positions, image features included")
    for i, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist()):
        if i == IMAGE_TOKEN_INDEX and shown == i:
            continue  # one line for the image's run of feature positions
        piece, shown = ("<image> features" if i == IMAGE_TOKEN_INDEX else tok.sp.id_to_piece(i)), i
        print(f"{i:6d} {piece!r:18} {'learned' if label != IGNORE_INDEX else ''}")
