"""Weight-only int8 and int4 quantization of the LLM's linear layers: chat with the 13B model on a small GPU or a laptop.

Paper section 4.1's LLM is LLaMA-2-13B: 26 GB of bf16 weights, more than most 16-24 GB GPUs hold, and decoding one
token reads every one of them, so it is bound by memory bandwidth. Storing the weights of its linear layers (the
blocks' projections and the output layer: 97% of the 13B parameters) in fewer bits reads fewer bytes per token:

    int8  w[o, i] ~= q[o, i] * scale[o]                          q in -127..127, one scale per output channel
    int4  w[o, i] ~= (q[o, i] - 8) * scale[o, g] + zero[o, g]    q in 0..15, one scale and zero point per group
                                                                 g of group_size input channels

Activations, the vision tower, the adapter, the embeddings and the norms stay in the model's dtype ("weight-only").
The recipe is gpt-fast's quantize.py (https://github.com/pytorch-labs/gpt-fast): a linear module holding the
integers and their scales, a function that swaps every `nn.Linear` for one, and a command that writes the quantized
folder once, so that later loads read a quarter (int8) or an eighth (int4) of fp32's bytes:

    python quantize.py runs/stage2 runs/stage2-int8 --int8            # or --int4 [--group-size 128]
    python chat.py scan.png --model runs/stage2-int8                   # chat.py loads it as any model folder
    python chat.py scan.png --model runs/stage2 --quantize int8        # or quantizes while it loads

Neither path ever holds a full-precision copy of the LLM: the source is memory-mapped (checkpoint.py) and each
linear is quantized on its own, its float weight read (on the target device) only for that moment.
"""

import argparse
import os
import shutil
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import CheckpointError, assign_weights, read_config, read_weights, save_weights, write_config, write_output
from model import QilinConfig, QilinMedVL

SCHEMES = ("int8", "int4")


# ---- quantizing one weight matrix (out, in) ------------------------------------------------------------------
# Both compute in float32 and keep the scales in the source's dtype (as gpt-fast), rounding them first, so that
# every weight is within half a step of its stored value: |w - w_hat| <= scale / 2 (tests/test_quantize.py).

