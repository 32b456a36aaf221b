"""serve.py against the official `openai` client and a real browser: a live server on 127.0.0.1 with a tiny random
model, answers equal to chat.py's (greedy, token for token), batching under concurrent clients, every bad input a
4xx in OpenAI's error shape with the server still serving, the API key, and the page in headless Chromium."""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from PIL import Image

import attention_map
import chat
from conftest import ROOT, free_port
from test_chat import TOKENIZER, tiny_model

IMAGES = ROOT / "samples" / "images"
CHEST, HEAD, BONE, KNEE = (IMAGES / n for n in ("chest_xray.png", "head_ct.png", "bone_scan.png", "tibia_xray.png"))
QUESTION = "这是什么类型的医学影像？"
KEY = "s3cret-key"
ANSWER = 24  # the server's answer length for requests that set no max_tokens (the page's)


def data_url(path, media="image/png"):
    return f"data:{media};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def user(text, *images):
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_url(p)}} for p in images),
                                        {"type": "text", "text": text}]}


def start(model_dir, log, *flags):
    """serve.py as a user starts it; returns (process, base URL) once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir), "--port", str(port),
                             *map(str, flags)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return proc, base
        except OSError:
            assert proc.poll() is None, Path(log.name).read_text()
            time.sleep(0.1)
    raise AssertionError("the server did not start")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model().save_pretrained(folder, tokenizer=TOKENIZER)
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir):
    return chat.load_model(str(model_dir))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w")
    proc, base = start(model_dir, log, "--max-batch", 8, "--max-request-bytes", 3 * 2**20, "--max-image-pixels",
                       4_000_000, "--max-new-tokens", ANSWER)
    yield base
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def health(base):
    return json.loads(urllib.request.urlopen(base + "/health").read())


def expected(loaded, turns, images, n):
    """What chat.py's own functions answer, in this process: the greedy ids as text."""
    model, tokenizer = loaded
    pixels = chat.load_pixels([str(p) for p in images], model) if images else None
    prompt = chat.prompt_ids(turns, tokenizer, model.config.style, pixels is not None)
    stream = chat.TextStream(tokenizer)  # as chat.py prints it: a trailing half character is held back
    for token in chat.generate_batch(model, [prompt], pixels, n, tokenizer.eos_id)[0]:
        stream.push(token)
    return stream.text


