"""Score Qilin-Med-VL as medical vision-language papers do: VQA-RAD, SLAKE (English and Chinese), PathVQA and PMC-VQA
(where paper section 3 draws ChiMed-VL's images from), each read from the files its authors publish, answered in
batches by chat.py's decoding, and scored by LLaVA-Med's published rule with our stricter one beside it.

    python evaluate.py --model runs/stage2 --benchmark slake --data Slake1.0 --split test --lang zh
    python evaluate.py --model runs/stage2 --benchmark vqa-rad --data VQA_RAD
    python evaluate.py --model runs/stage2 --benchmark pathvqa --data pvqa --split test
    python evaluate.py --model runs/stage2 --benchmark pmc-vqa --data PMC-VQA/test_clean.csv
    python evaluate.py --model runs/stage2 --data test.jsonl --image-root images     our JSON/JSONL records
    python evaluate.py --score answers.jsonl           score any answers file, ours or another system's

Each reader turns its benchmark into one shape of question: id (unique in the run, for --resume), image (file names),
turns (the dialog up to the question), question, reference, answer_type (open, closed or choice: the file's own label)
and the fields the table is broken down by (lang, modality, content_type). The answers file holds one JSON line per
answer; the table and STEM.metrics.json are computed from that file alone, so that --score, a resumed run and an
uninterrupted one give the same table by construction.
"""

import argparse
import csv
import itertools
import json
import os
import pickle
import re
import sys
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from chat import (add_model_flags, add_sampling_flags, check_args, generate_batch, load_from_args, load_pixels, one_line,
                  prompt_ids, room)
from checkpoint import CheckpointError
from data import IMAGE, MAX_IMAGES, ImageError, TooManyImages, image_files, read_records
from vqa_metrics import GROUPS, metrics, yes_no

BENCHMARKS = ("vqa-rad", "slake", "pathvqa", "pmc-vqa", "records")
SPLITS = {"vqa-rad": ("train", "test"), "slake": ("train", "validate", "test"), "pathvqa": ("train", "val", "test")}
VQA_RAD_JSON, VQA_RAD_IMAGES = "VQA_RAD Dataset Public.json", "VQA_RAD Image Folder"

# ----------------------------------------------------------------------------- the benchmarks' files


def question(qid, image, text, reference, answer_type, **fields):
    """One question in the shape every reader returns (a single image, asked as the first turn)."""
    return dict(id=str(qid), image=[image], turns=[{"from": "human", "value": f"{IMAGE}\n{text}"}], question=text,
                reference=str(reference).strip(), answer_type=answer_type, **fields)


def require(record, fields, where):
    """The benchmark's own fields, or one line naming the first one the record lacks (not this benchmark's file)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a {type(record).__name__}, not a record")
    if missing := [f for f in fields if f not in record]:
        raise ValueError(f"{where}: no {missing[0]!r} field (is this the benchmark's file?)")


def open_closed(record, where):
    """The file's own label: answer_type OPEN or CLOSED (any case, stray spaces)."""
    label = str(record["answer_type"]).strip().lower()
    if label not in ("open", "closed"):
        raise ValueError(f"{where}: answer_type {record['answer_type']!r} is neither OPEN nor CLOSED")
    return label


def load_json_list(path):
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: a JSON {type(records).__name__}, not a list of records")
    return records


def read_vqa_rad(data, split):
    """VQA-RAD (Lau et al., 2018, osf.io/89kps): `VQA_RAD Dataset Public.json`, a list of {qid, image_name, question,
    answer, answer_type OPEN|CLOSED, phrase_type, ...}. The test split is the phrase types test_freeform and test_para
    (451 questions, as LLaVA-Med tests on), train the rest (freeform, para); images in `VQA_RAD Image Folder/`."""
    path = Path(data) / VQA_RAD_JSON if Path(data).is_dir() else Path(data)
    questions = []
    for k, r in enumerate(load_json_list(path)):
        where = f"{path}: record {k}"
        require(r, ("qid", "image_name", "question", "answer", "answer_type", "phrase_type"), where)
        if str(r["phrase_type"]).startswith("test") == (split == "test"):
            questions.append(question(r["qid"], r["image_name"], r["question"], r["answer"], open_closed(r, where),
                                      organ=r.get("image_organ"), question_type=r.get("question_type")))
    return questions, path.parent / VQA_RAD_IMAGES


