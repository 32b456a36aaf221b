"""attention_map.py: its weights are softmax(q k^T / sqrt(d)) recomputed here, explicitly and in float64, from the
queries and keys the model's own projections produce, and they are the weights the model's attention used; the grid
cells add up to the image's share of attention; rows and columns are the image's (a transposed grid fails); the
drawing puts a cell where its patch is; chat.py --attention writes the map. Tiny random models, real images."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import attention_map
import chat
from data import Tokenizer
from llama import LlamaArgs
from model import QilinConfig, QilinMedVL
from test_chat import CHEST, ROOT, TOKENIZER, tiny_model
from vit import VisionArgs


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(TOKENIZER)


def gqa_model():
    torch.manual_seed(1)
    llm = dataclasses.replace(LlamaArgs.preset("demo"), vocab_size=32000, n_kv_heads=2)
    model = QilinMedVL(QilinConfig(projector="linear", vision=VisionArgs.preset("demo"), llm=llm))
    for p in model.llm.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def dialog(model, tokenizer):
    pixels = chat.load_pixels([CHEST], model)
    prompt = chat.prompt_ids([{"from": "human", "value": "这是什么类型的医学影像？"}], tokenizer, "paper")
    answer = chat.generate_batch(model, [prompt], pixels, 12, tokenizer.eos_id)[0]
    return prompt, answer, pixels


def explicit_weights(model, prompt, answer, pixels):
    """Per layer and head, float64: softmax(q k^T / sqrt(d)) over the visible positions, q and k from the model's
    q_proj and k_proj outputs rotated here by RoPE written out (pairs i, i + d/2, angle p * theta^(-2i/d)); and the
    attention output the model itself computed (o_proj's input), to check those weights against."""
    captured, hooks = {}, []
    for n, layer in enumerate(model.llm.layers):
        a = layer.self_attn
        hooks += [a.q_proj.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(("q", n), o.double())),
                  a.k_proj.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(("k", n), o.double())),
                  a.v_proj.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(("v", n), o.double())),
                  a.o_proj.register_forward_pre_hook(lambda m, i, n=n: captured.__setitem__(("y", n), i[0].double()))]
    ids = torch.tensor([chat.expand_images(prompt + answer, model.num_image_tokens)])
    with torch.no_grad():
        model(ids, pixels)
    for h in hooks:
        h.remove()
    args, T = model.config.llm, ids.shape[1]
    d = args.head_dim
    angle = torch.arange(T, dtype=torch.float64)[:, None] * args.rope_theta ** (-torch.arange(0, d, 2).double() / d)

    def rope(x):  # (T, heads * d) -> (heads, T, d)
        x = x[0].view(T, -1, d).transpose(0, 1)
        x1, x2 = x[..., :d // 2], x[..., d // 2:]
        return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)

    weights, outputs = [], []
    for n in range(args.n_layers):
        q, k = rope(captured["q", n]), rope(captured["k", n])
        v = captured["v", n][0].view(T, -1, d).transpose(0, 1)
        group = args.n_heads // args.n_kv_heads
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # (H, T, d)
        scores = q @ k.transpose(1, 2) / d ** 0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        w = scores.softmax(-1)  # (H, T, T)
        weights.append(w)
        outputs.append(((w @ v).transpose(0, 1).reshape(T, -1), captured["y", n][0]))
    return torch.stack(weights), outputs, ids[0]


@pytest.mark.parametrize("make", [tiny_model, gqa_model], ids=["heads", "grouped-query"])
def test_weights_are_the_softmax_of_the_models_own_queries_and_keys(make, tokenizer):
    model = make()
    prompt, answer, pixels = dialog(model, tokenizer)
    ours, ids = attention_map.answer_attention(model, prompt, answer, pixels)  # (layers, R, T)
    explicit, outputs, _ = explicit_weights(model, prompt, answer, pixels)  # (layers, H, T, T)
    for mine, model_output in outputs:  # these weights are the ones the model's attention applied
        torch.testing.assert_close(mine, model_output, atol=1e-4, rtol=1e-4)
    start = len(ids) - len(answer) - 1  # the rows that produced the answer's tokens
    want = explicit[:, :, start:start + len(answer)].mean(1)  # averaged over heads
    assert ours.dtype == torch.float32 and ours.shape == want.shape
    torch.testing.assert_close(ours.double(), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.sum(-1), torch.ones(ours.shape[:2]), atol=1e-5, rtol=0)  # rows sum to 1


