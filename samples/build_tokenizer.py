"""Rebuild samples/tokenizer.model, the demo's SentencePiece tokenizer: `python samples/build_tokenizer.py`.

A BPE model laid out like LLaMA-2's (unk/bos/eos = 0/1/2, no pad piece, byte fallback), trained on
every text the demo shows the model: the dialog template, the paper's prompts, the demo captions,
questions and answers, and some English (samples/extra_text.txt) so that English chat tokenizes.
"""

import sys
from pathlib import Path

import sentencepiece as spm

SAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(SAMPLES.parent))

from data import ALIGNMENT_PROMPTS, IMAGE, INSTRUCTION_PROMPTS, TEMPLATES, read_records  # noqa: E402


def train_tokenizer(texts, model_prefix, vocab_size):
    """Train a small BPE SentencePiece model laid out like LLaMA-2's; writes {model_prefix}.model/.vocab."""
    lines = [line for text in texts for line in text.split("\n") if line.strip()]  # "\n" is a byte piece
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(model_prefix), vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, byte_fallback=True,
        normalization_rule_name="identity",  # exact round trips, full-width punctuation kept
        split_digits=True, remove_extra_whitespaces=False, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # as LLaMA-2: no pad piece, Tokenizer pads with unk
        num_threads=1, minloglevel=2)
    return f"{model_prefix}.model"



def demo_texts():
    texts = [TEMPLATES["v1"]["system"], "USER: ASSISTANT:"]
    texts += [p.replace(IMAGE, "").replace("<question>", "").strip() for p in ALIGNMENT_PROMPTS + INSTRUCTION_PROMPTS]
    for name in ("stage1.json", "stage2.json"):
        texts += [t["value"].replace(IMAGE, "").strip() for r in read_records(SAMPLES / name) for t in r["conversations"]]
    return texts + (SAMPLES / "extra_text.txt").read_text(encoding="utf-8").splitlines()


if __name__ == "__main__":
    print("wrote", train_tokenizer(demo_texts(), SAMPLES / "tokenizer", vocab_size=1500))
