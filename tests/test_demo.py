"""The README's main job, end to end: both demo stages under torchrun, then chat.py answers and evaluate.py scores.

The demo model's vision tower is random and frozen, and every image gets the same question,
"这是什么类型的医学影像？" ("what kind of medical image is this?"). Answering each image with its own
trained answer is only possible if the image features reach the LLM: the image path is wired.
"""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, launch

QUESTION = "这是什么类型的医学影像？"


def trained_answers():
    """image file -> the answer the demo data gives to QUESTION."""
    answers = {}
    for record in json.loads((ROOT / "samples" / "stage2.json").read_text(encoding="utf-8")):
        turns = record["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            if QUESTION in q["value"] and isinstance(record["image"], str):
                answers[record["image"]] = a["value"]
    return answers


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """Stage 1 then stage 2 with the demo's own settings (as the README runs them)."""
    out = tmp_path_factory.mktemp("demo")
    launch("--demo", "--stage", 1, "--output", out / "stage1", timeout=600)
    launch("--demo", "--stage", 2, "--stage1-output", out / "stage1", "--output", out / "stage2", timeout=600)
    return out / "stage2"


def test_each_image_gets_its_own_trained_answer(demo_model):
    answers = trained_answers()
    assert len(answers) == 13 and len(set(answers.values())) == 13  # 13 images, 13 different answers
    wrong = {}
    for image, expected in sorted(answers.items()):
        proc = subprocess.run([sys.executable, "chat.py", f"samples/images/{image}", "--model", str(demo_model),
                               "--question", QUESTION], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        if proc.stdout.strip() != expected:
            wrong[image] = (proc.stdout.strip(), expected)
    assert not wrong, f"answers that differ from the trained ones (got, expected): {wrong}"


def test_batched_evaluation_of_the_demo_data(demo_model, tmp_path):
    out = tmp_path / "answers.jsonl"
    proc = subprocess.run([sys.executable, "evaluate.py", "--data", "samples/stage2.json", "--image-root",
                           "samples/images", "--model", str(demo_model), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "answers.metrics.json").read_text())
    print(proc.stdout)
    assert metrics["answers"] == sum(len(r["conversations"]) // 2
                                     for r in json.loads((ROOT / "samples" / "stage2.json").read_text()))
    groups = metrics["groups"]["all"]
    assert groups["closed"]["strict_accuracy"] >= 0.8 and groups["open"]["recall"] >= 0.8