def grid_from(weights, ids, model, order="rows"):
    """The expected grid: cell (r, c) is image position start + r * g + c (the ViT's patch order), or, planted
    wrong, start + c * g + r."""
    g = model.config.vision.image_size // model.config.vision.patch_size
    start = int((ids == model.config.image_token_index).nonzero()[0])
    mean = weights.mean((0, 1))  # (T,)
    return torch.tensor([[float(mean[start + (r * g + c if order == "rows" else c * g + r)]) for c in range(g)]
                         for r in range(g)])


@pytest.mark.parametrize("order", ["rows", "planted: columns first"])
def test_grid_cells_are_the_image_patches_and_add_up_to_the_image_share(tokenizer, order):
    model = tiny_model()
    prompt, answer, pixels = dialog(model, tokenizer)
    weights, ids = attention_map.answer_attention(model, prompt, answer, pixels)
    grid = attention_map.image_grid(model, prompt, answer, pixels)
    image = ids == model.config.image_token_index
    share = weights[:, :, image].sum(-1).mean()  # what went to the image's 64 positions, the rest to the text
    assert grid.shape == (8, 8) and 0.05 < float(share) < 0.95
    torch.testing.assert_close(grid.sum(), share, atol=1e-5, rtol=0)
    torch.testing.assert_close(1 - grid.sum(), weights[:, :, ~image].sum(-1).mean(), atol=1e-5, rtol=0)
    expected = grid_from(weights, ids, model, "rows" if order == "rows" else "columns")
    assert (grid - grid.T).abs().max() > 1e-3  # not symmetric, so the order matters
    if order == "rows":
        torch.testing.assert_close(grid, expected, atol=1e-6, rtol=0)
    else:  # a map with rows and columns swapped is caught by the comparison above
        assert not torch.allclose(grid, expected, atol=1e-6, rtol=0)


def test_the_vits_patch_order_is_row_major():
    """Patch token r * g + c holds the pixels of row r, column c: change only that patch and only it changes."""
    model = tiny_model()
    pixels = chat.load_pixels([CHEST], model)
    p, r, c = model.config.vision.patch_size, 1, 5
    changed = pixels.clone()
    changed[..., r * p:(r + 1) * p, c * p:(c + 1) * p] += 1.0
    embed = model.vision.embeddings.patch_embedding
    with torch.no_grad():
        diff = (embed(changed) - embed(pixels)).flatten(2).abs().sum(1)[0]  # (g * g,)
    assert diff.nonzero().squeeze(1).tolist() == [r * 8 + c]


def test_the_drawing_puts_each_cell_over_its_patch():
    model = tiny_model()
    pixels = chat.load_pixels([CHEST], model)[0]
    grid = torch.zeros(8, 8)
    grid[1, 5] = 0.3  # row 1, column 5
    out = np.asarray(attention_map.draw(pixels, grid, size=336)).astype(int)  # (336 + 18, 336, 3)
    redness = out[:336, :, 0] - out[:336, :, 2]
    y, x = np.unravel_index(redness.argmax(), redness.shape)
    assert (y // 42, x // 42) == (1, 5)  # 336 / 8 = 42 pixels a cell; a transposed drawing would give (5, 1)


def test_chat_py_writes_the_map(tmp_path):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder, tokenizer=TOKENIZER)
    out = tmp_path / "map.png"
    proc = subprocess.run([sys.executable, "chat.py", CHEST, "--model", folder, "--question", "What is it?",
                           "--max-new-tokens", "8", "--attention", out], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (336, 354)
    refused = subprocess.run([sys.executable, "chat.py", CHEST, "--model", folder, "--attention", out], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--attention needs --question" in refused.stderr