def read_slake(data, split, lang):
    """SLAKE (Liu et al., 2021, www.med-vqa.com/slake): train.json, validate.json, test.json, lists of {qid, img_name
    ("xmlab102/source.jpg", under imgs/), question, answer, q_lang en|zh, answer_type OPEN|CLOSED, modality,
    content_type, location, ...}: the test split has 1,061 English and 1,033 Chinese questions; `lang` keeps one."""
    path = Path(data) / f"{split}.json"
    questions = []
    for k, r in enumerate(load_json_list(path)):
        where = f"{path}: record {k}"
        require(r, ("qid", "img_name", "question", "answer", "q_lang", "answer_type", "modality", "content_type"),
                where)
        if lang in ("all", r["q_lang"]):
            questions.append(question(r["qid"], r["img_name"], r["question"], r["answer"], open_closed(r, where),
                                      lang=r["q_lang"], modality=r["modality"], content_type=r["content_type"]))
    return questions, Path(data) / "imgs"


class PlainData(pickle.Unpickler):
    """Unpickles lists, dicts, strings and numbers, nothing else. A pickle names the classes and functions to call
    while it loads, so a downloaded one can run any code; every such name goes through find_class, which we refuse."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it asks for {module}.{name}; only lists, dicts, strings and numbers are read")


def read_pathvqa(data, split):
    """PathVQA (He et al., 2020, github.com/UCSD-AI4H/PathVQA): qas/{split}/{split}_qa.pkl, a pickled list of {image
    ("test_0001"), question, answer}; images at images/{split}/{image}.jpg. Closed are the yes/no questions, as its
    paper defines them. Its Hugging Face parquet copy embeds the images and needs pyarrow: it is not read here."""
    path = Path(data) / "qas" / split / f"{split}_qa.pkl"
    if not path.is_file() and list(Path(data).glob("**/*.parquet")):
        raise ValueError(f"{path}: not found; {data} holds parquet files (the Hugging Face copy), which are not read: "
                         "use the release's qas/ and images/ folders")
    with open(path, "rb") as f:
        try:
            records = PlainData(f).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
            raise ValueError(f"{path}: refused: {e}") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: a {type(records).__name__}, not a list of records")
    questions = []
    for k, r in enumerate(records):
        require(r, ("image", "question", "answer"), f"{path}: record {k}")
        closed = str(r["answer"]).strip().lower() in ("yes", "no")
        questions.append(question(k, f"{split}/{r['image']}.jpg", r["question"], r["answer"],
                                  "closed" if closed else "open"))
    return questions, Path(data) / "images"


def read_pmc_vqa(path):
    """PMC-VQA (Zhang et al., 2023, github.com/xiaoman-zhang/PMC-VQA): test.csv / test_clean.csv with Figure_path,
    Question, Answer (Anwser [sic] in its first release), Choice A..D ("A: text"), Answer_label; multiple choice, the
    choices listed under the question. Bad rows are skipped with a warning; images under images/ if it exists."""
    questions, bad = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.DictReader(f)
        header = rows.fieldnames or []
        if missing := [c for c in ("Figure_path", "Question", "Choice A", "Answer_label") if c not in header]:
            raise ValueError(f"{path}: no {missing[0]!r} column (is this PMC-VQA's CSV?)")
        for row_number, row in enumerate(rows, start=2):  # row 1 is the header
            cell = defaultdict(str, {k: (v or "").strip() for k, v in row.items() if k})  # a missing cell is None
            choices = {x: re.sub(rf"^{x}:\s*", "", cell[f"Choice {x}"], flags=re.I)  # "A: text" -> "text"
                       for x in "ABCD" if cell[f"Choice {x}"]}
            figure, text, label = cell["Figure_path"], cell["Question"], cell["Answer_label"]
            answer = cell["Answer"] or cell["Anwser"] or choices.get(label, "")
            if not (figure and text and answer) or label not in choices:
                bad.append(f"row {row_number}: empty figure, question or answer, or label {label!r} not a choice")
                continue
            lines = "\n".join(f"{k}: {v}" for k, v in choices.items())
            questions.append(question(f"row{row_number}", figure, f"{text}\n{lines}", answer, "choice",
                                      choices=choices, answer_label=label))
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} malformed rows, e.g. {bad[0]}")
    root = Path(path).parent
    return questions, root / "images" if (root / "images").is_dir() else root


def read_our_records(path, skipped):
    """Our JSON/JSONL records (data.py's format): every gpt turn is a question, asked after the dialog before it. Its
    answer_type is the record's own, else choice for a first turn with choices and answer_label, else closed for a
    yes/no reference, else open. Unusable records are counted in `skipped`."""
    questions = []
    for k, r in enumerate(read_records(path)):
        try:
            turns, names, asked = r["conversations"], image_files(r), []
            for t in range(1, len(turns), 2):
                reference = turns[t]["value"]
                kind = str(r.get("answer_type") or ("choice" if t == 1 and r.get("choices") and r.get("answer_label")
                                                    else "closed" if yes_no(reference) else "open")).lower()
                if kind not in ("open", "closed", "choice"):
                    raise TypeError(f"answer_type {kind!r}")
                extra = {f: r[f] for f in ("choices", "answer_label", *GROUPS) if f in r}
                asked.append(dict(id=f"{r.get('id', k)}:{t // 2}", image=names, turns=turns[:t], answer_type=kind,
                                  question=turns[t - 1]["value"], reference=reference, **extra))
            questions += asked
        except (KeyError, TypeError, AttributeError):  # not a record of alternating turns
            skipped["records_malformed"] += 1
    return questions, Path(path).parent


def read_benchmark(args, skipped):
    """(questions, the folder their image names are relative to) for --benchmark, --data, --split, --lang."""
    if not os.path.exists(args.data):
        raise ValueError(f"{args.data}: no such file or folder")
    if args.benchmark == "vqa-rad":
        questions, root = read_vqa_rad(args.data, args.split)
    elif args.benchmark == "slake":
        questions, root = read_slake(args.data, args.split, args.lang)
    elif args.benchmark == "pathvqa":
        questions, root = read_pathvqa(args.data, args.split)
    elif args.benchmark == "pmc-vqa":
        questions, root = read_pmc_vqa(args.data)
    else:
        questions, root = read_our_records(args.data, skipped)
    seen = Counter()
    for q in questions:  # ids unique, whatever the file repeats
        seen[q["id"]] += 1
        q["id"] += f"#{seen[q['id']]}" if seen[q["id"]] > 1 else ""
    return questions, args.image_root or str(root)


# ----------------------------------------------------------------------------- answering


def prepare(q, model, tokenizer, image_root, args, skipped):
    """A question ready to decode, (q, prompt ids, pixels or None, room), or None (skipped, and why)."""
    template = args.open_prompt if q["answer_type"] == "open" else args.closed_prompt
    turns = q["turns"][:-1] + [{"from": "human", "value": template.replace("{question}", q["turns"][-1]["value"])}]
    try:
        paths = [os.path.join(image_root, f) for f in q["image"]]
        pixels = load_pixels(paths, model, args.max_image_pixels) if paths else None
        prompt = prompt_ids(turns, tokenizer, model.config.style, pixels is not None)
    except ImageError:
        skipped["missing_or_corrupt_image"] += 1
        return None
    except TooManyImages:
        skipped["too_many_images"] += 1
        return None
    except (ValueError, KeyError, TypeError, AttributeError):  # turns that do not alternate human, gpt
        skipped["records_malformed"] += 1
        return None
    budget = room(model, prompt, args.max_new_tokens or 512)[0]  # as if alone, whatever it is batched with
    if budget == 0:
        skipped["over_context"] += 1
        return None
    return q, prompt, pixels, budget


def answer_all(questions, done, model, tokenizer, image_root, args, out):
    """Answer every question `done` lacks, batch_size at a time (one batch of images in memory), appending a JSON
    line per answer and flushing after each batch: a killed run loses the batch in flight, no more. Returns skips."""
    skipped = Counter()
    todo = (prepare(q, model, tokenizer, image_root, args, skipped) for q in questions if q["id"] not in done)
    ready = (x for x in todo if x is not None)
    # the progress bar only in a terminal (disable=None), so that a log holds the results and errors alone
    progress = tqdm(total=len(questions), initial=len(done), unit="answer", file=sys.stderr, disable=None)
    while batch := list(itertools.islice(ready, args.batch_size)):  # reads images as far as this batch needs
        pixels = [x[2] for x in batch if x[2] is not None]
        rows = generate_batch(model, [x[1] for x in batch], torch.cat(pixels) if pixels else None,
                              max(x[3] for x in batch), tokenizer.eos_id, temperature=args.temperature,
                              top_p=args.top_p, rng=args.rng, compile=args.compile)
        for (q, _, _, budget), ids in zip(batch, rows):  # decoded for the largest room, each cut to its own
            line = {k: v for k, v in q.items() if k != "turns"} | {"prediction": tokenizer.decode(ids[:budget])}
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
        out.flush()
        progress.update(len(batch))
    progress.close()
    return skipped


def answered(path, ids):
    """The ids an earlier run of these questions answered in `path`, after cutting off a last line that a kill left
    incomplete. Raises if the file holds an answer to another question (another benchmark, split or language)."""
    data = Path(path).read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    done = set()
    for n, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        try:
            qid = json.loads(line)["id"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {n}: not one of our answers ({e!r}); --overwrite replaces the file") from e
        if qid not in ids or qid in done:
            raise ValueError(f"{path} line {n}: id {qid!r} is {'twice' if qid in done else 'not a question here'}: "
                             "not a run of these questions; --overwrite replaces it")
        done.add(qid)
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return done


# ----------------------------------------------------------------------------- the report


def read_answers(path):
    """An answers file, ours or another system's: JSON lines with question, reference, prediction and answer_type
    (open, closed or choice, any case; choice lines also choices and answer_label)."""
    answers = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            a = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not JSON ({e})") from e
        kind = str(a.get("answer_type", "")).strip().lower() if isinstance(a, dict) else ""
        fields = ("question", "reference", "prediction", "answer_type") + (("choices", "answer_label")
                                                                          if kind == "choice" else ())
        require(a, fields, f"{path} line {n}")
        if kind not in ("open", "closed", "choice"):
            raise ValueError(f"{path} line {n}: answer_type {a['answer_type']!r} is not open, closed or choice")
        if kind == "choice" and not isinstance(a["choices"], dict):
            raise ValueError(f"{path} line {n}: choices must be an object such as {{\"A\": \"CT\", \"B\": \"MRI\"}}")
        answers.append(a | {"answer_type": kind, "prediction": str(a["prediction"]), "reference": str(a["reference"])})
    return answers


COLUMNS = {"open": (("recall", "llava_med_recall"), ("recall*", "recall"), ("exact", "exact_match")),
           "closed": (("acc", "llava_med_accuracy"), ("acc*", "strict_accuracy"), ("exact", "exact_match")),
           "choice": (("acc", "accuracy"),)}


def report(answers, out, settings, skipped):
    """The table on stdout, as papers lay it out (percent), and STEM.metrics.json beside the answers file `out`."""
    table = metrics(answers)
    kinds = [k for k in COLUMNS if any(k in row for row in table.values())]
    width = max(len(g) for g in [*table, "group"]) + 2
    print(" " * width + "".join(f"{' ' + k + ' ':-^{6 + 8 * len(COLUMNS[k])}}  " for k in kinds).rstrip())
    print(f"{'group':<{width}}" + "  ".join(f"{'n':>6}" + "".join(f"{c:>8}" for c, _ in COLUMNS[k]) for k in kinds))
    for group, row in table.items():
        cells = []
        for k in kinds:
            cell = row.get(k, {})
            values = [cell.get(m) for _, m in COLUMNS[k]]
            cells.append(f"{cell.get('n', ''):>6}" + "".join(f"{'-' if v is None else f'{100 * v:.1f}':>8}"
                                                            for v in values) + "  ")
        print((f"{group:<{width}}" + "".join(cells)).rstrip())
    if kinds != ["choice"]:
        print("recall, acc: LLaVA-Med's rule; recall*, acc*: ours (words, Chinese by characters; yes/no by whole "
              "words); exact: exact match; in percent")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"
    path = Path(out).with_suffix(".metrics.json")
    path.write_text(json.dumps({**settings, "answers": len(answers), "skipped": dict(skipped), "groups": table},
                               indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"{len(answers)} answers; skipped: {counts}; wrote {path}")


def nothing_answered(skipped, n_questions, image_root, data):
    """Rather than a table of dashes: why (the most common skip), and what to change."""
    counts = ", ".join(f"{k} {v}" for k, v in skipped.most_common()) or "none"
    hint = {"missing_or_corrupt_image": f"image names are relative to {image_root}; see --image-root",
            "too_many_images": f"a record takes at most {MAX_IMAGES} images",
            "records_malformed": "a record needs 'conversations' of alternating human and gpt turns",
            "over_context": "the questions with the image's features are longer than the model's context",
            }.get(skipped.most_common(1)[0][0] if skipped else None, "no question to answer")
    return ValueError(f"{data}: no answers from {n_questions} questions (skipped: {counts}); {hint}")


# ----------------------------------------------------------------------------- the command


def parse_args(argv=None):
    """The checked flags; for a model run also chat.py's defaults (dtype, the seeded generator args.rng)."""
    p = argparse.ArgumentParser(description="Answer a medical VQA benchmark with Qilin-Med-VL and score it, or score "
                                            "an answers file (--score).")
    p.add_argument("--benchmark", choices=BENCHMARKS, help="default: pmc-vqa for a .csv, else records (ours)")
    p.add_argument("--data", help="the benchmark's folder as downloaded (pmc-vqa, records: the file)")
    p.add_argument("--split", default="test", help="vqa-rad: train|test; slake: train|validate|test; "
                   "pathvqa: train|val|test (default test)")
    p.add_argument("--lang", choices=("en", "zh", "all"), default="all", help="slake: the questions in this language")
    p.add_argument("--image-root", help="folder the image names are relative to (default: the benchmark's own)")
    p.add_argument("--open-prompt", default="{question}", help="how an open question is asked (default: as it is)")
    p.add_argument("--closed-prompt", default="{question}", help="how a closed or multiple-choice question is asked, "
                   "e.g. '{question} Answer yes or no.'; closed scores depend on it, so the metrics record it")
    p.add_argument("--out", help="answers file (default answers/BENCHMARK-SPLIT.jsonl); metrics in STEM.metrics.json")
    p.add_argument("--batch-size", type=int, default=8, help="answers generated together")
    p.add_argument("--resume", action="store_true", help="continue the run whose answers --out holds")
    p.add_argument("--overwrite", action="store_true", help="replace --out's answers")
    p.add_argument("--score", metavar="FILE", help="score this answers file (no model): ours, or any JSON lines with "
                   "question, reference, prediction, answer_type")
    add_model_flags(p)
    add_sampling_flags(p, "here")
    args = p.parse_args(argv)
    if args.score:
        return args
    args.benchmark = args.benchmark or ("pmc-vqa" if str(args.data).lower().endswith(".csv") else "records")
    name = args.split if args.benchmark in SPLITS else Path(args.data or "answers").stem
    args.out = args.out or f"answers/{args.benchmark}-{name}{'' if args.lang == 'all' else '-' + args.lang}.jsonl"
    return check_args(p, args, greedy=True, checks=(
        (not args.data, "give --data (the benchmark's folder or file), or --score FILE"),
        (args.split not in SPLITS.get(args.benchmark, (args.split,)),
         f"{args.benchmark} has the splits {', '.join(SPLITS.get(args.benchmark, ()))}, not {args.split!r}"),
        (args.lang != "all" and args.benchmark != "slake", "--lang is for slake"),
        ("{question}" not in args.open_prompt or "{question}" not in args.closed_prompt,
         "--open-prompt and --closed-prompt must hold {question}"),
        (args.resume and args.overwrite, "give --resume or --overwrite, not both"),
        (args.batch_size < 1, f"--batch-size must be at least 1, not {args.batch_size}")))


def run(args):
    """Read the benchmark, refuse to lose earlier answers, answer what is left, then score the whole answers file."""
    skipped = Counter()
    questions, image_root = read_benchmark(args, skipped)
    done = set()
    if os.path.exists(args.out) and not args.overwrite:
        if not args.resume:
            raise ValueError(f"{args.out} exists: --resume continues that run, --overwrite replaces it")
        done = answered(args.out, {q["id"] for q in questions})
    model, tokenizer = load_from_args(args)  # before anything is written
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a" if done else "w", encoding="utf-8") as out:
        skipped += answer_all(questions, done, model, tokenizer, image_root, args, out)
    answers = read_answers(args.out)
    if not answers:
        os.remove(args.out)  # empty: nothing to keep, and a rerun should not be refused for it
        raise nothing_answered(skipped, len(questions), image_root, args.data)
    report(answers, args.out, dict(
        benchmark=args.benchmark, data=args.data, split=args.split if args.benchmark in SPLITS else None,
        lang=args.lang if args.benchmark == "slake" else None, model=args.model,
        style=model.config.style, prompts={"open": args.open_prompt, "closed": args.closed_prompt},
        sampling=dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                      seed=args.seed), questions=len(questions)), skipped)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.score:
            report(read_answers(args.score), args.score, {"scored": args.score}, Counter())
        else:
            run(args)
        return 0
    except (CheckpointError, ImageError, ValueError, OSError) as e:  # bad input: one line, no traceback
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if not args.score:
            print(f"stopped; {args.out} keeps the answers so far, and --resume continues", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
