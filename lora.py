"""LoRA: fine-tune the LLM of stage 2 (paper section 4.2.2) on one GPU, by low-rank updates of its linear layers.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (eq. 3): a frozen weight W (out, in) gets a
trained update of rank r, W + (alpha / r) B A with A (r, in) and B (out, r), computed beside the base matmul:

    y = x W^T + dropout(x) A^T B^T * alpha / r

A starts random (PEFT's kaiming-uniform), B at zero, so the first step starts from the base model exactly. LLaVA's
`finetune_lora.sh`, with which the Qilin-Med-VL release was trained, puts rank 128, alpha 256 on every linear layer of
the LLM's blocks and trains the adapter in full at its own lr (`mm_projector_lr` 2e-5); train.py's `--lora R` does
the same. The base stays frozen in bf16: no gradient, no fp32 master copy, no Adam state, so 13B trains on one GPU
(README: "Fine-tuning on one GPU with LoRA"). Only A, B and the adapter are saved, in PEFT's layout for a LLaMA base
(`adapter_config.json`, `adapter_model.safetensors`, keys `base_model.model.model.layers.0.self_attn.q_proj.lora_A
.weight`), so PEFT loads them onto transformers' LlamaForCausalLM. `merge` folds B A into W once at load: decoding then
runs the base model's matmuls only.

Written after minLoRA and litgpt's lora.py (LoRA as a few lines around a frozen linear, and merge) and PEFT's
LoraLayer (initialisation, names and file format: https://huggingface.co/docs/peft).
"""

import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, read_config, read_safetensors, save_weights, write_config, write_output
from model import QilinConfig, QilinMedVL, gathered

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every linear of a block
LORA_RUN = "qilin_med_vl_lora"  # config.json's model_type of a LoRA run
PEFT_PREFIX = "base_model.model.model."  # PEFT's PeftModel > LlamaForCausalLM > LlamaModel; ours: `llm.`
SETTINGS = ("lora", "lora_alpha", "lora_dropout", "projector_lr")  # what a --resume must not change


class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight (and bias), plus the trained low-rank pair. The base keeps its parameter names
    (`q_proj.weight`), so the base checkpoint loads as before; A and B are named as PEFT names them."""

    def __init__(self, base, r, alpha, dropout=0.0, generator=None):
        super().__init__()
        self.weight, self.bias = base.weight.requires_grad_(False), base.bias  # the same tensors, not copies
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.in_features, self.out_features, self.r, self.scaling = base.in_features, base.out_features, r, alpha / r
        self.dropout = nn.Dropout(dropout)
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        # modules, not bare parameters: ZeRO-3 gathers a module's weights as it runs, and PEFT's names are lora_A.weight
        self.lora_A = nn.utils.skip_init(nn.Linear, self.in_features, r, bias=False, **like)  # (r, in)
        self.lora_B = nn.utils.skip_init(nn.Linear, r, self.out_features, bias=False, **like)  # (out, r)
        with torch.no_grad():  # drawn on the CPU in fp32, so every device and dtype starts from the same A
            a = nn.init.kaiming_uniform_(torch.empty(r, self.in_features), a=math.sqrt(5), generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def forward(self, x):  # x (..., in) -> (..., out)
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def add_lora(llm, r, alpha, dropout=0.0, seed=0):
    """Wrap every target linear of the LLM's blocks in a LoRALinear (A seeded by `seed`, the same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in llm.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in TARGETS:
                    setattr(parent, name, LoRALinear(child, r, alpha, dropout, generator))
    return llm


@torch.no_grad()
def merge(module):
    """Fold each LoRALinear into a plain nn.Linear holding W + (alpha / r) B A (summed in fp32, stored in W's dtype)."""
    for name, m in list(module.named_modules()):
        if isinstance(m, LoRALinear):
            delta = m.lora_B.weight.float() @ m.lora_A.weight.float() * m.scaling  # (out, r) @ (r, in)
            linear = nn.utils.skip_init(nn.Linear, m.in_features, m.out_features, bias=m.bias is not None,
                                        dtype=m.weight.dtype, device=m.weight.device).requires_grad_(False)
            linear.weight.copy_(m.weight.float() + delta)
            if m.bias is not None:
                linear.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, linear)
    return module


