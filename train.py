"""Train Qilin-Med-VL in two stages with DeepSpeed (paper section 4.2, hyperparameters section 5.2).

  stage 1, feature alignment: vision tower and LLM frozen, the adapter learns to map image
           features into the LLM's embedding space from image-caption pairs. ZeRO-2.
  stage 2, instruction tuning: vision tower frozen, adapter and LLM learn to answer questions
           about images. ZeRO-3 (13B weights, gradients and Adam states split over the GPUs).

Defaults are the paper's: 1 epoch, AdamW with weight decay 0, warmup for 3% of the steps then
cosine to 0, max length 2048, bf16 with tf32 matmuls, gradient checkpointing; stage 1 batch 32 per
GPU at lr 1e-3, stage 2 batch 16 per GPU at lr 2e-5 (8 x A100 80G).

Usage (one node, 8 GPUs; official towers as Hugging Face folders):

    torchrun --nproc_per_node 8 train.py --stage 1 \\
        --vision weights/clip-vit-large-patch14-336 --llm weights/Chinese-LLaMA2-13B-Chat \\
        --data data/ChiMed-VL-Alignment.json --image-root data/images --output runs/stage1
    torchrun --nproc_per_node 8 train.py --stage 2 --stage1-output runs/stage1 \\
        --data data/ChiMed-VL-Instruction.json --image-root data/images --output runs/stage2

  (stage 2 takes the towers from the paths stage 1 recorded; --vision / --llm override them.
   The released model's choices: --style release --projector mlp2x_gelu.)

Two nodes of 8 GPUs (run on each node, node_rank 0 on the node at MASTER_ADDR; a shared
filesystem for --output, since every rank writes its part of each checkpoint):

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29500 \\
        train.py --stage 2 ...                                    # node_rank 1 on the other node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint 10.0.0.1:29500 \\
        --rdzv_id qilin train.py --stage 2 ...                    # or elastic rendezvous, same on both

DeepSpeed's own launcher works too (`deepspeed --num_gpus 8 train.py --stage 1 ...`): it sets
the same RANK / WORLD_SIZE / LOCAL_RANK variables and adds a --local_rank argument, ignored here.

The demo trains tiny random towers on the bundled samples on a CPU. On 2 cores stage 1 takes
about 10 s and stage 2 about 50 s, after DeepSpeed's first start has built a small extension
(about 45 s, once):

    torchrun --standalone --nproc_per_node 2 train.py --demo --stage 1
    torchrun --standalone --nproc_per_node 2 train.py --demo --stage 2

The output folder holds metrics.jsonl (one line per step), args.json, checkpoints/ (every
--save-every steps, each with a run.json of the settings a resumption must share; --resume
continues from the latest after a crash or kill) and, at the end, the model: stage 1 the adapter
(projector.safetensors + config.json), stage 2 the whole model, which
`QilinMedVL.from_pretrained(folder)` and chat.py load.
"""

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoint import CheckpointError, read_config, save_weights
from data import SAMPLES, ChiMedDataset, LengthGroupedSampler, Tokenizer, collate
from llama import LlamaArgs
from model import IMAGE_TOKEN_INDEX, QilinConfig, QilinMedVL, write_config
from vit import VisionArgs

# Paper section 5.2, per stage; --demo replaces them with values that train a tiny model on a CPU.
PAPER = {1: dict(batch_size=32, lr=1e-3, zero=2), 2: dict(batch_size=16, lr=2e-5, zero=3)}
DEMO = {1: dict(batch_size=4, lr=2e-3, epochs=10, zero=2, num_workers=0, max_length=512, warmup_ratio=0.1,
                output="runs/demo-stage1"),
        2: dict(batch_size=4, lr=1e-3, epochs=60, zero=3, num_workers=0, max_length=512, warmup_ratio=0.1,
                output="runs/demo-stage2", stage1_output="runs/demo-stage1")}
A100_BF16_TFLOPS = 312
EPILOG = """
metrics.jsonl, one line per optimizer step: step, epoch (fractional), loss (mean over ranks and
micro-steps), lr (the one this step used), tokens (all ranks, image features included),
tokens_per_s, mfu (LLM FLOPs / peak, see --peak-tflops), skipped (samples excluded when the data
was read, plus those dropped while training: an unreadable image, or too long with that epoch's
prompt); with --log-sample-ids also ids.

DeepSpeed's own monitors (off by default) are switched on with --deepspeed-config, e.g.
  {"tensorboard": {"enabled": true, "output_path": "runs/tb", "job_name": "stage2"},
   "csv_monitor": {"enabled": true, "output_path": "runs/csv", "job_name": "stage2"}}
"""


