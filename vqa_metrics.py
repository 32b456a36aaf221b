"""The medical VQA metrics as the field computes them, with ours beside them: LLaVA-Med's published rule (Li et al.,
2023, microsoft/LLaVA-Med: llava/eval/run_eval.py and llava/eval/eval_metrics/) for open-question recall and
closed-question accuracy, exact match, our stricter recall and closed accuracy (words, and characters in Chinese;
yes/no by whole words), and multiple-choice accuracy. Each definition is in its function's docstring; `score` gives
one answer's scores by its answer type, `metrics` their means for all answers and by language, modality and content.
"""

import re
from collections import Counter, defaultdict

GROUPS = ("lang", "modality", "content_type")  # the breakdowns papers report for SLAKE, where the answers have them

# LLaVA-Med's answer normalisation (its eval_metrics/glossary.py, normalize_word), in our words
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
TOKEN = re.compile(r"[0-9a-z\u00c0-\u024f]+|[^\W_]")  # a Latin word or number, else one character (Chinese)
YES, NO = ("yes", "是", "是的", "对", "有"), ("no", "否", "不是", "不对", "不", "没有", "无")
LEADING_LETTER = re.compile(r"[(（\[]?([A-D])\s*(?:$|[:：.)）\],，、])")  # "B", "(C)", "A: CT"; not "A chest"
STATED_LETTER = re.compile(r"(?i:answer|option|choice|答案|选项|选择|选)\s*(?i:is|是|为)?\s*[:：]?\s*[(（]?([A-D])(?![A-Za-z])")


def normalize(text):
    """LLaVA-Med's normalisation of a lower-cased answer: a punctuation mark becomes a space, or vanishes where one
    touches a space or the text holds a digit,digit comma; a period not before a digit vanishes (at most 32 of them:
    its re.sub passes re.UNICODE as the count); number words become digits ("two" -> "2"); "a", "an", "the" go.
    Its table of contractions ("dont" -> "don't") renames words on both sides alike, so it is left out."""
    comma_in_number = re.search(r"\d,\d", text) is not None
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if comma_in_number or p + " " in text or " " + p in text else " ")
    out = re.sub(r"\.(?!\d)", "", out, count=32)
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(w for w in words if w not in ("a", "an", "the")).replace(",", "")


def llava_med_recall(prediction, reference):
    """Open questions, LLaVA-Med's score (llava/eval/run_eval.py, the recall of calculate_f1score): both lower-cased,
    normalised twice (its evaluate and calculate_f1score each do), split at whitespace; recall = tp / (tp + fn), tp the
    prediction's count of each word the reference has, fn the reference's count of each word it lacks; 0 if either is
    empty. A Chinese answer has no spaces, so it is one word: right only when whole."""
    pred, ref = (Counter(normalize(normalize(t.lower())).split()) for t in (prediction, reference))
    tp = sum(n for w, n in pred.items() if w in ref)
    fn = sum(n for w, n in ref.items() if w not in pred)
    return tp / (tp + fn) if pred and ref else 0.0


def llava_med_closed(prediction, reference):
    """Closed questions, LLaVA-Med's score (run_eval.py with its fix of December 2023, which counts a miss as 0 rather
    than dropping it): 1 if the normalised prediction holds "yes" or "no" anywhere, even inside a word, and holds the
    normalised reference. So "normal" answers "no", and a closed answer that is not yes/no ("left", "CT") scores only
    when "no" happens to appear ("not", "nodule"); Chinese holds neither, so every Chinese answer scores 0."""
    pred, ref = (normalize(t.lower()) for t in (prediction, reference))
    return float(("yes" in pred or "no" in pred) and ref in pred)


def tokens(text):
    """Our unit of comparison: after LLaVA-Med's normalisation, Latin words and numbers whole, each other letter (a
    Chinese character) alone, no punctuation."""
    return TOKEN.findall(normalize(text.lower()))


