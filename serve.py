"""Serve Qilin-Med-VL to a browser and to any OpenAI client: a page at /, OpenAI's chat completions API at /v1.

    python serve.py --model runs/stage2                              http://127.0.0.1:8000: the page and /v1
    python serve.py --model runs/stage2 --host 0.0.0.0 --api-key KEY   on a hospital network

LLaVA's release puts a web demo in front of a model worker; vLLM and llama.cpp's server speak OpenAI's protocol
(https://platform.openai.com/docs/api-reference/chat): POST /v1/chat/completions, streamed as server-sent events
(`data: {chunk}` lines, then `data: [DONE]`), GET /v1/models, GET /health. Each request is read and checked in its own
thread (JSON, images, the prompt rendered by chat.prompt_ids as chat.py renders it); one worker thread owns the model
and decodes all requests waiting at that moment as one left-padded batch (chat.generate), each row's tokens streamed
to its own client as they come.

Extensions (OpenAI clients pass them as `extra_body`): "attention_map": true adds where the answer looked
(attention_map.py) as a PNG data URL; "ignore_eos": true (vLLM's) decodes max_tokens whatever comes, for benchmarks.
"""

import argparse
import base64
import binascii
import contextlib
import hmac
import io
import json
import os
import queue
import re
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

import chat
from attention_map import draw, image_grid
from checkpoint import CheckpointError
from data import MAX_IMAGES, ImageError

PAGE = Path(__file__).resolve().with_name("serve.html")
# what a data URL may carry, and the file suffix data.load_image reads it by (a DICOM file by its DICM magic too)
MEDIA_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/gif": ".gif",
               "image/bmp": ".bmp", "image/tiff": ".tif", "image/webp": ".webp", "application/dicom": ".dcm"}
DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*);base64,(.*)", re.S)


class APIError(Exception):
    """A request refused, in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, code=None, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.reply = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Job:
    """One chat completion on its way through the worker: what to decode, and the queue its events come back on:
    ("token", id), ("end", finish_reason), ("attention", {...}), ("error", APIError)."""

    def __init__(self, prompt, pixels, max_tokens, temperature, top_p, rng, attention, eos):
        self.prompt, self.pixels, self.max_tokens, self.eos = prompt, pixels, max_tokens, eos
        self.temperature, self.top_p, self.rng, self.attention = temperature, top_p, rng, attention
        self.events, self.gone, self.ids, self.done = queue.Queue(), threading.Event(), [], False

    def key(self):
        """Requests decoded together must share their sampling: all greedy ones, or the same temperature and top_p
        (a seeded sampled request runs alone: its tokens must not depend on what it was batched with)."""
        if self.temperature == 0:
            return "greedy", self.eos
        return id(self) if self.rng is not None else (self.temperature, self.top_p, self.eos)

    def finish(self, reason):
        self.done = True
        self.events.put(("end", reason))

    def __iter__(self):  # the events, as the worker sends them, until its None
        while (event := self.events.get()) is not None:
            yield event

    def usage(self):  # OpenAI's token counts; the prompt's include the image's features, as the model reads them
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.ids),
                "total_tokens": self.prompt_tokens + len(self.ids)}


class Worker(threading.Thread):
    """The one thread that runs the model: it takes every waiting request with the first one's sampling (up to
    max_batch), decodes them as one batch, and repeats. Requests beyond max_queue waiting are refused (503)."""

    def __init__(self, model, tokenizer, args):
        super().__init__(daemon=True, name="model-worker")
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.waiting, self.lock = deque(), threading.Condition()
        self.batches = self.requests = self.largest = self.steps = 0

    def submit(self, job):
        with self.lock:
            if len(self.waiting) >= self.args.max_queue:
                raise APIError(503, f"the server is busy: {len(self.waiting)} requests are waiting already "
                               f"(--max-queue); try again shortly", code="server_overloaded", kind="server_error")
            self.waiting.append(job)
            self.lock.notify()

    def take(self):
        with self.lock:
            while not self.waiting:
                self.lock.wait()
            first = self.waiting.popleft()
            batch = [first] + [j for j in self.waiting if j.key() == first.key()][:self.args.max_batch - 1]
            self.waiting = deque(j for j in self.waiting if j not in batch)
            self.batches, self.requests = self.batches + 1, self.requests + len(batch)  # for /health
            self.largest = max(self.largest, len(batch))
            return batch

    def run(self):
        while True:
            batch = self.take()
            try:
                self.decode(batch)
            except Exception as e:  # e.g. out of memory: these requests fail, the server goes on
                error = APIError(500, f"the model failed on this batch: {chat.one_line(e)}", kind="server_error")
                for job in batch:
                    job.events.put(("error", error))
            else:
                for job in batch:
                    if job.attention and not job.gone.is_set():
                        job.events.put(("attention", self.attention(job)))
            for job in batch:
                job.events.put(None)  # nothing more comes for this job

    @torch.inference_mode()  # so that a row's token can be overwritten in place
    def decode(self, batch):
        """One left-padded batch; a row ends at its EOS, at its own max_tokens, or when its client has gone: then
        eos is written into its token, which chat.generate reads as that row's end (all rows ended: it stops)."""
        first, eos = batch[0], batch[0].eos  # eos None: "ignore_eos", every row runs to its max_tokens
        pixels = [j.pixels for j in batch if j.pixels is not None]
        steps = chat.generate(self.model, [j.prompt for j in batch], torch.cat(pixels) if pixels else None,
                              max(j.max_tokens for j in batch), first.temperature, first.top_p, eos,
                              first.rng or self.args.rng, self.args.compile)
        for token in steps:
            self.steps += 1
            for row, (job, t) in enumerate(zip(batch, token.tolist())):  # one wait for the device per step
                if job.done:
                    continue
                if job.gone.is_set():  # its client disconnected: free the row
                    job.done = True
                elif t == eos:
                    job.finish("stop")
                else:
                    job.ids.append(t)
                    job.events.put(("token", t))
                    if len(job.ids) == job.max_tokens:
                        job.finish("length")
                if job.done and eos is not None:
                    token[row] = eos
        for job in batch:
            if not job.done:
                job.finish("length")

    def attention(self, job):
        """Where the answer looked, for the page; a map that fails says why and leaves the answer as it was."""
        try:  # a dialog without an image has none: image_grid says so
            grid, png = image_grid(self.model, job.prompt, job.ids, job.pixels), io.BytesIO()
            draw(job.pixels[0], grid).save(png, format="PNG")
        except Exception as e:  # e.g. out of memory for the second forward
            return {"error": f"no attention map: {chat.one_line(e)}"}
        return {"image": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode(),
                "image_share": round(float(grid.sum()), 4), "grid": grid.tolist()}