# ----------------------------------------------------------------------------- train.py's flags and optimizer

def add_flags(p):
    g = p.add_argument_group("LoRA (stage 2; LLaVA's finetune_lora.sh: --lora 128, alpha 256, --lr 2e-4)")
    g.add_argument("--lora", type=int, metavar="R", help="train rank-R adapters on q, k, v, o, gate, up and down of "
                   "every LLM block instead of the whole LLM, which stays frozen (the --lr default becomes 2e-4)")
    g.add_argument("--lora-alpha", type=float, metavar="A", help="the update is scaled by alpha / R (default 2R, as LLaVA)")
    g.add_argument("--lora-dropout", type=float, metavar="P", help="dropout on the LoRA input (default 0.05, as LLaVA)")
    g.add_argument("--projector-lr", type=float, metavar="LR", help="the adapter's own lr, as LLaVA's "
                   "mm_projector_lr (default 2e-5 with --lora, else --lr)")


def check_args(p, args):
    """--lora's flags checked and their defaults filled in; returns the train.py defaults --lora changes (the lr of
    LLaVA's LoRA script, 2e-4; the demo keeps its own)."""
    if args.lora is None:
        if args.lora_alpha is not None or args.lora_dropout is not None:
            p.error("--lora-alpha and --lora-dropout go with --lora R")
    elif args.stage == 1:
        p.error("--lora is for stage 2: stage 1 trains only the adapter, and the LLM stays frozen")
    elif args.lora < 1:
        p.error(f"--lora (the rank) must be at least 1, not {args.lora}")
    else:
        args.lora_alpha = float(2 * args.lora if args.lora_alpha is None else args.lora_alpha)
        args.lora_dropout = 0.05 if args.lora_dropout is None else args.lora_dropout
        args.projector_lr = 2e-5 if args.projector_lr is None else args.projector_lr
        if not 0 <= args.lora_dropout < 1:
            p.error(f"--lora-dropout must be at least 0 and below 1, not {args.lora_dropout}")
    if args.projector_lr is not None and not args.projector_lr > 0:
        p.error(f"--projector-lr must be above 0, not {args.projector_lr}")
    return dict(lr=2e-4) if args.lora else {}


def apply(model, args):
    """With --lora: the LLM frozen (set_trainable made it trainable for stage 2), LoRA pairs added to its blocks."""
    if args.lora:
        add_lora(model.llm.requires_grad_(False), args.lora, args.lora_alpha, args.lora_dropout, args.seed)
    return model