def exact_match(prediction, reference):
    """1 if the answer's tokens are the reference's, in order: English by words ("The liver." is "liver"), Chinese by
    characters ("肝脏。" is "肝脏")."""
    ref = tokens(reference)
    return float(bool(ref) and tokens(prediction) == ref)


def recall(prediction, reference):
    """Ours for open questions: the share of the reference's tokens (each as often as it occurs) that the answer
    holds; LLaVA-Med's recall by words, but by characters in Chinese. None for a reference without any."""
    ref, pred = Counter(tokens(reference)), Counter(tokens(prediction))
    return sum((ref & pred).values()) / sum(ref.values()) if ref else None


def yes_no(text, strict=True):
    """'yes', 'no' or None by whole words: "No, ..." is no, "normal" is not. strict (references): a first clause that
    is a yes/no word; else (predictions) one starting so, or a lone "yes"/"no" anywhere."""
    clause = re.split(r"[\s,.;:!?，。；：！？、]", text.strip().lower(), maxsplit=1)[0]
    for word in NO + YES:  # negatives first: "不是" starts with "不", not "是"
        if clause == word or (not strict and not word.isascii() and clause.startswith(word)):
            return "no" if word in NO else "yes"
    found = set() if strict else set(re.findall(r"\b(yes|no)\b", text.lower()))
    return found.pop() if len(found) == 1 else None


def closed_strict(prediction, reference):
    """Ours for closed questions: a yes/no reference needs the answer's own yes or no, by whole words ("normal" is
    neither; an answer with both is wrong); any other ("left", "CT", "左肺") needs every token of the reference."""
    truth = yes_no(reference)
    if truth is not None:
        return float(yes_no(prediction, strict=False) == truth)
    return float(recall(prediction, reference) == 1)


def choice_letter(prediction, choices):
    """The letter a prediction picks from {"A": text, ...}: "(C) ...", "答案是B", else the one choice it quotes."""
    text = prediction.strip()
    m = LEADING_LETTER.match(text) or STATED_LETTER.search(text)
    if m and m.group(1) in choices:
        return m.group(1)
    hits = sorted((len(v), k) for k, v in choices.items() if v and v.lower() in text.lower())  # the longest wins
    return hits[-1][1] if hits and (len(hits) == 1 or hits[-1][0] > hits[-2][0]) else None


def score(answer):
    """One answer's scores, by its answer type (the table's columns; None where a reference has no tokens)."""
    p, r = answer["prediction"], answer["reference"]
    if answer["answer_type"] == "choice":
        return {"accuracy": float(choice_letter(p, answer["choices"]) == answer["answer_label"])}
    if answer["answer_type"] == "closed":
        return {"llava_med_accuracy": llava_med_closed(p, r), "strict_accuracy": closed_strict(p, r),
                "exact_match": exact_match(p, r)}
    return {"llava_med_recall": llava_med_recall(p, r), "recall": recall(p, r), "exact_match": exact_match(p, r)}


def metrics(answers):
    """{group: {answer type: {"n": count, metric: mean}}}, for all answers and each value of GROUPS present."""
    cells = defaultdict(lambda: defaultdict(list))
    for a in answers:
        scores = score(a)
        for group in ["all"] + [f"{g}={a[g]}" for g in GROUPS if a.get(g) is not None]:
            cells[group][a["answer_type"]].append(scores)
    table = {}
    order = {g: k for k, g in enumerate(GROUPS)}  # all, then the groups in GROUPS's order, each by value
    for group in sorted(cells, key=lambda g: (g != "all", order.get(g.partition("=")[0], 0), g)):
        table[group] = {}
        for kind in ("open", "closed", "choice"):
            if rows := cells[group].get(kind):
                means = {m: (sum(v) / len(v) if (v := [r[m] for r in rows if r[m] is not None]) else None)
                         for m in rows[0]}
                table[group][kind] = {"n": len(rows), **means}
    return table