# ----------------------------------------------------------------------------- reading a request

def number(body, name, low, high, default, kind=(int, float)):
    if (value := body.get(name)) is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        raise APIError(400, f"'{name}' must be a {'whole ' if kind is int else ''}number from {low} to {high}, "
                       f"not {json.dumps(value)[:40]}", param=name)
    return value


def image_bytes(part, k, args):
    """An image_url content part -> (media type, bytes), refusing all but a base64 data URL of bounded size."""
    url = part.get("image_url")
    url = str(url.get("url") if isinstance(url, dict) else url)
    if re.match(r"(?i)https?://", url):
        raise APIError(400, f"image {k}: image URLs are not fetched (this server reaches out to no one); send the "
                       f"image itself, as a base64 data URL (data:image/png;base64,...)", code="image_url_not_fetched")
    m = DATA_URL.fullmatch(url.strip())
    if not m:
        raise APIError(400, f"image {k}: not a base64 data URL (data:image/png;base64,...): {url[:40]!r}")
    media = (m.group(1) or "").lower()
    if media not in MEDIA_TYPES:
        raise APIError(400, f"image {k}: {media or 'no media type'} is not an image this server reads "
                       f"({', '.join(sorted(set(MEDIA_TYPES)))})")
    if len(m.group(3)) > args.max_image_bytes * 4 // 3 + 4:
        raise APIError(413, f"image {k}: over the limit of {args.max_image_bytes} bytes (--max-image-bytes)")
    try:
        return media, base64.b64decode(re.sub(r"\s", "", m.group(3)), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"image {k}: the data URL's base64 is broken") from None