def parse_args(argv=None):
    demo = "\n".join(f"  stage {stage}: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())
                     for stage, values in DEMO.items())  # made from DEMO, so that --help cannot drift from it
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"\n--demo defaults (data and images from samples/):\n{demo}\n{EPILOG}")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True,
                   help="1: train the adapter (feature alignment); 2: the adapter and the LLM (instruction tuning)")
    p.add_argument("--demo", action="store_true",
                   help="tiny random towers, the demo tokenizer and samples/ data, CPU-sized defaults "
                        "(any flag given explicitly still wins)")
    g = p.add_argument_group("model and data")
    g.add_argument("--vision", help="CLIP ViT-L/14-336 folder (config.json + weights); stage 2: default from stage 1")
    g.add_argument("--llm", help="LLaMA-2 folder (config.json, weights, tokenizer.model); stage 2: default from stage 1")
    g.add_argument("--stage1-output", help="stage 2: the folder stage 1 wrote (its adapter starts stage 2)")
    g.add_argument("--data", help="LLaVA-format JSON or JSONL file of samples")
    g.add_argument("--image-root", help="folder the samples' image paths are relative to")
    g.add_argument("--output", help="run folder: metrics, checkpoints and the trained model")
    g.add_argument("--style", choices=("paper", "release"),
                   help="paper: the paper's prompts in the v1 template; release: LLaVA's plain (stage 1) and v1 "
                        "(default paper; stage 2: what stage 1 used)")
    g.add_argument("--projector", choices=("linear", "mlp2x_gelu"),
                   help="adapter: the paper's linear layer or the release's 2-layer MLP (default linear; stage 2: stage 1's)")
    g.add_argument("--image-fit", choices=("pad", "crop"),
                   help="pad to a square or center-crop (default: crop in stage 1, pad in stage 2, as the release)")
    g.add_argument("--max-length", type=int, help="longest sequence, image features included (default 2048)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="samples per GPU per micro-step (default 32 stage 1, 16 stage 2)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 stage 1, 2e-5 stage 2)")
    g.add_argument("--epochs", type=int, help="passes over the data (default 1)")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps, at most --epochs epochs (the lr schedule ends there)")
    g.add_argument("--warmup-ratio", type=float, help="fraction of the steps spent warming up (default 0.03)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (default 1.0, as LLaVA's trainer)")
    g.add_argument("--seed", type=int, default=42, help="data order, paper prompt choice, demo towers (default 42)")
    g = p.add_argument_group("system")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default 2 in stage 1, 3 in stage 2)")
    g.add_argument("--offload", choices=("none", "optimizer", "all"), default="none",
                   help="move the Adam states (optimizer), and with ZeRO-3 also the weights (all), to CPU memory (default none)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each LLM block in the backward pass instead of storing its activations (default on)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto (default): bf16 weights with fp32 master copies and tf32 matmuls on GPU, fp32 on CPU")
    g.add_argument("--deepspeed-config", metavar="FILE",
                   help="JSON merged over the config built in deepspeed_config() (an example below)")
    g.add_argument("--num-workers", type=int, help="DataLoader processes per GPU reading images (default 4)")
    g.add_argument("--peak-tflops", type=float,
                   help="peak TFLOP/s of one GPU/process for MFU (default 312, A100 bf16; on CPU measured at start)")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save-every", type=int, default=500, help="save a resumable checkpoint every N steps (default 500)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="delete a previous run in --output and start afresh")
    g.add_argument("--log-sample-ids", action="store_true",
                   help="record each step's sample ids in metrics.jsonl (audits data order across resumes)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # DeepSpeed's launcher adds it
    args = p.parse_args(argv)

    # Fill what was not given: demo values, then the paper's, then the stage-1 run's own choices.
    defaults = dict(PAPER[args.stage], epochs=1, warmup_ratio=0.03, max_length=2048, num_workers=4)
    if args.demo:
        defaults.update(DEMO[args.stage], data=str(SAMPLES / f"stage{args.stage}.json"), image_root=str(SAMPLES / "images"))
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for flag in ("batch_size", "grad_accum", "save_every", "epochs", "max_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, not {value}")
    if not args.lr > 0:
        p.error(f"--lr must be above 0, not {args.lr}")
    if not 0 <= args.warmup_ratio < 1:
        p.error(f"--warmup-ratio must be at least 0 and below 1, not {args.warmup_ratio}")
    for flag in ("data", "image_root", "output"):
        if getattr(args, flag) is None:
            fail(f"--{flag.replace('_', '-')} is required (or --demo)")
    if args.stage == 2 and args.stage1_output is None:
        fail("stage 2 starts from stage 1's adapter: pass --stage1-output DIR (the --output of your stage-1 run)")
    if args.stage == 1 and not args.demo and (args.vision is None or args.llm is None):
        fail("stage 1 needs the official towers: --vision CLIP_FOLDER --llm LLAMA_FOLDER (or --demo)")
    return args


def fail(message):
    """Stop with a message for a person (once, from the first rank) and a non-zero exit status."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# ----------------------------------------------------------------------------- configuration

def deepspeed_config(args, world_size, on_gpu):
    """The whole DeepSpeed configuration, built where it can be read; --deepspeed-config merges
    over it (for example to switch on DeepSpeed's monitors: see --help)."""
    zero = {"stage": args.zero, "overlap_comm": on_gpu, "contiguous_gradients": True,
            "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    if args.zero == 3:
        zero.update(stage3_prefetch_bucket_size=5e8, stage3_param_persistence_threshold=1e6,
                    stage3_gather_16bit_weights_on_model_save=True)
    if args.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if args.offload == "all" and args.zero == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "train_batch_size": args.batch_size * args.grad_accum * world_size,
        "gradient_clipping": args.grad_clip,
        # torch's AdamW (fused kernel on GPU) needs no compiled extension; with the optimizer in
        # CPU memory DeepSpeed's own CPU Adam is much faster (it builds an extension once).
        "optimizer": {"type": "AdamW", "params": {
            "lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": args.weight_decay,
            "torch_adam": args.offload == "none", **({"fused": True} if on_gpu and args.offload == "none" else {})}},
        "bf16": {"enabled": args.precision == "bf16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # progress goes to the bar and metrics.jsonl instead
        "wall_clock_breakdown": False,
    }
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            config = merge(config, json.load(f))
    return config


def merge(base, override):
    """Nested dicts: override's values win, sub-dicts are merged key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def warmup_cosine(step, warmup_steps, total_steps):
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup from 0, then
    half a cosine down to 0. The same curve as transformers' get_cosine_schedule_with_warmup,
    which LLaVA and the Qilin-Med-VL release trained with."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- model

def resolve_model_choices(args):
    """Fill --projector, --style, --image-fit, --vision and --llm where they were not given.

    Stage 2 continues what stage 1 recorded in its config.json: its adapter only fits the towers,
    the adapter shape and the prompts it was trained with. Otherwise: the paper's choices."""
    if args.stage == 2:
        s1 = read_config(args.stage1_output)
        if s1.get("model_type") != "qilin_med_vl_projector":
            raise CheckpointError(f"{args.stage1_output}: config.json is not a stage-1 output "
                                  f"(model_type {s1.get('model_type')!r}, expected 'qilin_med_vl_projector')")
        missing = [key for key in ("projector", "style", "vision_path", "llm_path") if key not in s1]
        if missing:
            raise CheckpointError(f"{args.stage1_output}/config.json lacks {', '.join(missing)} "
                                  f"(it was not written by this train.py's stage 1)")
        if args.projector not in (None, s1["projector"]):
            raise CheckpointError(f"--projector {args.projector} but {args.stage1_output} holds a {s1['projector']!r} adapter")
        args.projector, args.style = s1["projector"], args.style or s1["style"]
        args.vision, args.llm = args.vision or s1["vision_path"], args.llm or s1["llm_path"]
    args.projector, args.style = args.projector or "linear", args.style or "paper"
    args.image_fit = args.image_fit or ("crop" if args.stage == 1 else "pad")


def build_model(args, dtype):
    """(model, config, tokenizer path): towers from their folders, the adapter fresh (stage 1) or
    from stage 1's output (stage 2); the demo's towers are random. Call resolve_model_choices first."""
    if args.demo and args.stage == 1 and args.vision is None:
        tokenizer = str(SAMPLES / "tokenizer.model")
        vision = VisionArgs.preset("demo")
        llm = LlamaArgs.preset("demo")
        llm.vocab_size = Tokenizer(tokenizer).vocab_size
    else:
        if args.vision is None or args.llm is None:
            raise CheckpointError("no --vision / --llm folder given, and stage 1 recorded none")
        tokenizer = os.path.join(args.llm, "tokenizer.model")
        vision = VisionArgs.from_hf_config(read_config(args.vision))
        llm = LlamaArgs.from_hf_config(read_config(args.llm))
    config = QilinConfig(projector=args.projector, image_fit=args.image_fit, style=args.style, vision=vision, llm=llm)
    torch.manual_seed(args.seed)  # random parts (the adapter; the demo's towers) are the same on every rank
    model = QilinMedVL.from_parts(config, args.vision, args.llm, args.stage1_output if args.stage == 2 else None, dtype)
    return model, config, tokenizer

def save_demo_towers(model, folder, tokenizer):
    """The demo's random towers, written as Hugging Face folders (the layout of the official
    ones), so stage 2 and chat load them exactly as they would load the real CLIP and LLaMA."""
    save_weights({f"vision_model.{k}": v for k, v in model.vision.state_dict().items()}, os.path.join(folder, "vision"))
    save_weights({(k if k.startswith("lm_head") else f"model.{k}"): v for k, v in model.llm.state_dict().items()},
                 os.path.join(folder, "llm"))
    write_config(os.path.join(folder, "vision"), model.config.vision.to_hf_config())
    write_config(os.path.join(folder, "llm"), model.config.llm.to_hf_config(), tokenizer)


def write_output(folder, write):
    """Write the trained model into `folder` so that a crash never leaves a half-written one:
    everything goes to a temporary folder next to it first, then each file is renamed into place
    (an atomic step on one filesystem) with config.json last. Loaders start from config.json, so
    until the last rename nothing loads; `--resume` after a crash here writes it again."""
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")  # config.json last
    for name in names:
        target = os.path.join(folder, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)



def save_final_model(model, config, args, tokenizer_path, rank):
    """Write the trained model into --output: stage 1 the adapter (with the demo's random towers),
    stage 2 the whole model. ZeRO-3 keeps a slice of every weight on each rank: gather them one at
    a time (every rank takes part in each gather) into a CPU copy of the whole model on rank 0."""
    import deepspeed

    full = model
    if args.zero == 3:
        state = {}
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                if rank == 0:
                    state[name] = p.detach().cpu().clone()
        if rank == 0:
            with torch.device("meta"):
                full = QilinMedVL(config)
            full.load_state_dict(state, strict=True, assign=True)
    if rank != 0:
        return
    if args.stage == 1:
        vision, llm = args.vision, args.llm
        if vision is None:  # demo: the random towers go with the adapter, as Hugging Face folders
            vision, llm = os.path.join(args.output, "vision"), os.path.join(args.output, "llm")

        def write(tmp):
            if args.vision is None:
                save_demo_towers(full, tmp, tokenizer_path)
            full.save_projector(tmp, vision, llm, tokenizer_path)
    else:
        def write(tmp):
            full.save_pretrained(tmp, tokenizer=tokenizer_path)
    write_output(args.output, write)


# ----------------------------------------------------------------------------- checkpoints

def run_settings(args, world, samples):
    """What a resumed run must share with the run it continues: the data order, the lr schedule
    and the layout of DeepSpeed's checkpoint follow from these. Every checkpoint keeps them as run.json."""
    return dict(stage=args.stage, world_size=world, zero=args.zero, precision=args.precision,
                data=os.path.abspath(args.data), samples=samples, max_length=args.max_length, style=args.style,
                projector=args.projector, image_fit=args.image_fit, batch_size=args.batch_size,
                grad_accum=args.grad_accum, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                seed=args.seed)


def check_same_run(folder, run):
    """--resume: stop with a message, before anything is loaded, if the latest checkpoint was
    trained with other settings (DeepSpeed would fail on another world size or ZeRO stage, and
    anything else would silently change the data order or the lr schedule)."""
    root = os.path.join(folder, "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        tag = f.read().strip()
    path = os.path.join(root, tag, "run.json")
    if not os.path.isfile(path):
        fail(f"--resume: {path} is missing, so {root}/{tag} is not a complete checkpoint")
    with open(path) as f:
        saved = json.load(f)
    changed = [f"{key} was {saved.get(key)!r}, now {value!r}" for key, value in run.items() if saved.get(key) != value]
    if changed:
        fail(f"cannot resume {root}/{tag}: this run's settings differ from the checkpoint's ({'; '.join(changed)}). "
             f"Resume with the same settings, or start a new run with --overwrite or another --output")


def save_checkpoint(engine, folder, step, client_state, run, rank):
    """A resumable checkpoint under a new tag; `latest` moves to it only when every rank is done.

    Frozen weights are not saved (stage 1 would write the whole 13B LLM every time): a resumed
    run rebuilds them from the towers exactly as the first run did.
    """
    root, tag = os.path.join(folder, "checkpoints"), f"step-{step:08d}"
    if rank == 0:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)  # half-written by a crashed run
    dist.barrier()
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True)
    rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    torch.save(rng, os.path.join(root, tag, f"rng-rank{rank:05d}.pt"))
    if rank == 0:
        with open(os.path.join(root, tag, "run.json"), "w") as f:
            json.dump(run, f, indent=2)
    dist.barrier()  # every rank has written its part of this tag
    if rank == 0:
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))  # DeepSpeed's pointer format
        for old in os.listdir(root):
            if old.startswith("step-") and old != tag:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def resume(engine, folder, rank):
    """Restore engine, optimizer, scheduler and this rank's RNG states from the latest checkpoint
    (check_same_run has vouched for its settings); return its tag and client state. metrics.jsonl
    loses the lines of the steps that will run again."""
    root = os.path.join(folder, "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        tag = f.read().strip()
    path, state = engine.load_checkpoint(root, tag=tag, load_module_strict=False)  # frozen weights come from the towers
    if path is None:
        raise CheckpointError(f"{root}/{tag}: DeepSpeed could not load this checkpoint")
    rng = torch.load(os.path.join(root, tag, f"rng-rank{rank:05d}.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    metrics_path = os.path.join(folder, "metrics.jsonl")
    if rank == 0 and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        try:
            json.loads(lines[-1] if lines else "{}")
        except json.JSONDecodeError:  # a kill while the line was written: that step runs again anyway
            lines.pop()
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(line + "\n" for line in lines if json.loads(line)["step"] <= state["step"])
        os.replace(metrics_path + ".tmp", metrics_path)
    return tag, state


def check_output_folder(args):
    """Refuse to mix two runs in one folder; --resume needs a checkpoint to resume from."""
    out = args.output
    if args.resume:
        if not os.path.isfile(os.path.join(out, "checkpoints", "latest")):
            fail(f"--resume: {out} has no checkpoints/latest to resume from (was it run with --save-every?)")
    elif os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        fail(f"{out} already holds another run ({', '.join(sorted(os.listdir(out))[:5])}); pass --resume to continue "
             f"it, --overwrite to replace it, or choose another --output")


# ----------------------------------------------------------------------------- measuring

def cpu_peak_tflops(n=1024, repeats=5):
    """A rough CPU peak: the best fp32 matmul rate of this process (its threads) on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def expanded_lengths(batch, num_image_tokens):
    """Tokens per row the LLM really processes: text without padding, each image as its features."""
    n_images = (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(1)
    return batch["attention_mask"].sum(1) + n_images * (num_image_tokens - 1)  # (B,)


def step_flops(lengths, llm_args, stage):
    """The LLM's matmul FLOPs for samples of these lengths: each sample's tokens times the FLOPs
    per token at its length (the frozen ViT adds ~1%). Stage 2 trains the LLM: forward and
    backward. Stage 1 passes gradients through the frozen LLM to the adapter without computing
    its weight gradients: twice the forward."""
    total = 0
    for T in lengths:
        per_token = llm_args.flops_per_token(T) if stage == 2 else 2 * llm_args.flops_per_token(T, backward=False)
        total += T * per_token
    return total


# ----------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    # torchrun and DeepSpeed's launcher set these; a plain `python train.py` is one process.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    on_gpu = torch.cuda.is_available()
    args.precision = ("bf16" if on_gpu else "fp32") if args.precision == "auto" else args.precision
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if on_gpu:
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # Everything that can be wrong with the inputs fails here, on every rank, before any process
    # waits for another or anything is written or loaded.
    check_output_folder(args)
    if not os.path.isfile(args.data):
        fail(f"--data {args.data}: no such file")
    if not os.path.isdir(args.image_root):
        fail(f"--image-root {args.image_root}: no such folder")
    try:
        resolve_model_choices(args)
        model, config, tokenizer_path = build_model(args, dtype)
        tokenizer = Tokenizer(tokenizer_path)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        message = f"a config.json lacks the key {e}" if isinstance(e, KeyError) else str(e)
        hint = " (run stage 1 first)" if args.stage == 2 and not os.path.isdir(args.stage1_output) else ""
        fail(f"{message}{hint}")
    if tokenizer.vocab_size != config.llm.vocab_size:
        fail(f"{tokenizer_path} has {tokenizer.vocab_size} pieces but the LLM's vocabulary is {config.llm.vocab_size}")
    try:
        dataset = ChiMedDataset(data_path=args.data, image_root=args.image_root, tokenizer=tokenizer, stage=args.stage,
                                style=args.style, image_size=config.vision.image_size, image_fit=args.image_fit,
                                max_length=args.max_length, num_image_tokens=model.num_image_tokens, seed=args.seed)
    except ValueError as e:  # a data file that is not JSON or JSON lines
        fail(str(e))
    if len(dataset) == 0:
        hint = f" (are the images under --image-root {args.image_root}?)" if dataset.skipped["missing_image"] else ""
        fail(f"no sample to train on: {dataset.report()}{hint}")
    excluded = sum(dataset.skipped.values())
    run = run_settings(args, world, len(dataset))
    if args.resume:
        check_same_run(args.output, run)

    import deepspeed  # here, so that `--help` and the checks above answer without its start-up cost
    deepspeed.utils.logger.setLevel(logging.WARNING)  # its config dump and per-step notes would drown the bar
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")  # DeepSpeed's calls
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    log = (lambda *a: tqdm.write(" ".join(map(str, a)))) if rank == 0 else (lambda *a: None)
    if rank == 0:
        if args.overwrite and not args.resume:
            shutil.rmtree(args.output, ignore_errors=True)
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "args.json"), "w") as f:
            json.dump(dict(vars(args), world_size=world), f, indent=2)
    dist.barrier()

    model.set_trainable(args.stage)
    model.llm.gradient_checkpointing = args.gradient_checkpointing
    trainable = [p for p in model.parameters() if p.requires_grad]
    peak = args.peak_tflops or (A100_BF16_TFLOPS if on_gpu else cpu_peak_tflops())
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trained (stage {args.stage}); {args.precision}, ZeRO-{args.zero}, "
        f"{world} processes")
    log(dataset.report())
    log(f"MFU against a peak of {peak:.3g} TFLOP/s per process "
        f"({'--peak-tflops' if args.peak_tflops else 'A100 bf16' if on_gpu else 'measured: fp32 matmul on this CPU'})")

    def epoch_batches(epoch):
        # This rank's batches: the sampler's order is a pure function of (seed, epoch, rank), so a
        # resumed run finds the same batches and skips the ones already trained.
        dataset.set_epoch(epoch)  # paper style: fresh prompts each epoch (data.py)
        sampler = LengthGroupedSampler(dataset.lengths, args.batch_size, world, rank, args.seed)
        sampler.set_epoch(epoch)
        order = list(sampler)
        n = len(order) // args.batch_size // args.grad_accum * args.grad_accum  # a last partial accumulation is dropped
        return [order[i * args.batch_size:(i + 1) * args.batch_size] for i in range(n)]

    steps_per_epoch = len(epoch_batches(0)) // args.grad_accum
    if steps_per_epoch == 0:
        fail(f"{len(dataset)} samples make no full step of {args.batch_size * args.grad_accum * world} samples")
    total_steps = args.epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps, args.epochs * steps_per_epoch)
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, config=deepspeed_config(args, world, on_gpu),
        lr_scheduler=lambda opt: LambdaLR(opt, partial(warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps)))

    # optimizer steps so far; where in the data we are; samples dropped while training
    step, epoch, micro_done, dropped = 0, 0, 0, 0
    if args.resume:
        tag, state = resume(engine, args.output, rank)
        step, epoch, micro_done, dropped = state["step"], state["epoch"], state["micro_done"], state["dropped"]
        log(f"resumed from {args.output}/checkpoints/{tag}: step {step}, epoch {epoch}, batch {micro_done}")

    metrics = open(os.path.join(args.output, "metrics.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc=f"stage {args.stage}")
    engine.train()
    pad_id = tokenizer.pad_id
    dummy = None  # stands in for a batch whose every sample was dropped, to keep the ranks in step
    t_last = time.perf_counter()
    # per step, summed over micro-steps then ranks: loss, micro-steps, tokens, FLOPs, dropped samples
    acc = torch.zeros(5, dtype=torch.float64)
    ids_seen = []
    while step < total_steps and epoch < args.epochs:
        batches = epoch_batches(epoch)
        loader = DataLoader(dataset, batch_sampler=batches[micro_done:],  # resume: skip what was trained
                            collate_fn=partial(collate, pad_id=pad_id), num_workers=args.num_workers)
        for batch in loader:
            micro_done += 1
            if batch["ids"]:
                lengths = expanded_lengths(batch, model.num_image_tokens).tolist()
                inputs = {k: batch[k].to(engine.device) for k in ("input_ids", "labels", "attention_mask", "pixel_values")}
                _, loss = engine(**inputs)  # (B, T) in, mean cross-entropy of the learned tokens out
                acc += torch.tensor([loss.item(), 1, sum(lengths), step_flops(lengths, config.llm, args.stage),
                                     batch["n_dropped"]], dtype=torch.float64)
            else:  # every sample dropped: a zero-weight forward so that collectives still match
                if dummy is None:
                    size = config.vision.image_size
                    dummy = dict(input_ids=torch.tensor([[tokenizer.bos_id, IMAGE_TOKEN_INDEX]], device=engine.device),
                                 pixel_values=torch.zeros(1, 3, size, size, device=engine.device))
                logits, _ = engine(**dummy)
                loss = logits.float().sum() * 0.0
                acc[4] += batch["n_dropped"]
            ids_seen += batch["ids"]
            engine.backward(loss)
            if not engine.is_gradient_accumulation_boundary():
                engine.step()  # only accumulates
                continue
            # Before applying the update: did any rank see a non-finite loss?
            totals = acc.to(engine.device)  # NCCL reduces GPU tensors only
            dist.all_reduce(totals)
            totals = totals.cpu()
            loss_value = totals[0].item() / totals[1].item() if totals[1] else None  # None: every sample dropped
            if loss_value is not None and not math.isfinite(loss_value):
                latest = os.path.join(args.output, "checkpoints", "latest")
                kept = open(latest).read().strip() if os.path.isfile(latest) else None
                fail(f"step {step + 1}: the loss is {loss_value}; stopping before the update. "
                     + (f"The last good checkpoint is {args.output}/checkpoints/{kept}: lower --lr and --resume."
                        if kept else "No checkpoint was saved yet: lower --lr and start again with --overwrite."))
            lr = scheduler.get_last_lr()[0]
            engine.step()  # clip, AdamW, next lr
            step += 1
            dt, t_last = time.perf_counter() - t_last, time.perf_counter()
            dropped += int(totals[4].item())
            record = dict(step=step, epoch=round(epoch + micro_done / len(batches), 4),
                          loss=loss_value, lr=lr, tokens=int(totals[2].item()), tokens_per_s=round(totals[2].item() / dt, 1),
                          mfu=round(totals[3].item() / dt / (peak * 1e12 * world), 5), skipped=excluded + dropped)
            if args.log_sample_ids:
                gathered = [None] * world
                dist.all_gather_object(gathered, ids_seen)
                record["ids"] = [i for ids in gathered for i in ids]
            ids_seen = []
            acc.zero_()
            if rank == 0:
                metrics.write(json.dumps(record, ensure_ascii=False) + "\n")
                metrics.flush()
                bar.set_postfix(loss="-" if loss_value is None else f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                mfu=f"{100 * record['mfu']:.1f}%", refresh=False)
                bar.update()
            if micro_done == len(batches):
                epoch, micro_done = epoch + 1, 0
            if step % args.save_every == 0 and step < total_steps:
                save_checkpoint(engine, args.output, step,
                                dict(step=step, epoch=epoch, micro_done=micro_done, dropped=dropped), run, rank)
                t_last = time.perf_counter()  # do not count the save as training time
            if step >= total_steps:
                break
    bar.close()

    save_final_model(model, config, args, tokenizer_path, rank)
    if rank == 0:
        log(f"wrote the stage-{args.stage} {'adapter' if args.stage == 1 else 'model'} to {args.output} after {step} "
            f"steps; {dropped} samples dropped while training (an unreadable image, or too long with that epoch's prompt)")
        metrics.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