def quantize_int8(w):
    """Symmetric per output channel: {weight: int8 (out, in), scales: (out,)}."""
    scales = (w.float().abs().amax(1) / 127).clamp(min=1e-10).to(w.dtype)  # the largest |w| of a row -> 127
    q = (w.float() / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return dict(weight=q, scales=scales)


def quantize_int4(w, group_size):
    """Asymmetric per group of input channels: {weight: uint8 (out, in/2), two 4-bit values a byte (the even input
    channel in the high half, as torch's int4 kernels take them), scales and zeros: (out, in/group_size)}."""
    out, width = w.shape
    g = w.float().view(out, width // group_size, group_size)  # (out, groups, group_size)
    low, high = g.amin(-1), g.amax(-1)
    scales = ((high - low) / 15).clamp(min=1e-10).to(w.dtype)  # the group's range -> 0..15
    zeros = (low + 8 * scales.float()).to(w.dtype)  # the value of q = 8, torch's convention (its kernels subtract 8)
    low = zeros.float() - 8 * scales.float()  # as stored
    q = ((g - low[..., None]) / scales.float()[..., None]).round().clamp(0, 15).to(torch.uint8).view(out, width)
    return dict(weight=q[:, 0::2] << 4 | q[:, 1::2], scales=scales, zeros=zeros)


def dequantize(scheme, weight, scales, zeros=None):
    """The float weight (out, in) the stored tensors stand for, in the scales' dtype."""
    if scheme == "int8":
        return weight.to(scales.dtype) * scales[:, None]
    q = torch.stack([weight >> 4, weight & 15], -1).view(len(weight), scales.shape[1], -1)  # (out, groups, size)
    return ((q.to(scales.dtype) - 8) * scales[..., None] + zeros[..., None]).flatten(1)


# ---- the quantized linear layers ---------------------------------------------------------------------------
# Which kernel, measured on this project's 2-core CPU (torch 2.13, fp32, one decode step's shapes, width 512 and
# the 32000-row output layer; tests/bench_decode.py has the whole-model figures):
#   torch._weight_int8pack_mm            0.2-0.5x the speed of the fp32 matrix-vector product (and 20-50x slower
#                                        than BLAS for a 600-row prefill): slower than not quantizing at all
#   torch._weight_int4pack_mm_for_cpu    0.04-0.1x; its packed layout also cannot be dequantized for the prefill
#   dequantize, then F.linear (BLAS)     as fast as fp32 for a prefill (the conversion is O(out * in), the matmul
#                                        O(rows * out * in)); 2-5x slower than fp32 for one row
#   torch.compile of x * dequantized w,  int8: 1.4-1.7x fp32 for one row, a fused loop that reads each int8 weight
#     summed over the inputs             once; int4: ~0.1x (its nibble unpacking does not vectorise as well)
# So one row (batch-1 decoding) goes through the compiled reduction, more rows through dequantize-then-BLAS. Whole
# decode steps (width 512, 8 layers): int8 1.0x fp32 eager, 2.2x inside chat.compiled's compiled step (each eager
# call of a compiled function costs its own dispatch; one graph of the step fuses everything between the matmuls
# too); int4 0.24x and 0.48x. The fp32 weights of so small a model sit in the measuring CPU's 480 MB cache, which
# hides most of what reading a quarter of the bytes would gain. On a GPU both schemes take the dequantizing path, which
# the compiled step (the default there) fuses into its matmuls, as in gpt-fast; not yet measured here.

@torch.compile(dynamic=True)
def int8_matvec(x, weight, scales):  # (1, in) -> (1, out)
    return (x[:, None, :] * weight.to(x.dtype)).sum(-1) * scales


@torch.compile(dynamic=True)
def int4_matvec(x, weight, scales, zeros):  # (1, in) -> (1, out)
    x = x.view(len(x), 1, scales.shape[1], -1, 2)  # (1, 1, groups, size/2, 2): even and odd input channels
    p, s, z = weight.view(*scales.shape, -1), scales[..., None], zeros[..., None]  # (out, groups, size/2)
    even, odd = ((p >> 4).to(x.dtype) - 8) * s + z, ((p & 15).to(x.dtype) - 8) * s + z  # dequantized, (out, groups, size/2)
    return (x[..., 0] * even + x[..., 1] * odd).sum((-1, -2))


COMPILER = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")  # inductor's CPU code needs one


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights (out, in) and a scale per output channel."""

    def __init__(self, in_features, out_features, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype))

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)  # (M, in)
        if len(rows) == 1 and x.device.type == "cpu" and COMPILER:
            y = int8_matvec(rows, self.weight, self.scales)
        else:
            y = F.linear(rows, self.weight.to(x.dtype)) * self.scales
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """A bias-free nn.Linear with 4-bit weights, two a byte (out, in/2), a scale and zero point per group."""

    def __init__(self, in_features, out_features, group_size, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=dtype))

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)  # (M, in)
        if len(rows) == 1 and x.device.type == "cpu" and COMPILER:
            y = int4_matvec(rows, self.weight, self.scales, self.zeros)
        else:
            y = F.linear(rows, dequantize("int4", self.weight, self.scales, self.zeros).to(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)


def quantized_linears(model):
    """The names of the linears to quantize: every one of the LLM's (blocks and output layer), nothing else."""
    return [f"llm.{name}" for name, m in model.llm.named_modules() if isinstance(m, (nn.Linear, Int8Linear, Int4Linear))]


def is_quantized(model):
    """Whether any of the model's linears holds quantized weights."""
    return any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())


def empty_quantized(linear, scheme, group_size, name, dtype=None):
    """The quantized module (empty) that replaces `linear`; a group size that does not divide its width is refused."""
    if scheme == "int8":
        return Int8Linear(linear.in_features, linear.out_features, dtype)
    if group_size < 2 or group_size % 2 or linear.in_features % group_size:
        raise ValueError(f"--group-size {group_size} does not divide {name}'s {linear.in_features} input channels "
                         f"into groups of an even size (use an even divisor of {linear.in_features})")
    return Int4Linear(linear.in_features, linear.out_features, group_size, dtype)


@torch.no_grad()
def quantize_model(model, scheme, group_size=128, device=None, dtype=None):
    """Swap each of the LLM's linears for its quantized version, one at a time: the float weight (memory-mapped) is
    read onto `device` and quantized there, and then dropped; then the rest (float) moves to `device` and `dtype`."""
    for name in quantized_linears(model):  # all checked before the first is quantized
        empty_quantized(model.get_submodule(name), scheme, group_size, name)
    for name in tqdm(quantized_linears(model), f"quantizing to {scheme}", unit="layer", file=sys.stderr, disable=None):
        linear = model.get_submodule(name)
        w = linear.weight.to(device)
        with torch.device("meta"):
            module = empty_quantized(linear, scheme, group_size, name)
        tensors = quantize_int8(w) if scheme == "int8" else quantize_int4(w, group_size)
        for key, t in tensors.items():
            setattr(module, key, t.to(dtype=dtype if t.is_floating_point() else None))
        model.set_submodule(name, module)
    return model.to(device=device, dtype=dtype)


# ---- loading and writing quantized folders -----------------------------------------------------------------------

def quantization(config, folder):
    """(scheme, group size) from a folder's config.json; (None, None) for a model in full precision."""
    q = config.get("quantization")
    if q is None:
        return None, None
    if not isinstance(q, dict) or q.get("scheme") not in SCHEMES:
        raise CheckpointError(f"{folder}: config.json's quantization {q!r} is not a scheme this loader knows "
                              f"({', '.join(SCHEMES)}, as quantize.py writes them)")
    if config.get("model_type") != "qilin_med_vl":
        raise CheckpointError(f"{folder}: a quantized folder must be in our layout (model_type 'qilin_med_vl'), "
                              f"not {config.get('model_type')!r}")
    return q["scheme"], q.get("group_size")


def load_quantized(folder, vision=None, dtype=None, device=None, scheme=None, group_size=128):
    """A quantized folder as it is, or (`scheme` given) a full-precision one, any layout, quantized while it loads."""
    config = read_config(folder, quantized=True)
    stored, stored_group = quantization(config, folder)
    if stored and scheme:
        raise CheckpointError(f"{folder} is already quantized ({stored}): load it without --quantize")
    if scheme:  # memory-mapped in the file's dtype (no copy), then each linear quantized in turn
        return quantize_model(QilinMedVL.from_pretrained(folder, vision), scheme, group_size, device, dtype)
    with torch.device("meta"):
        model = QilinMedVL(QilinConfig.from_dict(config))
    for name in quantized_linears(model):
        model.set_submodule(name, empty_quantized(model.get_submodule(name), stored, stored_group, name))
    assign_weights(model, read_weights(folder), lambda k: k, dtype, device, what=f"{stored}-quantized model")
    return model.requires_grad_(False)


def write_quantized(src, dst, scheme, group_size=128, vision=None):
    """Quantize the model in `src` (any layout chat.py loads) into `dst`, in our layout: the integers and scales in
    safetensors, config.json with a `quantization` entry, and a copy of tokenizer.model."""
    config = read_config(src, quantized=True)
    if quantization(config, src)[0]:
        raise CheckpointError(f"{src} is already quantized ({config['quantization']['scheme']})")
    if config.get("model_type") == "qilin_med_vl_projector":
        raise CheckpointError(f"{src}: a stage-1 output (the adapter alone); quantize the stage-2 model")
    tokenizer = os.path.join(src, "tokenizer.model")
    if not os.path.isfile(tokenizer):
        raise CheckpointError(f"{src}: no tokenizer.model (chat.py needs it beside the weights)")
    model = quantize_model(QilinMedVL.from_pretrained(src, vision), scheme, group_size)
    settings = dict(scheme=scheme, group_size=group_size if scheme == "int4" else None)

    def write(tmp):
        save_weights(model.state_dict(), tmp)
        write_config(tmp, dict(model.config.to_dict(), quantization=settings), tokenizer)
    write_output(dst, write)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a weight-only int8 or int4 copy of a Qilin-Med-VL model.")
    p.add_argument("src", help="model folder chat.py loads (ours, LLaVA's original layout, llava-hf)")
    p.add_argument("dst", help="new folder for the quantized model")
    scheme = p.add_mutually_exclusive_group(required=True)
    scheme.add_argument("--int8", action="store_const", const="int8", dest="scheme", help="int8, a scale per row")
    scheme.add_argument("--int4", action="store_const", const="int4", dest="scheme",
                        help="int4, a scale and zero point per --group-size input channels")
    p.add_argument("--group-size", type=int, default=128, help="--int4: input channels per scale (default 128)")
    p.add_argument("--vision", help="CLIP ViT folder, for a checkpoint in the original LLaVA layout")
    args = p.parse_args(argv)
    if os.path.exists(args.dst) and os.listdir(args.dst):
        p.error(f"{args.dst} exists and is not empty")
    try:
        model = write_quantized(args.src, args.dst, args.scheme, args.group_size, args.vision)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {'; '.join(line.strip() for line in str(e).splitlines() if line.strip())}", file=sys.stderr)
        return 1
    size = sum(t.nbytes for t in model.state_dict().values())
    print(f"wrote {args.dst}: {args.scheme}, {size / 2**20:.1f} MiB in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