def test_streamed_and_plain_answers_equal_chat_py(client, model_dir):
    proc = subprocess.run([sys.executable, "chat.py", str(CHEST), "--model", str(model_dir), "--question", QUESTION,
                           "--max-new-tokens", "24"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert proc.returncode == 0, proc.stderr
    want = proc.stdout[:-1]  # chat.py ends the answer with a newline
    messages = [user(QUESTION, CHEST)]
    plain = client.chat.completions.create(model="qilin-med-vl", messages=messages, temperature=0, max_tokens=24)
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == want and len(set(want)) > 5
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 24
    assert plain.usage.prompt_tokens > 64 and plain.usage.total_tokens == plain.usage.prompt_tokens + 24  # 64 features
    chunks = list(client.chat.completions.create(model="qilin-med-vl", messages=messages, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == want and len([p for p in pieces if p]) > 5  # it came in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_multi_turn_dialog_with_two_images_is_rendered_as_chat_py_renders_it(client, loaded):
    first = expected(loaded, [{"from": "human", "value": "What is it?"}], [HEAD, BONE], 12)
    messages = [user("What is it?", HEAD, BONE), {"role": "assistant", "content": first},
                {"role": "user", "content": "Is it normal?"}]
    turns = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": first},
             {"from": "human", "value": "Is it normal?"}]
    reply = client.chat.completions.create(model="qilin-med-vl", messages=messages, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == expected(loaded, turns, [HEAD, BONE], 12)


def test_the_attention_map_extension_is_the_map_attention_map_py_draws(client, loaded):
    model, tokenizer = loaded
    reply = client.chat.completions.create(model="qilin-med-vl", messages=[user(QUESTION, CHEST)], temperature=0,
                                           max_tokens=8, extra_body={"attention_map": True}).model_dump()
    pixels = chat.load_pixels([str(CHEST)], model)
    prompt = chat.prompt_ids([{"from": "human", "value": QUESTION}], tokenizer, model.config.style)
    answer = chat.generate_batch(model, [prompt], pixels, 8, tokenizer.eos_id)[0]
    grid = attention_map.image_grid(model, prompt, answer, pixels)
    got = reply["attention_map"]
    torch.testing.assert_close(torch.tensor(got["grid"]), grid, atol=1e-6, rtol=0)
    assert abs(got["image_share"] - float(grid.sum())) < 1e-4 and got["image"].startswith("data:image/png;base64,")
    text_only = client.chat.completions.create(model="qilin-med-vl", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2, extra_body={"attention_map": True}).model_dump()
    assert "no attention map" in text_only["attention_map"]["error"] and text_only["usage"]["completion_tokens"] == 2


def test_eight_concurrent_clients_are_answered_in_fewer_batches(client, server, loaded):
    jobs = [(q, image) for q in ("What is it?", QUESTION) for image in (CHEST, HEAD, BONE, KNEE)]
    answers, before = {}, health(server)["batches"]

    def ask(k, q, image):
        answers[k] = client.chat.completions.create(model="qilin-med-vl", messages=[user(q, image)], temperature=0,
                                                    max_tokens=24).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(k, *job)) for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    batches = health(server)["batches"] - before
    assert [answers.get(k) for k in range(8)] == [expected(loaded, [{"from": "human", "value": q}], [i], 24)
                                                  for q, i in jobs]
    assert 1 <= batches < 8, f"{batches} batches for 8 requests"


def raw(base, body, headers=None, path="/v1/chat/completions"):
    """(status, parsed JSON) of a POST, whatever its status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json",
                                                                      **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat_body(*content, **fields):
    return {"model": "qilin-med-vl", "max_tokens": 2, "messages": [{"role": "user", "content": list(content)}],
            **fields}


IMAGE = {"type": "image_url", "image_url": {"url": data_url(CHEST)}}
TEXT = {"type": "text", "text": "What is it?"}


def big_png(tmp):
    Image.new("L", (2100, 2100)).save(tmp / "big.png")  # 4.4 megapixels, a few kilobytes
    return {"type": "image_url", "image_url": {"url": data_url(tmp / "big.png")}}


BAD = {  # name: (body, status, words of the message)
    "bad JSON": (b'{"messages": [', 400, "not valid JSON"),
    "not an object": ([1, 2], 400, "JSON object"),
    "wrong content part": (chat_body({"type": "input_audio", "input_audio": {}}, TEXT), 400, "content part"),
    "broken data URL": (chat_body({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVB*ORw"}}, TEXT),
                        400, "base64 is broken"),
    "not a data URL": (chat_body({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, TEXT), 400,
                       "not a base64 data URL"),
    "non-image data URL": (chat_body({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}, TEXT),
                           400, "text/plain is not an image"),
    "image bytes that are no image": (chat_body({"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"no image here" * 9).decode()}}, TEXT), 400,
        "image1.png: not an image file"),
    "five images": (chat_body(*[IMAGE] * 5, TEXT), 400, "more than 4 images"),
    "an http image URL": (chat_body({"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}, TEXT),
                          400, "image URLs are not fetched"),
    "a prompt over the context": (chat_body(IMAGE, {"type": "text", "text": "肺 " * 2100}), 400, "context is 2048"),
    "max_tokens beyond the context": (chat_body(IMAGE, TEXT, max_tokens=2000), 400, "2000 more were asked for"),
    "a system message": ({"messages": [{"role": "system", "content": "Be brief."}, user("hi")]}, 400,
                         "system messages are not supported"),
    "turns out of order": ({"messages": [user("hi"), user("hi")]}, 400, "expected the assistant's turn"),
    "temperature out of range": (chat_body(TEXT, temperature=5), 400, "'temperature' must be"),
    "an unknown model": (dict(chat_body(TEXT), model="gpt-4o"), 404, "does not exist"),
    "a body over the limit": (json.dumps(chat_body(TEXT, pad="x" * (3 * 2**20))).encode(), 413, "over the limit"),
    "too many pixels": ("big", 400, "over the limit of 4000000"),
}


@pytest.mark.parametrize("case", BAD)
def test_each_bad_input_is_a_4xx_with_its_reason_and_the_server_goes_on(server, client, case, tmp_path):
    body, status, words = BAD[case]
    if body == "big":
        body = chat_body(big_png(tmp_path), TEXT)
    got, reply = raw(server, body)
    assert got == status and words in reply["error"]["message"], reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    ok = client.chat.completions.create(model="qilin-med-vl", messages=[user("hi", CHEST)], max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_the_openai_client_reports_a_refusal_as_its_error(client):
    with pytest.raises(openai.BadRequestError, match="image URLs are not fetched"):
        client.chat.completions.create(model="qilin-med-vl", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.org/scan.png"}}, TEXT]}])


def test_a_dicom_data_url_is_answered_as_chat_py_answers_the_file(client, model_dir):
    from pydicom.data import get_testdata_file
    dcm = get_testdata_file("MR_small.dcm")
    proc = subprocess.run([sys.executable, "chat.py", dcm, "--model", str(model_dir), "--question", QUESTION,
                           "--max-new-tokens", "10"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    reply = client.chat.completions.create(model="qilin-med-vl", temperature=0, max_tokens=10, messages=[{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(dcm, "application/dicom")}},
                                    {"type": "text", "text": QUESTION}]}])
    assert reply.choices[0].message.content == proc.stdout[:-1]


def test_a_model_quantized_while_it_loads_is_served_as_chat_py_answers(model_dir, tmp_path):
    """--quantize reaches serve.py through chat.load_from_args: the int8 model's answer, not the float one's."""
    turns = [{"from": "human", "value": QUESTION}]
    want, full = (expected(chat.load_model(str(model_dir), quantize=q), turns, [CHEST], 12) for q in ("int8", None))
    proc, base = start(model_dir, open(tmp_path / "serve.log", "w"), "--quantize", "int8")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="qilin-med-vl", messages=[user(QUESTION, CHEST)], temperature=0,
                                               max_tokens=12)
        assert reply.choices[0].message.content == want
        assert want != full  # the random model's logits are sensitive enough that int8 changes its answer
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_client_that_disconnects_frees_its_row(server, client):
    before = health(server)["steps"]
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps(dict(chat_body(IMAGE, TEXT), max_tokens=1500, stream=True)).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the stream has begun
    # the client is gone: its row ends at the worker's next token or so, and the next request is served
    ok = client.chat.completions.create(model="qilin-med-vl", messages=[user("hi", CHEST)], max_tokens=2)
    assert ok.usage.completion_tokens == 2
    assert health(server)["steps"] - before < 200  # not the 1,500 it asked for


def test_api_key_and_host(model_dir, tmp_path):
    refused = subprocess.run([sys.executable, "serve.py", "--model", str(model_dir), "--host", "0.0.0.0"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "give --api-key" in refused.stderr
    with open(tmp_path / "serve.log", "w") as log:
        proc, base = start(model_dir, log, "--api-key", KEY, "--max-batch", 1, "--max-queue", 1)
        try:
            for key in ("wrong", KEY[:-1], ""):
                with pytest.raises(openai.AuthenticationError, match="valid API key"):
                    openai.OpenAI(base_url=base + "/v1", api_key=key or "x", max_retries=0).models.list()
            assert raw(base, chat_body(TEXT), {"Authorization": "Bearer wrong"})[0] == 401
            assert raw(base, chat_body(TEXT), {})[0] == 401
            good = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
            assert [m.id for m in good.models.list()] == ["qilin-med-vl"]
            statuses = []  # one decoding, one waiting: the rest beyond --max-queue 1 get 503

            def ask():
                statuses.append(raw(base, dict(chat_body(IMAGE, TEXT), max_tokens=100),
                                    {"Authorization": f"Bearer {KEY}"})[0])

            threads = [threading.Thread(target=ask) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert statuses.count(200) >= 2 and statuses.count(503) >= 1 and set(statuses) <= {200, 503}
            assert health(base)["status"] == "ok"
        finally:
            proc.terminate()
            proc.wait(10)


# ----------------------------------------------------------------------------- the page in a real browser

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def test_the_page_streams_chat_py_answer_and_shows_the_heat_map(browser, server, loaded, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(server + "/")
    assert "Qilin-Med-VL" in browser.title and "医学影像问答" in browser.find_element(By.TAG_NAME, "h1").text
    browser.find_element(By.ID, "files").send_keys(str(CHEST))
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#thumbs img"))
    want = expected(loaded, [{"from": "human", "value": QUESTION}], [CHEST], ANSWER)
    seen = set()  # the answer's text as it grows: streamed, not all at once

    def ask_and_wait(question):
        browser.find_element(By.ID, "question").send_keys(question)
        browser.find_element(By.ID, "ask").click()

        def answered(b):
            answers = b.find_elements(By.CSS_SELECTOR, ".answer .bubble")
            seen.add(answers[-1].get_property("textContent") if answers else "")
            return len(b.find_elements(By.CSS_SELECTOR, ".answer .heatmap img")) == len(answers) > 0 and answers
        return WebDriverWait(browser, 60, poll_frequency=0.05).until(answered)

    answers = ask_and_wait(QUESTION)
    assert answers[-1].get_property("textContent") == want and len(seen - {"", want}) >= 1
    heat = browser.find_element(By.CSS_SELECTOR, ".answer .heatmap img")
    assert heat.get_attribute("src").startswith("data:image/png;base64,") and heat.size["width"] > 100
    assert "of its attention on the image" in browser.find_element(By.CSS_SELECTOR, ".heatmap").text
    # the dialog goes on: the second answer is chat.py's for the two-turn dialog
    second = ask_and_wait("Is it normal?")
    turns = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": want}, {"from": "human",
                                                                                     "value": "Is it normal?"}]
    assert len(second) == 2 and second[-1].get_property("textContent") == expected(loaded, turns, [CHEST], ANSWER)
    browser.save_screenshot(str(tmp_path / "page.png"))
    print(f"screenshot: {tmp_path / 'page.png'}")
    # a DICOM file: a new dialog, answered as chat.py answers the file
    from pydicom.data import get_testdata_file
    dcm = get_testdata_file("MR_small.dcm")
    browser.find_element(By.CSS_SELECTOR, "#thumbs button").click()  # drop the X-ray: a new dialog
    browser.find_element(By.ID, "files").send_keys(dcm)
    WebDriverWait(browser, 10).until(lambda b: "DICOM MR_small.dcm" in b.find_element(By.ID, "thumbs").text)
    assert browser.find_elements(By.CSS_SELECTOR, ".turn") == []
    answers = ask_and_wait(QUESTION)
    assert answers[-1].get_property("textContent") == expected(loaded, [{"from": "human", "value": QUESTION}], [dcm],
                                                               ANSWER)
    # five images: the page says why, and asks nothing
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in (HEAD, BONE, KNEE, CHEST, HEAD)))
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "error").is_displayed())
    assert "At most 4 images" in browser.find_element(By.ID, "error").text
    assert browser.find_elements(By.CSS_SELECTOR, ".turn") == []  # other images: a new dialog
    # an error from the server is shown, not swallowed: a question over the context
    browser.execute_script("document.getElementById('question').value = arguments[0]", "肺 " * 2100)  # typed: slow
    browser.find_element(By.ID, "ask").click()
    WebDriverWait(browser, 20).until(lambda b: "context is 2048" in b.find_element(By.ID, "error").text)
    browser.find_element(By.ID, "new").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".turn") == []
