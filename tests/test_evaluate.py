"""evaluate.py and vqa_metrics.py: each benchmark read from a small file written in its published format (with real
images from samples/), the metrics against a plain second implementation of LLaVA-Med's published rule, batched
answering, --score on another system's file, --resume after a kill, and bad inputs.

Tiny random models on the CPU and the real LLaMA-style tokenizer, as in test_chat.py.
"""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import chat
import evaluate
import vqa_metrics as vm
from test_chat import CHEST, IMAGES, ROOT, TOKENIZER, corrupt_image, question, stage1_output, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model().save_pretrained(folder, tokenizer=TOKENIZER)
    return str(folder)


def jpeg(name, path):
    """A real sample image saved where a benchmark keeps its images, as the JPEG the benchmarks ship."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(IMAGES / name).convert("RGB").save(path, "JPEG")


# ----------------------------------------------------------------------------- small files in the published formats

def write_vqa_rad(folder):
    """VQA_RAD Dataset Public.json and its image folder: 2 train questions (freeform, para), 4 test ones."""
    rows = [(1, "synpic100.jpg", "freeform", "Is there a fracture?", "No", "CLOSED"),
            (2, "synpic100.jpg", "para", "Is a bone broken?", "No", "CLOSED"),
            (3, "synpic200.jpg", "test_freeform", "Is this a chest x-ray?", "Yes", "CLOSED"),
            (4, "synpic200.jpg", "test_para", "Which side is the heart on, left or right?", "Left", "CLOSED "),
            (5, "synpic300.jpg", "test_freeform", "What organ is shown?", "Brain", "OPEN"),
            (6, "synpic300.jpg", "test_freeform", "How many ventricles are seen?", 2, "OPEN")]
    records = [dict(qid=q, image_name=i, image_case_url="https://medpix.nlm.nih.gov/case", image_organ="CHEST",
                    answer=a, answer_type=t, question_type="PRES", question=text, phrase_type=p, evaluation="given",
                    question_rephrase="NULL", question_relation="NULL", question_frame="NULL", qid_linked_id=q)
               for q, i, p, text, a, t in rows]
    folder.mkdir(parents=True)
    (folder / evaluate.VQA_RAD_JSON).write_text(json.dumps(records, indent=4), encoding="utf-8")
    for name, sample in (("synpic100.jpg", "tibia_xray.png"), ("synpic200.jpg", "chest_xray.png"),
                         ("synpic300.jpg", "head_ct.png")):
        jpeg(sample, folder / evaluate.VQA_RAD_IMAGES / name)
    return folder


SLAKE_TEST = [  # (qid, image, question, answer, lang, answer type, modality, content type)
    (0, "xmlab1", "What modality is used to take this image?", "X-Ray", "en", "OPEN", "X-Ray", "Modality"),
    (1, "xmlab1", "Does the picture contain the heart?", "Yes", "en", "CLOSED", "X-Ray", "Organ"),
    (2, "xmlab1", "Which is bigger in this image, the left lung or the right lung?", "Left Lung", "en", "CLOSED",
     "X-Ray", "Size"),
    (3, "xmlab1", "这张图片是用什么模态拍摄的？", "X光", "zh", "OPEN", "X-Ray", "Modality"),
    (4, "xmlab1", "图中有心脏吗？", "是", "zh", "CLOSED", "X-Ray", "Organ"),
    (5, "xmlab2", "Which part of the body does this image belong to?", "Head", "en", "OPEN", "CT", "Position"),
    (6, "xmlab2", "图像属于身体的哪个部位？", "头部", "zh", "OPEN", "CT", "Position"),
    (7, "xmlab2", "这张图像是磁共振吗？", "不是", "zh", "CLOSED", "CT", "Modality"),
]


def write_slake(folder):
    """Slake1.0: train.json, validate.json, test.json and imgs/xmlabN/source.jpg."""
    def record(qid, img, text, answer, lang, kind, modality, content):
        return dict(img_id=int(img[5:]), img_name=f"{img}/source.jpg", question=text, answer=answer, q_lang=lang,
                    location="Chest" if img == "xmlab1" else "Head", modality=modality, answer_type=kind,
                    base_type="vqa", content_type=content, triple=["vhead", "_", "_"], qid=qid)
    folder.mkdir(parents=True)
    splits = {"test": SLAKE_TEST,
              "train": [(100, "xmlab3", "Is this an MRI?", "Yes", "en", "CLOSED", "MRI", "Modality"),
                        (101, "xmlab3", "这是磁共振吗？", "是", "zh", "CLOSED", "MRI", "Modality")],
              "validate": [(200, "xmlab3", "What organ is this?", "Liver", "en", "OPEN", "MRI", "Organ")]}
    for split, rows in splits.items():
        (folder / f"{split}.json").write_text(json.dumps([record(*r) for r in rows], ensure_ascii=False, indent=1),
                                              encoding="utf-8")
    for img, sample in (("xmlab1", "chest_xray.png"), ("xmlab2", "head_ct.png"), ("xmlab3", "abdomen_mri.png")):
        jpeg(sample, folder / "imgs" / img / "source.jpg")
    return folder


def write_pathvqa(folder):
    """The PathVQA release: qas/{split}/{split}_qa.pkl (pickled lists of dicts) and images/{split}/NAME.jpg."""
    splits = {"test": [("test_0000", "Is this an ihc stain?", "yes"), ("test_0000", "What stains brown?", "the cells"),
                       ("test_0001", "Is there inflammation?", "no"), ("test_0001", "What is shown?", "retina")],
              "val": [("val_0000", "Is this tissue?", "yes")]}
    for split, rows in splits.items():
        (folder / "qas" / split).mkdir(parents=True)
        with open(folder / "qas" / split / f"{split}_qa.pkl", "wb") as f:
            pickle.dump([dict(image=i, question=q, answer=a) for i, q, a in rows], f)
        for image in {i for i, _, _ in rows}:
            jpeg("colon_ihc_pathology.png" if image.endswith("0") else "retina_fundus.jpg",
                 folder / "images" / split / f"{image}.jpg")
    return folder


def write_pmc_vqa(folder):
    folder.mkdir(parents=True)
    (folder / "test_clean.csv").write_text(
        "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n"
        "PMC1_F1.jpg,What modality is shown?,CT,A:CT,B:MRI,C:X-ray,D:Ultrasound,A\n"
        "PMC2_F2.jpg,Which organ is imaged?,Lung, A:Heart , B:Lung ,C:Brain,D:Liver,B\n", encoding="utf-8")
    jpeg("abdomen_ct.png", folder / "images" / "PMC1_F1.jpg")
    jpeg("chest_xray.png", folder / "images" / "PMC2_F2.jpg")
    return folder


def read(benchmark, data, split="test", lang="all"):
    args = evaluate.parse_args(["--model", "m", "--benchmark", benchmark, "--data", str(data), "--split", split,
                                "--lang", lang])
    return evaluate.read_benchmark(args, Counter())


def test_vqa_rad_test_split_is_the_test_phrase_types_with_the_files_labels(tmp_path):
    folder = write_vqa_rad(tmp_path / "VQA_RAD")
    questions, root = read("vqa-rad", folder)
    assert [q["id"] for q in questions] == ["3", "4", "5", "6"] and Path(root) == folder / "VQA_RAD Image Folder"
    kinds = {q["reference"]: q["answer_type"] for q in questions}
    assert kinds == {"Yes": "closed", "Left": "closed", "Brain": "open", "2": "open"}  # "Left": closed by its label
    assert [q["id"] for q in read("vqa-rad", folder, "train")[0]] == ["1", "2"]
    assert all(os.path.isfile(os.path.join(root, q["image"][0])) for q in questions)


@pytest.mark.parametrize("lang, expected", [("en", [0, 1, 2, 5]), ("zh", [3, 4, 6, 7]), ("all", list(range(8)))])
def test_slake_split_and_language(tmp_path, lang, expected):
    folder = write_slake(tmp_path / "Slake1.0")
    questions, root = read("slake", folder, "test", lang)
    assert [int(q["id"]) for q in questions] == expected
    for q in questions:
        qid, img, text, answer, q_lang, kind, modality, content = SLAKE_TEST[int(q["id"])]
        assert (q["question"], q["reference"], q["lang"], q["modality"], q["content_type"]) == (
            text, answer, q_lang, modality, content)
        assert q["answer_type"] == kind.lower()  # "Left Lung" is closed, as the file says
        assert os.path.isfile(os.path.join(root, q["image"][0])) and q["image"] == [f"{img}/source.jpg"]
    assert [q["id"] for q in read("slake", folder, "validate")[0]] == ["200"]
    assert [q["reference"] for q in read("slake", folder, "train", "zh")[0]] == ["是"]


def test_pathvqa_reads_the_release_pickles_closed_are_yes_no(tmp_path):
    folder = write_pathvqa(tmp_path / "pvqa")
    questions, root = read("pathvqa", folder)
    assert [(q["reference"], q["answer_type"]) for q in questions] == [
        ("yes", "closed"), ("the cells", "open"), ("no", "closed"), ("retina", "open")]
    assert questions[0]["image"] == ["test/test_0000.jpg"] and os.path.isfile(os.path.join(root, "test/test_0000.jpg"))
    assert len(read("pathvqa", folder, "val")[0]) == 1
    hf = tmp_path / "path-vqa"  # the Hugging Face copy: parquet files, not read, and the error says so
    (hf / "data").mkdir(parents=True)
    (hf / "data" / "test-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="holds parquet files .* which are not read: use the release's qas/"):
        read("pathvqa", hf)


class Payload:
    """What a hostile pickle does: call a function (here, one that writes a file) while it loads."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_pathvqa_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path, model_dir, capsys):
    folder = write_pathvqa(tmp_path / "pvqa")
    marker = tmp_path / "ran"
    with open(folder / "qas" / "test" / "test_qa.pkl", "wb") as f:
        pickle.dump([dict(image="test_0000", question="Q?", answer=Payload(str(marker)))], f)
    pickle.loads(pickle.dumps(Payload(str(tmp_path / "control"))))  # the payload works when unpickled plainly
    assert (tmp_path / "control").exists()
    assert evaluate.main(["--model", model_dir, "--benchmark", "pathvqa", "--data", str(folder),
                          "--out", str(tmp_path / "a.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused: it asks for pathlib" in err and "only lists, dicts" in err
    assert not marker.exists()


def test_pmc_vqa_csv(tmp_path):
    header = "Figure_path,Caption,Question,Choice A,Choice B,Choice C,Choice D,Anwser,Answer_label\n"
    rows = [
        'PMC1_fig1.jpg,An axial CT.,What modality is shown?,A:CT, B:MRI, C:X-ray, D:Ultrasound,CT,A\n',
        'PMC2_fig2.jpg,Hepatomegaly.,Which organ is enlarged?, A: Spleen , B: Liver ,C:Kidney,D:Heart,Liver,B\n',
        'PMC3_fig3.jpg,,,A:Heart,B:Lung,C:Bone,D:Brain,Heart,E\n',  # no question, label E
        'PMC4_fig4.jpg,Truncated row\n',
    ]
    (tmp_path / "pmc.csv").write_text(header + "".join(rows), encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 2 malformed rows"):
        questions, root = evaluate.read_pmc_vqa(tmp_path / "pmc.csv")
    assert len(questions) == 2 and root == tmp_path
    first, second = questions
    assert first["image"] == ["PMC1_fig1.jpg"] and first["answer_label"] == "A" and first["answer_type"] == "choice"
    assert first["turns"][0]["value"] == "<image>\nWhat modality is shown?\nA: CT\nB: MRI\nC: X-ray\nD: Ultrasound"
    assert first["reference"] == "CT"
    assert second["choices"] == {"A": "Spleen", "B": "Liver", "C": "Kidney", "D": "Heart"}
    assert second["choices"][second["answer_label"]] == second["reference"]
    questions, root = evaluate.read_pmc_vqa(write_pmc_vqa(tmp_path / "PMC-VQA") / "test_clean.csv")  # "Answer"
    assert [q["reference"] for q in questions] == ["CT", "Lung"] and root == tmp_path / "PMC-VQA" / "images"


def drop_field(path, field, pkl=False):
    records = pickle.loads(path.read_bytes()) if pkl else json.loads(path.read_text(encoding="utf-8"))
    del records[-1][field]
    path.write_bytes(pickle.dumps(records)) if pkl else path.write_text(json.dumps(records), encoding="utf-8")


@pytest.mark.parametrize("name", ["vqa-rad", "slake", "pathvqa", "pmc-vqa"])
def test_a_file_that_is_not_the_benchmark_fails_naming_the_missing_field(tmp_path, model_dir, capsys, name):
    if name == "vqa-rad":
        data = write_vqa_rad(tmp_path / "VQA_RAD")
        drop_field(data / evaluate.VQA_RAD_JSON, "phrase_type")
        expected = "record 5: no 'phrase_type' field"
    elif name == "slake":
        data = write_slake(tmp_path / "Slake1.0")
        drop_field(data / "test.json", "q_lang")
        expected = "test.json: record 7: no 'q_lang' field"
    elif name == "pathvqa":
        data = write_pathvqa(tmp_path / "pvqa")
        drop_field(data / "qas" / "test" / "test_qa.pkl", "answer", pkl=True)
        expected = "test_qa.pkl: record 3: no 'answer' field"
    else:
        data = tmp_path / "test.csv"
        data.write_text("Figure_path,Question,Answer,Choice A,Choice B\nPMC1.jpg,Q?,CT,A:CT,B:MR\n")
        expected = "test.csv: no 'Answer_label' column"
    assert evaluate.main(["--model", model_dir, "--benchmark", name, "--data", str(data),
                          "--out", str(tmp_path / "a.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and ("(is this the benchmark's" in err or "PMC-VQA's CSV" in err)
    assert not (tmp_path / "a.jsonl").exists()


# ----------------------------------------------------------------------------- the metrics, against a plain reference

class LlavaMedReference:
    """LLaVA-Med's scoring written again as its code reads (llava/eval/run_eval.py at the December 2023 fix, and
    eval_metrics/glossary.py, evaluate_metrics.py, utils.py), loop for loop, apart from vqa_metrics: the test's
    independent reference. Its contraction table is left out, as vqa_metrics leaves it out."""

    manual_map = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                  "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
    articles = ["a", "an", "the"]
    period_strip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    comma_strip = re.compile(r"(\d)(\,)(\d)")
    punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

    def normalize_word(self, token):
        _token = token
        for p in self.punct:
            if (p + " " in token or " " + p in token) or (re.search(self.comma_strip, token) is not None):
                _token = _token.replace(p, "")
            else:
                _token = _token.replace(p, " ")
        token = self.period_strip.sub("", _token, re.UNICODE)
        _token = []
        for word in token.lower().split():
            word = self.manual_map.setdefault(word, word)
            if word not in self.articles:
                _token.append(word)
        return " ".join(_token).replace(",", "")

    @staticmethod
    def split_sentence(sentence):
        words = {}
        for w in sentence.lower().strip().split():
            words[w] = words.get(w, 0) + 1
        return words

    def f1_recall(self, candidate, reference):
        candidate_words = self.split_sentence(self.normalize_word(candidate))
        reference_words = self.split_sentence(self.normalize_word(reference))
        tp = fn = 0
        for word in set(candidate_words) | set(reference_words):
            if word in candidate_words and word in reference_words:
                tp += candidate_words[word]
            elif word in reference_words:
                fn += reference_words[word]
        if not candidate_words or not reference_words or tp == 0:
            return 0
        return tp / (tp + fn)

    def score(self, answers):
        """The two figures its table reports: open recall and closed ("yes/no") accuracy."""
        open_hits, closed_hits = [], []
        for a in answers:
            gt_value = self.normalize_word(a["reference"].lower())
            pred_value = self.normalize_word(a["prediction"].lower())
            if a["answer_type"] == "OPEN":
                open_hits.append(self.f1_recall(pred_value, gt_value))
            elif a["answer_type"] == "CLOSED":
                if "yes" in pred_value or "no" in pred_value:
                    closed_hits.append(1 if gt_value in pred_value else 0)
                else:
                    closed_hits.append(0)
        return sum(open_hits) / len(open_hits), sum(closed_hits) / len(closed_hits)


# (reference, prediction, answer type, LLaVA-Med's score, ours: recall* / acc*)
CASES = [
    ("Left lung", "The left lung.", "OPEN", 1.0, 1.0),
    ("left lung nodule", "a nodule", "OPEN", 1 / 3, 1 / 3),
    ("two", "There are 2 lesions, lesions.", "OPEN", 1.0, 1.0),
    ("1,000", "about 1,000 cells", "OPEN", 1.0, 1.0),
    ("x-ray", "X ray (chest)", "OPEN", 1.0, 1.0),
    ("lung", "lung lung", "OPEN", 1.0, 1.0),
    ("肺", "肺。", "OPEN", 0.0, 1.0),  # Chinese has no spaces: LLaVA-Med compares the whole sentence
    ("左肺", "肺部", "OPEN", 0.0, 0.5),
    ("头部", "头部", "OPEN", 1.0, 1.0),
    ("no", "Normal.", "CLOSED", 1.0, 0.0),  # its yes/no rule: "no" inside "normal"
    ("no", "No, there is no fracture.", "CLOSED", 1.0, 1.0),
    ("yes", "Yes, but no effusion.", "CLOSED", 1.0, 1.0),
    ("yes", "no", "CLOSED", 0.0, 0.0),
    ("no", "It is not known.", "CLOSED", 1.0, 0.0),  # "no" inside "not", and "not known" is not "no"
    ("Left Lung", "The left lung is bigger.", "CLOSED", 0.0, 1.0),  # not yes/no: scored only if "no"/"yes" appear
    ("Left", "left, not right", "CLOSED", 1.0, 1.0),  # ... as here, inside "not"
    ("是", "是的，可见心脏。", "CLOSED", 0.0, 1.0),  # Chinese holds neither "yes" nor "no": always 0
    ("不是", "不是。", "CLOSED", 0.0, 1.0),
    ("是", "不是", "CLOSED", 0.0, 0.0),
]


def test_metrics_equal_a_plain_reference_of_llava_meds_rule_and_ours_is_beside_it():
    reference = LlavaMedReference()
    answers = [dict(reference=r, prediction=p, answer_type=t.lower()) for r, p, t, _, _ in CASES]
    for a, (_, _, _, llava_med, ours) in zip(answers, CASES):
        scores = vm.score(a)
        theirs = reference.score([dict(a, answer_type=a["answer_type"].upper())] * 2 +  # one of each type present
                                 [dict(reference="x", prediction="x", answer_type="CLOSED" if a["answer_type"] == "open"
                                       else "OPEN")])
        if a["answer_type"] == "open":
            assert scores["llava_med_recall"] == pytest.approx(theirs[0]) == pytest.approx(llava_med), a
            assert scores["recall"] == pytest.approx(ours), a
        else:
            assert scores["llava_med_accuracy"] == pytest.approx(theirs[1]) == pytest.approx(llava_med), a
            assert scores["strict_accuracy"] == ours, a
    table = vm.metrics(answers)["all"]
    assert (table["open"]["llava_med_recall"], table["closed"]["llava_med_accuracy"]) == pytest.approx(
        reference.score([dict(a, answer_type=a["answer_type"].upper()) for a in answers]))
    assert table["open"]["n"] == 9 and table["closed"]["n"] == 10


def test_normalisation_matches_the_reference_on_hard_punctuation():
    reference = LlavaMedReference()
    for text in ["a (left)-sided, 3.5 cm mass.", "1,2-dichloro; the end!", "left - right", "none of the two",
                 "x-ray/ct [axial] <b> a_b", "." * 40 + "end", "v. 2.0 vs. v.3", "所见：左肺，结节。"]:
        assert vm.normalize(text.lower()) == reference.normalize_word(text.lower()), text


def test_exact_match_by_words_in_english_and_characters_in_chinese():
    assert vm.exact_match("The liver.", "liver") == 1.0
    assert vm.exact_match("liver and spleen", "liver") == 0.0
    assert vm.exact_match("肝脏。", "肝脏") == 1.0 and vm.exact_match("肝", "肝脏") == 0.0
    assert vm.tokens("胸部X光片") == ["胸", "部", "x", "光", "片"]
    assert vm.exact_match("anything", "。") == 0.0


def test_yes_no_by_whole_words():
    assert vm.yes_no("No, there is no fracture.") == "no"
    assert vm.yes_no("yes") == "yes"
    assert vm.yes_no("Normal") is None  # LLaVA-Med counted this as "no"
    assert vm.yes_no("normal", strict=False) is None
    assert vm.yes_no("Nodule in the left lung", strict=False) is None
    assert vm.yes_no("There is no fracture.") is None  # a reference like this is an open answer
    assert vm.yes_no("There is no fracture.", strict=False) == "no"
    assert vm.yes_no("是") == "yes" and vm.yes_no("是的。") == "yes" and vm.yes_no("否") == "no"
    assert vm.yes_no("不是。") == "no"
    assert vm.yes_no("是的，可见骨折。", strict=False) == "yes"
    assert vm.yes_no("没有明显异常。", strict=False) == "no"
    assert vm.yes_no("胸部X光片。", strict=False) is None


def test_choice_letter():
    choices = {"A": "CT", "B": "MRI", "C": "CT angiography", "D": "Ultrasound"}
    assert vm.choice_letter("B", choices) == "B"
    assert vm.choice_letter("(C) CT angiography", choices) == "C"
    assert vm.choice_letter("D: Ultrasound", choices) == "D"
    assert vm.choice_letter("答案是B。", choices) == "B"
    assert vm.choice_letter("The answer is C", choices) == "C"
    assert vm.choice_letter("A chest radiograph would show it", choices) is None  # "A" the article
    assert vm.choice_letter("It is an ultrasound image.", choices) == "D"
    assert vm.choice_letter("This is CT angiography.", choices) == "C"  # contains "CT" too: the longer wins


def test_recall():
    assert vm.recall("a chest x-ray", "Chest X-ray") == 1.0
    assert vm.recall("lung", "left lung nodule") == pytest.approx(1 / 3)
    assert vm.recall("胸部CT", "胸部X光片") == pytest.approx(2 / 5)  # characters for Chinese; "x" a word
    assert vm.recall("anything", "。") is None


# ----------------------------------------------------------------------------- answering and scoring, end to end

def run_evaluate(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env=dict(os.environ, PYTHONIOENCODING="utf-8"))


@pytest.mark.parametrize("name, writer, rows", [
    ("vqa-rad", write_vqa_rad, ["all"]),
    ("slake", write_slake, ["all", "lang=en", "lang=zh", "modality=CT", "modality=X-Ray", "content_type=Modality",
                            "content_type=Organ", "content_type=Position", "content_type=Size"]),
    ("pathvqa", write_pathvqa, ["all"]),
    ("pmc-vqa", write_pmc_vqa, ["all"]),
])
def test_each_benchmark_end_to_end(tmp_path, model_dir, capsys, name, writer, rows):
    data = writer(tmp_path / "data")
    data = data / "test_clean.csv" if name == "pmc-vqa" else data
    out = tmp_path / "runs" / "answers.jsonl"  # its folder is made
    assert evaluate.main(["--model", model_dir, "--benchmark", name, "--data", str(data), "--out", str(out),
                          "--max-new-tokens", "6", "--closed-prompt", "{question} Answer yes or no."]) == 0
    table = capsys.readouterr().out
    metrics = json.loads(out.with_suffix(".metrics.json").read_text(encoding="utf-8"))
    assert list(metrics["groups"]) == rows and [line.split()[0] for line in table.splitlines()[2:2 + len(rows)]] == rows
    assert metrics["prompts"]["closed"] == "{question} Answer yes or no." and metrics["benchmark"] == name
    kinds = ["choice"] if name == "pmc-vqa" else ["open", "closed"]
    assert sorted(metrics["groups"]["all"]) == sorted(kinds) and metrics["skipped"] == {}
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    counted = sum(metrics["groups"]["all"][k]["n"] for k in kinds)
    assert len(lines) == metrics["answers"] == metrics["questions"] == counted
    assert len({a["id"] for a in lines}) == len(lines)


def test_answers_batched_equal_one_by_one_and_bad_images_are_counted(tmp_path, model_dir):
    records = json.loads((ROOT / "samples" / "stage2.json").read_text(encoding="utf-8"))
    chosen = [r for r in records if r["id"].startswith(("chest_xray", "head_ct"))][:3]
    assert sum(len(r["conversations"]) // 2 for r in chosen) >= 4  # multi-turn records among them
    for name in ("chest_xray.png", "head_ct.png"):
        (tmp_path / name).write_bytes((IMAGES / name).read_bytes())
    corrupt_image(tmp_path)
    chosen += [dict(chosen[0], id="missing", image="gone.png"), dict(chosen[0], id="corrupt", image="corrupt.png")]
    chosen.append({"id": "mc", "image": "chest_xray.png", "choices": {"A": "X-ray", "B": "CT"}, "answer_label": "A",
                   "conversations": [{"from": "human", "value": "<image>\nModality?\nA: X-ray\nB: CT"},
                                     {"from": "gpt", "value": "X-ray"}]})
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in chosen), encoding="utf-8")
    outputs = []
    for batch_size in (1, 4):
        out = tmp_path / f"answers{batch_size}.jsonl"
        assert evaluate.main(["--data", str(data), "--model", model_dir, "--out", str(out),
                              "--batch-size", str(batch_size), "--max-new-tokens", "8"]) == 0
        outputs.append([json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()])
        metrics = json.loads((tmp_path / f"answers{batch_size}.metrics.json").read_text())
        assert metrics["skipped"] == {"missing_or_corrupt_image": 2 * (len(chosen[0]["conversations"]) // 2)}
        groups = metrics["groups"]["all"]
        assert groups["choice"]["n"] == 1 and groups["closed"]["n"] >= 1 and groups["open"]["n"] >= 1
    assert outputs[0] == outputs[1]


def test_a_long_prompt_does_not_shorten_the_other_answers_in_its_batch(tmp_path):
    """Each answer gets the room its own prompt leaves in the context, whatever it is batched with."""
    tokenizer = chat.Tokenizer(TOKENIZER)
    short, long = "What is it?", "Describe the image in detail, including every finding you can see in it."
    (tmp_path / "chest_xray.png").write_bytes((IMAGES / "chest_xray.png").read_bytes())
    records = [{"id": name, "image": "chest_xray.png",
                "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                  {"from": "gpt", "value": "A chest X-ray."}]}
               for name, q in (("short", short), ("long", long))]
    data = tmp_path / "test.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    prompts = {q: chat.prompt_ids(question(q), tokenizer, "paper") for q in (short, long)}
    model = tiny_model(max_seq_len=len(prompts[long]) - 1 + 64 + 3)  # the long prompt leaves room for 3 tokens
    model.save_pretrained(tmp_path / "model", tokenizer=TOKENIZER)
    assert [chat.room(model, prompts[q], 8)[0] for q in (short, long)] == [8, 3]
    alone = chat.generate_batch(model, [prompts[short]], chat.load_pixels([CHEST], model), 8, tokenizer.eos_id)[0]
    assert len(alone) > 3  # a cut at the long prompt's room would show
    outputs = []
    for batch_size in (1, 2):
        out = tmp_path / f"answers{batch_size}.jsonl"
        assert evaluate.main(["--data", str(data), "--model", str(tmp_path / "model"), "--out", str(out),
                              "--batch-size", str(batch_size), "--max-new-tokens", "8"]) == 0
        outputs.append([json.loads(line)["prediction"] for line in out.read_text(encoding="utf-8").splitlines()])
    assert outputs[0] == outputs[1] and outputs[0][0] == tokenizer.decode(alone)


def test_score_an_answers_file_from_another_system(tmp_path, capsys):
    """Upper-case labels, other fields, no id: scored by the same code, with no model."""
    other = [{"question_id": k, "question": f"q{k}", "reference": r, "prediction": p, "answer_type": t,
              "model": "other-vlm", **({"lang": "zh"} if re.search("[\u4e00-\u9fff]", r) else {"lang": "en"})}
             for k, (r, p, t, _, _) in enumerate(CASES)]
    path = tmp_path / "other.jsonl"
    path.write_text("\n".join(json.dumps(a, ensure_ascii=False) for a in other) + "\n", encoding="utf-8")
    assert evaluate.main(["--score", str(path)]) == 0
    table = capsys.readouterr().out
    metrics = json.loads((tmp_path / "other.metrics.json").read_text(encoding="utf-8"))
    expected = LlavaMedReference().score(other)
    got = metrics["groups"]["all"]
    assert (got["open"]["llava_med_recall"], got["closed"]["llava_med_accuracy"]) == pytest.approx(expected)
    assert list(metrics["groups"]) == ["all", "lang=en", "lang=zh"]
    row = table.splitlines()[2].split()
    assert row[0] == "all" and row[1] == "9" and float(row[2]) == pytest.approx(100 * expected[0], abs=0.05)
    del other[3]["prediction"]
    path.write_text("\n".join(json.dumps(a, ensure_ascii=False) for a in other), encoding="utf-8")
    assert evaluate.main(["--score", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other.jsonl line 4: no 'prediction' field" in err


def records_file(tmp_path, n):
    """n one-question records about real images, for a run long enough to kill."""
    names = sorted(p.name for p in IMAGES.glob("*.png"))
    for name in names:
        (tmp_path / name).write_bytes((IMAGES / name).read_bytes())
    records = [{"id": f"q{k}", "image": names[k % len(names)],
                "conversations": [{"from": "human", "value": f"<image>\nQuestion {k}: what is shown?"},
                                  {"from": "gpt", "value": "yes" if k % 3 == 0 else f"finding {k}"}]} for k in range(n)]
    (tmp_path / "test.jsonl").write_text("\n".join(map(json.dumps, records)), encoding="utf-8")
    return tmp_path / "test.jsonl"


def test_resume_after_a_kill_gives_the_uninterrupted_table(tmp_path, model_dir, capsys):
    """A real run killed with SIGKILL once it has written answers (then a line cut short, as a kill mid-write leaves),
    resumed: every question answered once, the same answers and the same table as a run never killed."""
    n, data = 12, records_file(tmp_path, 12)
    flags = ["--model", model_dir, "--data", data, "--batch-size", "2", "--max-new-tokens", "8"]
    assert evaluate.main([*map(str, flags), "--out", str(tmp_path / "whole.jsonl")]) == 0
    whole = capsys.readouterr().out
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), *map(str, flags), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL
    assert 2 <= out.read_bytes().count(b"\n") < n  # killed mid-run
    with open(out, "ab") as f:
        f.write(b'{"id": "q1')
    refused = run_evaluate(*flags, "--out", out)
    assert refused.returncode == 1 and "exists: --resume continues that run, --overwrite replaces it" in refused.stderr
    resumed = run_evaluate(*flags, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(a["id"] for a in lines) == sorted(f"q{k}:0" for k in range(n))  # none lost, none twice
    table = lambda text: text.splitlines()[:-1]  # the last line names the metrics file
    assert table(resumed.stdout) == table(whole)
    answers = {a["id"]: a for a in map(json.loads, (tmp_path / "whole.jsonl").read_text().splitlines())}
    assert all(answers[a["id"]] == a for a in lines)


def test_overwrite_replaces_and_resume_refuses_another_runs_answers(tmp_path, model_dir, capsys):
    slake = write_slake(tmp_path / "Slake1.0")
    out = tmp_path / "a.jsonl"
    base = ["--model", model_dir, "--benchmark", "slake", "--data", str(slake), "--out", str(out),
            "--max-new-tokens", "4"]
    assert evaluate.main(base + ["--lang", "en"]) == 0
    assert evaluate.main(base + ["--lang", "zh", "--resume"]) == 1  # English answers, Chinese questions
    assert "a.jsonl line 1: id '0' is not a question here" in capsys.readouterr().err
    assert evaluate.main(base + ["--lang", "zh", "--overwrite"]) == 0
    assert [json.loads(line)["lang"] for line in out.read_text(encoding="utf-8").splitlines()] == ["zh"] * 4
    assert evaluate.main(base + ["--lang", "zh", "--resume"]) == 0  # nothing left: scored again
    assert out.read_text(encoding="utf-8").count("\n") == 4


def test_a_stage1_output_is_refused(tmp_path, capsys):
    folder = stage1_output(tmp_path)
    data = records_file(tmp_path, 1)
    assert evaluate.main(["--data", str(data), "--model", folder, "--out", str(tmp_path / "a.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"a stage-2 model. Stage 1's output is for train.py --stage 2 " \
                                      f"--stage1-output {folder}" in err
    assert not (tmp_path / "a.jsonl").exists()  # nothing written, so a rerun is not refused


def record(image, turns=("What is it?", "A chest X-ray.")):
    return {"image": image, "conversations": [{"from": "human" if k % 2 == 0 else "gpt", "value": v}
                                              for k, v in enumerate(turns)]}


@pytest.mark.parametrize("records, expected", [
    ([record("chest_xray.png"), record("head_ct.png")],
     "(skipped: missing_or_corrupt_image 2); image names are relative to"),
    ([{"id": 1}, "a string"], "(skipped: records_malformed 2); a record needs 'conversations' of alternating"),
    ([record([CHEST] * 5)], "(skipped: too_many_images 1); a record takes at most 4 images"),
    ([record(CHEST, ("What is it?",))], "(skipped: none); no question to answer"),
])
def test_a_run_that_answers_nothing_fails_and_says_why(tmp_path, model_dir, capsys, records, expected):
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    assert evaluate.main(["--data", str(tmp_path / "test.jsonl"), "--model", model_dir,
                          "--out", str(tmp_path / "answers.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no answers from" in err and expected in err, err
    assert not (tmp_path / "answers.metrics.json").exists() and not (tmp_path / "answers.jsonl").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--benchmark", "slake", "--split", "val"], "slake has the splits train, validate, test, not 'val'"),
    (["--benchmark", "vqa-rad", "--lang", "zh"], "--lang is for slake"),
    (["--resume", "--overwrite"], "give --resume or --overwrite, not both"),
    (["--closed-prompt", "Answer yes or no."], "must hold {question}"),
    (["--top-p", "0"], "--top-p must be above 0"),
])
def test_bad_flags_are_refused_before_loading(flags, expected, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--data", "test.jsonl", "--model", "nowhere", *flags])
    assert expected in capsys.readouterr().err