def dialog(messages, args):
    """OpenAI messages -> our turns ({"from": "human" | "gpt", "value": text}) and the images' (media, bytes)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    turns, images = [], []
    for k, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        expected = "user" if k % 2 == 0 else "assistant"
        if role == "system":
            raise APIError(400, "system messages are not supported: the model answers in the dialog template it was "
                           "trained with, whose system prompt is fixed", param=f"messages[{k}]")
        if role != expected:
            raise APIError(400, f"messages[{k}]: expected the {expected}'s turn (user and assistant alternate, user "
                           f"first and last), got role {role!r}", param=f"messages[{k}]")
        content, texts = message.get("content"), []
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content or [None]:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and role == "user":
                images.append(image_bytes(part, len(images) + 1, args))
                if len(images) > MAX_IMAGES:
                    raise APIError(400, f"more than {MAX_IMAGES} images in one dialog; up to {MAX_IMAGES} are "
                                   f"concatenated into one, as in training", param=f"messages[{k}]")
            else:
                raise APIError(400, f"messages[{k}]: a content part must be {{'type': 'text', 'text': ...}}"
                               f"{' or an image_url' if role == 'user' else ''}, not {json.dumps(part)[:60]}",
                               param=f"messages[{k}]")
        turns.append({"from": "human" if role == "user" else "gpt", "value": "\n".join(texts).strip()})
    if len(turns) % 2 == 0:
        raise APIError(400, "the last message must be the user's", param="messages")
    return turns, images


def load_images(images, model, args):
    """The images written to a temporary folder and read as chat.py reads files: (1, 3, S, S), or None."""
    if not images:
        return None
    with tempfile.TemporaryDirectory(prefix="qilin-serve-") as folder:
        paths = [os.path.join(folder, f"image{k}{MEDIA_TYPES[media]}") for k, (media, _) in enumerate(images, 1)]
        for path, (_, data) in zip(paths, images):
            Path(path).write_bytes(data)
        try:
            return chat.load_pixels(paths, model, args.max_image_pixels)
        except ImageError as e:  # "image2.png: ...": named by its place in the request, not by our temporary folder
            raise APIError(400, str(e).replace(folder + os.sep, "")) from None


def make_job(body, model, tokenizer, args):
    """A checked request -> a Job; every fault a 4xx APIError that says what to change."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if body.get("model") not in (None, args.served_model_name):
        raise APIError(404, f"the model {body['model']!r} does not exist; this server has {args.served_model_name!r}",
                       code="model_not_found", param="model")
    if body.get("n", 1) != 1 or body.get("stop") not in (None, [], "") or body.get("tools") or body.get("logprobs"):
        raise APIError(400, "n other than 1, stop, tools and logprobs are not supported")
    temperature = number(body, "temperature", 0, 2, args.temperature)
    top_p = number(body, "top_p", 1e-6, 1, args.top_p)  # above 0: top-p keeps at least one token anyway
    asked = number(body, "max_completion_tokens", 1, 10**6, number(body, "max_tokens", 1, 10**6, None, int), int)
    seed = number(body, "seed", -2**63, 2**64 - 1, None, int)
    turns, images = dialog(body.get("messages"), args)
    pixels = load_images(images, model, args)
    prompt = chat.prompt_ids(turns, tokenizer, model.config.style, pixels is not None)
    budget, length = chat.room(model, prompt, asked or args.max_new_tokens or 512)
    if budget == 0 or (asked and budget < asked):
        raise APIError(400, f"this model's context is {model.config.llm.max_seq_len} tokens; the dialog is {length} "
                       f"with the image's features{f', and {asked} more were asked for' if asked else ''}",
                       code="context_length_exceeded", param="messages")
    rng = torch.Generator(args.device).manual_seed(seed % 2**64) if seed is not None and temperature > 0 else None
    eos = None if body.get("ignore_eos") else tokenizer.eos_id  # as vLLM's extension: fixed-length answers (benchmarks)
    job = Job(prompt, pixels, budget, temperature, top_p, rng, bool(body.get("attention_map")), eos)
    job.prompt_tokens, job.stream = length, bool(body.get("stream"))
    job.usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage"))
    return job


# ----------------------------------------------------------------------------- the HTTP side

