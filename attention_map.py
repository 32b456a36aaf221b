"""Where the model looked: the attention of an answer's tokens over the image's patch grid, drawn over the image.

A teaching aid in the spirit of the attention-map figures of vision-language papers (LLaVA-style models read the
image as 576 tokens, one per 14-pixel patch of a 24 x 24 grid; the demo's tower has 8 x 8). After an answer has been
generated, the prompt and the answer are run through the model once more, and every LLaMA attention layer's
queries and keys are recomputed by a forward pre-hook with the layer's own projections and RoPE (llama.py's decoding
is not touched: this costs nothing unless asked for). For each position that produced an answer token (the last
prompt position, then each answer token but the last) we take softmax(q k^T / sqrt(d)) in float32 over the
positions it may see, and average over heads and over all layers, each layer weighed alike: no layer is singled
out, because which layers "look" differs from model to model and a choice would be a claim we cannot test here.

What it means: the share of that averaged attention which went to each image patch (the cells add up to the share
of attention that went to the image at all; the rest went to the text). What it does not mean: that those patches
caused the answer. Attention weights say where information was read from, not what it did (Jain and Wallace 2019,
"Attention is not Explanation"); much of it often lands on a few patches that carry no local meaning at all
(Darcet et al. 2024, "Vision Transformers Need Registers"). Show it as that, not as a diagnosis.
"""

import numpy as np
import torch
from PIL import Image, ImageDraw

from data import CLIP_MEAN, CLIP_STD, expand_images
from llama import apply_rope

# a ramp from dark blue through cyan and yellow to red, for attention from none to the most any patch got
RAMP = np.array([[0, 0, 128], [0, 160, 255], [0, 255, 160], [255, 230, 0], [255, 40, 0]], dtype=np.float32)


@torch.inference_mode()
def answer_attention(model, prompt, answer, pixel_values):
    """Attention weights of the positions that produced the answer's tokens, averaged over heads, per layer:
    (n_layers, max(len(answer), 1), T) in float32, T the whole expanded sequence, and the expanded ids (T,).
    prompt: ids from chat.prompt_ids; answer: the generated ids without EOS; pixel_values (N, 3, S, S) or None."""
    device = model.llm.lm_head.weight.device
    ids = torch.tensor([expand_images(prompt + answer, model.num_image_tokens)], device=device)  # (1, T)
    start = ids.shape[1] - len(answer) - 1  # the last prompt position produced the first answer token
    rows = torch.arange(start, start + max(len(answer), 1), device=device)  # (R,)
    layers = []

    def capture(attention, args):  # a forward pre-hook: args = (x, cos, sin, input_pos, mask), as DecoderLayer passes
        x, cos, sin = args[:3]
        B, T, _ = x.shape
        q, k = (p(x).view(B, T, -1, attention.head_dim).transpose(1, 2) for p in (attention.q_proj, attention.k_proj))
        q, k = apply_rope(q, cos, sin)[:, :, rows].float(), apply_rope(k, cos, sin).float()  # (1,H,R,d), (1,Hkv,T,d)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query: head h reads kv head h // group
        scores = q @ k.transpose(-1, -2) / attention.head_dim ** 0.5  # (1, H, R, T)
        scores.masked_fill_(torch.arange(T, device=device) > rows[:, None], float("-inf"))  # causal
        layers.append(scores.softmax(-1).mean(1)[0])  # (R, T), averaged over heads

    hooks = [layer.self_attn.register_forward_pre_hook(capture) for layer in model.llm.layers]
    try:
        embeds = model.embed(ids, None if pixel_values is None else pixel_values.to(device))
        model.llm(inputs_embeds=embeds, logits_at=rows[-1:])  # one full causal forward; its logits are not used
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(layers), ids[0]


def image_grid(model, prompt, answer, pixel_values):
    """The answer's attention on the image's patch grid: (g, g) float32, row-major as the ViT's patches are laid out
    (patch r * g + c is row r, column c); its sum is the share of attention that went to the image."""
    weights, ids = answer_attention(model, prompt, answer, pixel_values)
    image = (ids == model.config.image_token_index).nonzero().squeeze(1)  # the image's feature positions
    g = model.config.vision.image_size // model.config.vision.patch_size
    if len(image) != g * g:
        raise ValueError(f"an attention map needs one image ({g * g} features), not {len(image)} image positions")
    return weights[:, :, image].mean((0, 1)).view(g, g).cpu()  # mean over layers and answer tokens


def draw(pixel_values, grid, size=336):
    """The model's own view of the image (the fitted, un-normalised square) with the grid over it, each cell one
    patch (nothing finer is known), coloured from none to the largest cell; a line below gives the image's share."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    rgb = ((pixel_values.float().cpu() * std + mean).clamp(0, 1) * 255).permute(1, 2, 0).numpy()  # (S, S, 3)
    image = np.asarray(Image.fromarray(rgb.round().astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32)
    cells = grid.numpy() / max(float(grid.max()), 1e-12)  # (g, g) in 0..1
    t = np.asarray(Image.fromarray(cells.astype(np.float32), "F").resize((size, size), Image.NEAREST))  # (size, size)
    stops = np.linspace(0, 1, len(RAMP))
    heat = np.stack([np.interp(t, stops, RAMP[:, c]) for c in range(3)], -1)  # (size, size, 3)
    alpha = 0.15 + 0.5 * t[..., None]  # faint where little attention went, so the image stays readable
    out = Image.new("RGB", (size, size + 18), (255, 255, 255))
    out.paste(Image.fromarray((image * (1 - alpha) + heat * alpha).round().astype(np.uint8)))
    ImageDraw.Draw(out).text((4, size + 3), f"attention to the image: {float(grid.sum()):.0%}", fill=(0, 0, 0))
    return out


def save_map(model, prompt, answer, pixel_values, path):
    """chat.py --attention PATH: the map of one answer about one (composite) image, written as an image file."""
    draw(pixel_values[0], image_grid(model, prompt, answer, pixel_values)).save(path)