def param_groups(model, args):
    """AdamW's parameter groups: the LLM's trained weights (LoRA's A and B, or all of it) at --lr, the adapter at
    --projector-lr. Frozen weights are in no group, so DeepSpeed keeps no fp32 copy and no Adam state for them."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [dict(params=[p for n, p in trained if not n.startswith("projector.")], lr=args.lr),
              dict(params=[p for n, p in trained if n.startswith("projector.")], lr=args.projector_lr or args.lr)]
    return [g for g in groups if g["params"]]  # the first group's lr is the one metrics.jsonl logs


# ----------------------------------------------------------------------------- the run's output and loading it

def peft_config(r, alpha, dropout, base):
    """adapter_config.json as PEFT writes it for LoraConfig(target_modules=TARGETS) on a LLaMA (unlisted: defaults)."""
    return dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base, r=r, lora_alpha=alpha,
                lora_dropout=dropout, target_modules=list(TARGETS), bias="none", fan_in_fan_out=False,
                init_lora_weights=True, use_rslora=False, use_dora=False, modules_to_save=None, inference_mode=True)


def save_run(model, args, tokenizer, zero3=False):
    """A LoRA run's output, whole or not at all: adapter_config.json and adapter_model.safetensors (the LoRA weights,
    PEFT's layout), projector.safetensors (the adapter, as stage 1 writes it), config.json (the model, the base
    folders as absolute paths, the LoRA settings) and tokenizer.model. Every rank calls this: under ZeRO-3 the trained
    weights are gathered one at a time for rank 0; the frozen base is not written (the recorded folders hold it)."""
    state = gathered(((n, p) for n, p in model.named_parameters() if p.requires_grad), zero3)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    vision, llm = os.path.abspath(args.vision), os.path.abspath(args.llm)

    def write(tmp):
        lora = {PEFT_PREFIX + k.removeprefix("llm."): t for k, t in state.items() if k.startswith("llm.")}
        save_weights(lora, tmp, stem="adapter_model")
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(peft_config(args.lora, args.lora_alpha, args.lora_dropout, llm), f, indent=2)
        save_weights({k.removeprefix("projector."): t for k, t in state.items() if k.startswith("projector.")},
                     tmp, stem="projector")
        write_config(tmp, dict(model.config.to_dict(), model_type=LORA_RUN, vision_path=vision, llm_path=llm,
                               lora=dict(r=args.lora, alpha=args.lora_alpha, dropout=args.lora_dropout)), tokenizer)
    write_output(args.output, write)


def base_folder(llm_path, flag="--llm"):
    """llm_path, checked to be a LLaMA folder: neither a LoRA run nor a whole Qilin-Med-VL model is a base LLM."""
    config = read_config(llm_path)
    if str(config.get("model_type")).startswith("qilin_med_vl"):
        what = ("a LoRA run (trained over " + config["llm_path"] + ")" if config["model_type"] == LORA_RUN
                else "a Qilin-Med-VL output")
        raise CheckpointError(f"{flag} {llm_path} is {what}, not a LLaMA folder: give the base LLM's own folder "
                              f"(config.json, weights, tokenizer.model)")
    return llm_path


def load_run(folder, vision=None, llm=None, dtype=None, device=None):
    """A LoRA run as one model: the base towers from the folders it recorded (or `vision`, `llm`), its adapter, and
    the LoRA weights merged into the LLM, so that decoding costs what the base model's does."""
    config = read_config(folder)
    for flag, given, recorded in (("--llm", llm, config["llm_path"]), ("--vision", vision, config["vision_path"])):
        if not os.path.isdir(given or recorded):
            raise CheckpointError(f"{flag} {given}: no such folder" if given else f"{folder}: this LoRA run's base "
                                  f"folder {recorded} is not there (moved?); name where it is now with {flag} DIR")
    vision, llm = vision or config["vision_path"], base_folder(llm or config["llm_path"])
    model = QilinMedVL.from_parts(QilinConfig.from_dict(config), vision, llm, folder, dtype, device)
    lora = config["lora"]
    add_lora(model.llm, lora["r"], lora["alpha"])
    file = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise CheckpointError(f"{folder}: no adapter_model.safetensors (the LoRA weights of this run)")
    state = {"llm." + k.removeprefix(PEFT_PREFIX): t for k, t in read_safetensors(file).items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape that does not fit the recorded rank
        raise CheckpointError(f"{file}: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if ".lora_" in k]  # the rest is the base's, loaded above
    if missing or unexpected:
        raise CheckpointError(f"{file}: {len(missing)} LoRA weights missing ({', '.join(missing[:3])}), "
                              f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    return merge(model).requires_grad_(False)


if __name__ == "__main__":
    # A demo-size LLM with rank-8 LoRA: how many weights train, and that merging changes nothing.
    from llama import Llama, LlamaArgs
    llm = add_lora(Llama(LlamaArgs.preset("demo")).requires_grad_(False), r=8, alpha=16)
    trained = sum(p.numel() for p in llm.parameters() if p.requires_grad)
    print(f"{trained:,} of {sum(p.numel() for p in llm.parameters()):,} parameters train (rank 8)")
    for m in llm.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B.weight, std=0.02)  # as if trained
    ids = torch.randint(0, llm.args.vocab_size, (1, 16))
    with torch.no_grad():
        before = llm.eval()(ids)
        print(f"merged vs unmerged logits: max |diff| {(merge(llm)(ids) - before).abs().max():.1e}")