class Handler(BaseHTTPRequestHandler):
    """One thread per connection (ThreadingHTTPServer): read and check, hand the job to the worker, write back."""
    protocol_version, server_version = "HTTP/1.1", "qilin-med-vl"
    timeout = 120  # seconds a client may take to send its request: a stalled one does not hold its thread forever

    def do_GET(self):
        path, s = self.path.split("?")[0], self.server
        if path in ("/", "/index.html"):
            self.send(200, s.page, "text/html; charset=utf-8")
        elif path == "/health":  # 200 once the model is loaded: the server listens only then
            self.send_json(200, {"status": "ok", **{k: getattr(s.worker, k) for k in ("batches", "requests", "steps")},
                                 "largest_batch": s.worker.largest, "waiting": len(s.worker.waiting)})
        elif path == "/v1/models" and self.authorized():
            self.send_json(200, {"object": "list", "data": [{"id": s.args.served_model_name, "object": "model",
                                                              "created": s.started, "owned_by": "qilin-med-vl"}]})
        elif path != "/v1/models":
            self.send_json(*APIError(404, f"no such page: {path}", code="not_found").reply)

    def do_POST(self):
        if self.path.split("?")[0] != "/v1/chat/completions":
            return self.send_json(*APIError(404, f"no such endpoint: POST {self.path}", code="not_found").reply)
        if not self.authorized():
            return
        s = self.server
        try:
            body = self.read_json(s.args.max_request_bytes)
            job = make_job(body, s.model, s.tokenizer, s.args)
            s.worker.submit(job)
        except APIError as e:
            return self.send_json(*e.reply)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": s.args.served_model_name}
        self.stream(job, head) if job.stream else self.answer(job, head)

    def read_json(self, limit):
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > limit:
            self.close_connection = True  # after reading (and dropping) up to 16 MiB more, as nginx's lingering close:
            left = min(int(length), limit + 2**24) if length.isdigit() else 0  # a client still sending gets our 413
            while left > 0 and (chunk := self.rfile.read(min(left, 2**16))):
                left -= len(chunk)
            raise (APIError(411, "a request body needs its Content-Length") if not length.isdigit() else
                   APIError(413, f"the request is {length} bytes, over the limit of {limit} (--max-request-bytes)"))
        try:
            return json.loads(self.rfile.read(int(length)).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def answer(self, job, head):
        """Non-streamed: the whole answer in one chat.completion object."""
        stream, reason, extra = chat.TextStream(self.server.tokenizer), None, {}
        for kind, value in job:
            if kind == "error":
                return self.send_json(*value.reply)
            if kind == "token":
                stream.push(value)
            elif kind == "end":
                reason = value
            elif kind == "attention":
                extra["attention_map"] = value
        choice = {"index": 0, "message": {"role": "assistant", "content": stream.text}, "logprobs": None,
                  "finish_reason": reason}
        self.send_json(200, {**head, "object": "chat.completion", "choices": [choice], "usage": job.usage(), **extra})

    def stream(self, job, head):
        """Streamed: server-sent events, one chat.completion.chunk per piece of text, then [DONE]. A client that has
        gone is noticed at the next write: its row is freed at the worker's next token."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Connection", "close")  # the stream ends when the connection does (no Content-Length)
        self.end_headers()
        self.close_connection = True
        text, extra = chat.TextStream(self.server.tokenizer), {"usage": None} if job.usage_in_stream else {}

        def chunk(delta=None, reason=None, **fields):
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
            self.event({**head, "object": "chat.completion.chunk", "choices": choices, **extra, **fields})

        try:
            chunk({"role": "assistant", "content": ""})
            for kind, value in job:
                if kind == "token" and (piece := text.push(value)):
                    chunk({"content": piece})
                elif kind == "end":
                    chunk({}, value)
                elif kind == "attention":
                    chunk(attention_map=value)
                elif kind == "error":
                    self.event(value.reply[1])  # as vLLM: an error in the stream, in OpenAI's shape
            if job.usage_in_stream:
                chunk(usage=job.usage())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            job.gone.set()
            for _ in job:  # let the worker finish with it
                pass

    def authorized(self):
        """With --api-key: `Authorization: Bearer KEY` on /v1, compared in constant time; else a 401."""
        key = self.server.args.api_key
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if key is None or (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())):
            return True
        self.send_json(*APIError(401, "a valid API key is needed: send the header Authorization: Bearer KEY",
                                 code="invalid_api_key").reply)
        return False

    def event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    def send_json(self, status, obj):
        self.send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json")

    def send(self, status, data, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Serve Qilin-Med-VL: a web page at / and OpenAI's chat API at /v1.")
    chat.add_model_flags(p)
    chat.add_sampling_flags(p, "in serve.py's answers unless a request sets its own")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (any but 127.0.0.1 needs --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("QILIN_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $QILIN_API_KEY)")
    p.add_argument("--served-model-name", default="qilin-med-vl", help="the model's name in the API")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together, at most")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting, at most; more get 503")
    p.add_argument("--max-request-bytes", type=int, default=64 * 2**20, help="largest request body (default 64 MiB)")
    p.add_argument("--max-image-bytes", type=int, default=20 * 2**20, help="largest image file (default 20 MiB)")
    args = p.parse_args(argv)
    return chat.check_args(p, args, greedy=True, checks=(
        (args.host not in ("127.0.0.1", "localhost") and not args.api_key,
         f"--host {args.host} opens the server to the network: give --api-key KEY too"),
        (not 0 <= args.port < 65536, f"--port must be 0 to 65535, not {args.port}"),
        (min(args.max_batch, args.max_queue, args.max_request_bytes, args.max_image_bytes) < 1,
         "--max-batch, --max-queue and the byte limits must be at least 1")))


def main(argv=None):
    args = parse_args(argv)
    try:
        model, tokenizer = chat.load_from_args(args)
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except (CheckpointError, ValueError, OSError) as e:  # bad folder, port in use: one line, no traceback
        print(f"error: {chat.one_line(e)}", file=sys.stderr)
        return 1
    server.model, server.tokenizer, server.args, server.page = model, tokenizer, args, PAGE.read_bytes()
    server.started, server.worker = int(time.time()), Worker(model, tokenizer, args)
    server.worker.start()
    host, port = server.server_address[:2]
    print(f"Qilin-Med-VL from {args.model}: the page at http://{host}:{port}/, OpenAI's API at "
          f"http://{host}:{port}/v1 (model {args.served_model_name!r}). Ctrl-C stops.", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: a quiet stop
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
