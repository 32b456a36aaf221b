"""Train Qilin-Med-VL in two stages with DeepSpeed (paper section 4.2, hyperparameters section 5.2).

Stage 1, feature alignment (ZeRO-2): only the adapter learns, from image-caption pairs. Stage 2, instruction
tuning (ZeRO-3): the adapter and the LLM learn to answer questions about images. The vision tower never trains.

    torchrun --nproc_per_node 8 train.py --stage 1 --vision CLIP_DIR --llm LLAMA_DIR --data ... --output runs/stage1
    torchrun --nproc_per_node 8 train.py --stage 2 --stage1-output runs/stage1 --data ... --output runs/stage2

Reading order: `main` at the bottom (setup, the loop, the save); `train_step` is one optimizer step.
"""

import argparse
import contextlib
import ctypes
import io
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
import warnings
from functools import partial

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoint import (RUN_SETTINGS, CheckpointError, check_output_folder, check_resume, latest_checkpoint,
                        prepare_output, read_config, read_stage1_config, resume, save_checkpoint)
from data import MAX_IMAGE_PIXELS, SAMPLES, ChiMedDataset, Tokenizer, collate, length_grouped_batches
import llama
import lora
from llama import LlamaArgs
from model import QilinConfig, QilinMedVL
from vit import VisionArgs

# Paper section 5.2, per stage; --demo replaces them with values that train a tiny model on a CPU.
PAPER = {1: dict(batch_size=32, lr=1e-3, zero=2), 2: dict(batch_size=16, lr=2e-5, zero=3)}
DEMO = {1: dict(batch_size=4, lr=2e-3, epochs=10, zero=2, num_workers=0, max_length=512, warmup_ratio=0.1,
                output="runs/demo-stage1"),
        2: dict(batch_size=4, lr=1e-3, epochs=60, zero=3, num_workers=0, max_length=512, warmup_ratio=0.1,
                output="runs/demo-stage2", stage1_output="runs/demo-stage1")}
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "A800": 312, "L40S": 362}  # dense bf16, by datasheet
EPILOG = """
metrics.jsonl: one line per optimizer step (the README lists its fields). DeepSpeed's own monitors are switched on
with --deepspeed-config, e.g. {"csv_monitor": {"enabled": true, "output_path": "runs/csv", "job_name": "stage2"}}
"""


def arg_parser():
    demo = "\n".join(f"  stage {stage}: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())
                     for stage, values in DEMO.items())  # made from DEMO, so that --help cannot drift from it
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"\n--demo defaults (data and images from samples/):\n{demo}\n{EPILOG}")
    p.error = fail  # a bad flag: one line, and under torchrun its error file too, not the usage once per rank
    p.add_argument("--stage", type=int, choices=(1, 2), required=True, help="1: the adapter learns (feature alignment); "
                   "2: the adapter and the LLM (instruction tuning)")
    p.add_argument("--demo", action="store_true", help="tiny random towers, samples/ data, CPU-sized defaults (below)")
    g = p.add_argument_group("model and data")
    g.add_argument("--vision", help="CLIP ViT-L/14-336 folder (config.json + weights); stage 2: default from stage 1")
    g.add_argument("--llm", help="LLaMA-2 folder (config.json, weights, tokenizer.model); stage 2: default from stage 1")
    g.add_argument("--stage1-output", help="stage 2: the folder stage 1 wrote (its adapter starts stage 2)")
    g.add_argument("--data", help="LLaVA-format JSON or JSONL file of samples")
    g.add_argument("--image-root", help="folder the samples' image paths are relative to")
    g.add_argument("--output", help="run folder: metrics, checkpoints and the trained model")
    g.add_argument("--style", choices=("paper", "release"), help="prompts: the paper's in the v1 template, or LLaVA's "
                   "plain (stage 1) and v1 as released (default paper; stage 2: stage 1's)")
    g.add_argument("--projector", choices=("linear", "mlp2x_gelu"), help="the paper's linear adapter or the release's "
                   "2-layer MLP (default linear; stage 2: stage 1's)")
    g.add_argument("--image-fit", choices=("pad", "crop"), help="default: crop in stage 1, pad in stage 2, as released")
    g.add_argument("--max-length", type=int, help="longest sequence, image features included (default 2048)")
    g.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N",
                   help=f"refuse images whose header says more pixels (default {MAX_IMAGE_PIXELS}, about a gigapixel)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="samples per GPU per micro-step (default 32 stage 1, 16 stage 2)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 stage 1, 2e-5 stage 2)")
    g.add_argument("--epochs", type=int, help="passes over the data (default 1)")
    g.add_argument("--max-steps", type=int, help="stop after N optimizer steps (the lr schedule ends there)")
    g.add_argument("--warmup-ratio", type=float, help="fraction of the steps spent warming up (default 0.03)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (default 1.0, as LLaVA)")
    g.add_argument("--seed", type=int, default=42, help="data order, paper prompt choice, demo towers (default 42)")
    g = p.add_argument_group("system")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default 2 in stage 1, 3 in stage 2)")
    g.add_argument("--offload", choices=("none", "optimizer", "all"), default="none",
                   help="keep the Adam states (optimizer), with ZeRO-3 also the weights (all), in CPU memory")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each LLM block in the backward pass instead of storing its activations")
    g.add_argument("--compile", action="store_true", help="torch.compile the work between the LLM's matmuls (RMSNorm "
                   "in float32, RoPE, SwiGLU) into fused kernels; costs a minute of compiling at the start")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 weights with fp32 master copies and tf32 matmuls on GPU, fp32 on CPU")
    g.add_argument("--deepspeed-config", metavar="FILE", help="JSON merged over deepspeed_config()'s (example below)")
    g.add_argument("--num-workers", type=int, help="DataLoader processes per GPU reading images (default 4)")
    g.add_argument("--peak-tflops", type=float, help="one GPU's dense bf16 peak TFLOP/s for MFU (default by name: "
                   + ", ".join(f"{k} {v}" for k, v in PEAK_TFLOPS.items()) + "; 312 for another GPU; none on a CPU)")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save-every", type=int, default=500, help="save a resumable checkpoint every N steps (default 500)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="delete a previous run in --output and start afresh")
    g.add_argument("--log-sample-ids", action="store_true", help="record each step's sample ids in metrics.jsonl")
    lora.add_flags(p)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # DeepSpeed's launcher adds it
    return p


def parse_args(argv=None):
    """The command line, with the defaults filled in (demo, then paper; stage 2 takes stage 1's) and checked."""
    p = arg_parser()
    args = p.parse_args(argv)
    defaults = dict(PAPER[args.stage], epochs=1, warmup_ratio=0.03, max_length=2048, num_workers=4,
                    **lora.check_args(p, args))  # --lora's checks, and its lr default (LLaVA's), below the demo's
    if args.demo:
        defaults.update(DEMO[args.stage], data=str(SAMPLES / f"stage{args.stage}.json"), image_root=str(SAMPLES / "images"))
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for flag in ("batch_size", "grad_accum", "save_every", "epochs", "max_steps", "max_image_pixels"):
        if (value := getattr(args, flag)) is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, not {value}")
    if not args.lr > 0:
        p.error(f"--lr must be above 0, not {args.lr}")
    if not 0 <= args.warmup_ratio < 1:
        p.error(f"--warmup-ratio must be at least 0 and below 1, not {args.warmup_ratio}")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --output and --overwrite deletes it: choose one")
    for flag in ("data", "image_root", "output"):
        if getattr(args, flag) is None:
            fail(f"--{flag.replace('_', '-')} is required (or --demo)")
    if args.stage == 2 and args.stage1_output is None:
        fail("stage 2 starts from stage 1's adapter: pass --stage1-output DIR (the --output of your stage-1 run)")
    if args.stage == 1 and not args.demo and (args.vision is None or args.llm is None):
        fail("stage 1 needs the official towers: --vision CLIP_FOLDER --llm LLAMA_FOLDER (or --demo)")
    return args


def fail(message):
    """Stop with a message for a person, exit status 2. It also goes to torchrun's error file, so that
    torchrun's report shows it as the root cause instead of "To enable traceback see ..."."""
    if rank_zero():
        print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            json.dump({"message": f"train.py: error: {message}", "timestamp": int(time.time())}, f)
    sys.exit(2)


def rank_zero():
    return int(os.environ.get("RANK", 0)) == 0


def log(message):
    if rank_zero():
        tqdm.write(message)


def setup_process():
    """(rank, world size, device) of this process, and the settings the run needs."""
    launched = "LOCAL_RANK" in os.environ  # torchrun or DeepSpeed's launcher; else `python train.py`, one process
    for key, value in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=29500).items():
        os.environ.setdefault(key, str(value))
    if launched and sys.platform.startswith("linux"):
        # torchrun starts each worker in a session of its own, so `kill -9` of torchrun would leave
        # them training and writing checkpoints. Ask the kernel to kill this worker with its parent.
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not torch.cuda.is_available():
        return rank, world, torch.device("cpu")
    torch.cuda.set_device(local_rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # cuDNN's attention plans its kernels anew for every sequence length, and every batch has a
    # new one: that alone cost a third of the step. Flash attention (then memory-efficient) needs no plan.
    torch.backends.cuda.enable_cudnn_sdp(False)
    return rank, world, torch.device("cuda", local_rank)


# ----------------------------------------------------------------------------- model and data

def build_model(args, dtype, device=None):
    """(model, tokenizer path): the towers from their folders (the demo's random), the adapter fresh or stage 1's,
    cast on `device` (no host copy of 13B is converted). --projector, --style, --vision and --llm
    default to stage 1's in stage 2 (its adapter fits only those towers, shape and prompts), else the paper's."""
    if args.stage == 2:
        s1 = read_stage1_config(args.stage1_output, args.projector)
        args.projector, args.style = s1["projector"], args.style or s1["style"]
        args.vision, args.llm = args.vision or s1["vision_path"], args.llm or s1["llm_path"]
    args.projector, args.style = args.projector or "linear", args.style or "paper"
    args.image_fit = args.image_fit or ("crop" if args.stage == 1 else "pad")
    if args.demo and args.stage == 1 and args.vision is None:
        tokenizer = str(SAMPLES / "tokenizer.model")
        vision, llm = VisionArgs.preset("demo"), LlamaArgs.preset("demo")
        llm.vocab_size = Tokenizer(tokenizer).vocab_size
    else:
        if args.vision is None or args.llm is None:
            raise CheckpointError("no --vision / --llm folder given, and stage 1 recorded none")
        tokenizer = os.path.join(lora.base_folder(args.llm), "tokenizer.model")  # not a LoRA run, not a whole model
        vision, llm = VisionArgs.from_hf_config(read_config(args.vision)), LlamaArgs.from_hf_config(read_config(args.llm))
    config = QilinConfig(projector=args.projector, image_fit=args.image_fit, style=args.style, vision=vision, llm=llm)
    torch.manual_seed(args.seed)  # random parts (the adapter; the demo's towers) are the same on every rank
    adapter = args.stage1_output if args.stage == 2 else None
    return QilinMedVL.from_parts(config, args.vision, args.llm, adapter, dtype, device), tokenizer


def load_everything(args, dtype, device):
    """(model, tokenizer path, tokenizer, dataset, run settings): every input checked on every rank before any
    process waits for another or anything is written."""
    try:
        check_output_folder(args.output, args.resume, args.overwrite)
        if not os.path.isfile(args.data):
            raise FileNotFoundError(f"--data {args.data}: no such file")
        if not os.path.isdir(args.image_root):
            raise FileNotFoundError(f"--image-root {args.image_root}: no such folder")
        model, tokenizer_path = build_model(args, dtype, device)
        tokenizer, vocab = Tokenizer(tokenizer_path), model.config.llm.vocab_size
        if tokenizer.vocab_size != vocab:
            raise ValueError(f"{tokenizer_path} has {tokenizer.vocab_size} pieces but the LLM's vocabulary is {vocab}")
        dataset = ChiMedDataset(data_path=args.data, image_root=args.image_root, tokenizer=tokenizer, stage=args.stage,
                                style=args.style, image_size=model.config.vision.image_size, image_fit=args.image_fit,
                                max_length=args.max_length, num_image_tokens=model.num_image_tokens, seed=args.seed,
                                max_image_pixels=args.max_image_pixels)
        if len(dataset) == 0:
            hint = f" (are the images under --image-root {args.image_root}?)" if dataset.skipped["missing_image"] else ""
            raise ValueError(f"no sample to train on: {dataset.report()}{hint}")
        run = dict({k: getattr(args, k) for k in RUN_SETTINGS + lora.SETTINGS}, world_size=int(os.environ["WORLD_SIZE"]),
                   data=os.path.abspath(args.data), samples=len(dataset))
        if args.resume:
            check_resume(args.output, run)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        fail(f"a config.json lacks the key {e}" if isinstance(e, KeyError) else str(e))
    return model, tokenizer_path, tokenizer, dataset, run


def epoch_batches(dataset, args, world, rank, epoch):
    """This rank's micro-batches of one epoch, a pure function of (seed, epoch, rank) so that a resumed
    run finds the same ones; a last, partial accumulation is dropped."""
    dataset.set_epoch(epoch)  # paper style: fresh prompts each epoch (data.py)
    batches = length_grouped_batches(dataset.lengths, args.batch_size, world, rank, args.seed, epoch)
    return batches[:len(batches) // args.grad_accum * args.grad_accum]


# ----------------------------------------------------------------------------- DeepSpeed

def deepspeed_config(args, world_size, on_gpu, llm_args=LlamaArgs()):
    """The whole DeepSpeed configuration, in one place; --deepspeed-config merges over it."""
    zero = {"stage": args.zero, "overlap_comm": on_gpu}  # reduce gradients while the backward pass goes on
    if args.zero == 3:
        block = llm_args.flops_per_token(0, backward=False, lm_head=False) // 2 // llm_args.n_layers  # weights: 2 FLOPs each
        zero.update(stage3_prefetch_bucket_size=int(1.5 * block),  # gather the next block while this one computes
                    # norm weights, biases: too small to be worth a collective each; every GPU keeps them whole
                    stage3_param_persistence_threshold=10 * llm_args.dim,
                    reduce_bucket_size=block)  # reduce a block's gradients as soon as its backward is done
    if args.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if args.offload == "all" and args.zero == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    # torch's AdamW (fused on GPU) needs no compiled extension; offloaded, DeepSpeed's CPU Adam is much faster
    adam = dict(lr=args.lr, betas=[0.9, 0.999], eps=1e-8, weight_decay=args.weight_decay,
                torch_adam=args.offload == "none", **({"fused": True} if on_gpu and args.offload == "none" else {}))
    config = dict(train_micro_batch_size_per_gpu=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                  train_batch_size=args.batch_size * args.grad_accum * world_size, gradient_clipping=args.grad_clip,
                  optimizer={"type": "AdamW", "params": adam}, bf16={"enabled": args.precision == "bf16"},
                  zero_optimization=zero, steps_per_print=10**9)  # progress goes to the bar and metrics.jsonl instead
    if args.deepspeed_config:  # its keys win; a section such as zero_optimization is merged key by key
        with open(args.deepspeed_config) as f:
            for key, value in json.load(f).items():
                config[key] = {**config[key], **value} if isinstance(config.get(key), dict) else value
    return config


def warmup_cosine(step, warmup_steps, total_steps):
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup from 0, then half a cosine
    to 0, as transformers' get_cosine_schedule_with_warmup (which LLaVA and the Qilin-Med-VL release used)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def start_deepspeed(model, args, world, device, total_steps):
    """The DeepSpeed engine (ZeRO sharding, bf16, AdamW) and the lr schedule around the model."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # so DeepSpeed does not warn in every process; rank 0 notes:
        from torch.utils.cpp_extension import _get_build_directory  # torch's cache of compiled extensions
        built = os.listdir(_get_build_directory("deepspeed_shm_comm", verbose=False))  # DeepSpeed's CPU collectives
        if rank_zero() and not any(name.endswith(".so") for name in built):
            print("DeepSpeed on the CPU: building its shared-memory communication extension, once (about 30 s; "
                  "cached in TORCH_EXTENSIONS_DIR)", flush=True)
    import deepspeed  # here, so that `--help` and the input checks answer without its start-up cost
    deepspeed.utils.logger.setLevel(logging.WARNING)  # its config dump and per-step notes would drown the bar
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")  # DeepSpeed's calls
    with contextlib.redirect_stdout(io.StringIO()) if not rank_zero() else contextlib.nullcontext():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")  # its notes: once
    lora.apply(model.set_trainable(args.stage), args)  # with --lora: the LLM frozen, LoRA pairs added
    model.llm.gradient_checkpointing = args.gradient_checkpointing
    llama.fuse_pointwise(args.compile)
    schedule = partial(warmup_cosine, warmup_steps=math.ceil(args.warmup_ratio * total_steps), total_steps=total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=lora.param_groups(model, args),
        config=deepspeed_config(args, world, device.type == "cuda", model.config.llm),
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, schedule))
    return engine, scheduler


def train_step(engine, micro_batches, weight_grads, llm_args):
    """One optimizer step: forward and backward of each micro-batch, then clipping and AdamW. The one wait for the device
    is the sum over ranks before the update, to stop before a non-finite loss is applied. Returns that sum: loss,
    micro-steps that learned something, tokens, FLOPs (weight_grads: the LLM's, not in stage 1 or LoRA), dropped samples."""
    loss_sum = torch.zeros((), device=engine.device)
    counts = torch.zeros(4, dtype=torch.float64)  # micro-steps, tokens, FLOPs, dropped: known on the host
    for k, batch in enumerate(micro_batches):
        inputs = {name: t.to(engine.device, non_blocking=True) for name, t in batch.items() if torch.is_tensor(t)}
        _, loss = engine(**inputs)  # collate's tensors are the model's inputs; the loss: the learned tokens' mean
        engine.backward(loss)
        if k < len(micro_batches) - 1:
            engine.step()  # DeepSpeed counts micro-steps; only the last one of an accumulation updates
        loss_sum += loss.detach()
        counts += torch.tensor([len(batch["loss_positions"]) > 0, sum(batch["lengths"]),
                                llm_args.step_flops(batch["lengths"], len(batch["loss_positions"]), weight_grads),
                                batch["n_dropped"]], dtype=torch.float64)
    totals = torch.cat([loss_sum.double()[None], counts.to(engine.device)])
    dist.all_reduce(totals)  # NCCL reduces GPU tensors only
    totals = totals.tolist()
    if totals[1] and not math.isfinite(totals[0]):  # NaN or infinite: the update is not applied
        raise FloatingPointError(totals[0] / totals[1])
    engine.step()  # clip, AdamW, next lr
    return totals


class Metrics:
    """metrics.jsonl and the progress bar (rank 0), from the totals train_step returns."""

    def __init__(self, args, world, device, total_steps, step, skipped):
        gpu = torch.cuda.get_device_name() if device.type == "cuda" else ""
        self.peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), 312 if gpu else None)
        self.world, self.skipped, self.log_ids, self.t = world, skipped, args.log_sample_ids, time.perf_counter()
        self.path = os.path.join(args.output, "metrics.jsonl")
        self.bar = tqdm(total=total_steps, initial=step, desc=f"stage {args.stage}", disable=not rank_zero())

    def log(self, totals, step, epoch, lr, dropped, ids):
        (loss_sum, learned, tokens, flops, _), dt = totals, time.perf_counter() - self.t
        self.pause()
        loss = loss_sum / learned if learned else None  # None: every sample of the step was dropped
        mfu = round(flops / dt / (self.peak * 1e12 * self.world), 5) if self.peak else None
        record = dict(step=step, epoch=round(epoch, 4), loss=loss, lr=lr, tokens=int(tokens),
                      tokens_per_s=round(tokens / dt, 1), skipped=self.skipped + dropped, mfu=mfu)
        if self.log_ids:
            dist.all_gather_object(every := [None] * self.world, ids)  # every rank's list
            record["ids"] = sum(every, [])
        if rank_zero():
            with open(self.path, "a") as f:
                print(json.dumps(record, ensure_ascii=False), file=f)
            self.bar.set_postfix(loss="-" if loss is None else f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}",
                                 mfu="-" if mfu is None else f"{100 * mfu:.1f}%", refresh=False)
            self.bar.update()

    def pause(self):
        self.t = time.perf_counter()  # the clock restarts: after a checkpoint's save, that is not training time


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_process()
    args.precision = ("bf16" if device.type == "cuda" else "fp32") if args.precision == "auto" else args.precision
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model, tokenizer_path, tokenizer, dataset, run = load_everything(args, dtype, device)
    steps_per_epoch = len(epoch_batches(dataset, args, world, rank, 0)) // args.grad_accum
    if steps_per_epoch == 0:
        fail(f"{len(dataset)} samples make no full step of {args.batch_size * args.grad_accum * world} samples")
    total_steps = min(args.max_steps or math.inf, args.epochs * steps_per_epoch)
    engine, scheduler = start_deepspeed(model, args, world, device, total_steps)
    prepare_output(args.output, args.overwrite, dict(vars(args), world_size=world))
    state = dict(step=0, epoch=0, micro_done=0, dropped=0)  # micro_done: this epoch's micro-batches trained
    if args.resume:
        tag, state = resume(engine, args.output)
        log(f"resumed from {args.output}/checkpoints/{tag}: step {state['step']}, epoch {state['epoch']}")
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]  # ZeRO-3: whole
    log(f"model: {sum(n for n, _ in sizes) / 1e6:.1f}M parameters, {sum(n for n, t in sizes if t) / 1e6:.2f}M trained "
        f"(stage {args.stage}); {args.precision}, ZeRO-{args.zero}, {world} processes\n{dataset.report()}")
    metrics = Metrics(args, world, device, total_steps, state["step"], sum(dataset.skipped.values()))
    collate_batch = partial(collate, pad_id=tokenizer.pad_id, image_size=model.config.vision.image_size)
    engine.train()
    try:
        while state["step"] < total_steps:  # the loop: one optimizer step per pass
            batches = epoch_batches(dataset, args, world, rank, state["epoch"])
            loader = iter(DataLoader(dataset, batch_sampler=batches[state["micro_done"]:], collate_fn=collate_batch,
                                     num_workers=args.num_workers, pin_memory=device.type == "cuda"))
            for _ in range(state["micro_done"] // args.grad_accum, len(batches) // args.grad_accum):
                micro_batches = [next(loader) for _ in range(args.grad_accum)]
                lr = scheduler.get_last_lr()[0]
                torch.manual_seed(args.seed + state["step"] * world + rank)  # LoRA dropout: a resumed step draws alike
                totals = train_step(engine, micro_batches, args.stage == 2 and not args.lora, model.config.llm)
                state["step"], state["micro_done"] = state["step"] + 1, state["micro_done"] + args.grad_accum
                state["dropped"] += int(totals[4])
                metrics.log(totals, state["step"], state["epoch"] + state["micro_done"] / len(batches), lr,
                            state["dropped"], [i for b in micro_batches for i in b["ids"]])
                if state["micro_done"] == len(batches):
                    state["epoch"], state["micro_done"] = state["epoch"] + 1, 0
                if state["step"] % args.save_every == 0 and state["step"] < total_steps:
                    save_checkpoint(engine, args.output, state, run)
                    metrics.pause()
                if state["step"] >= total_steps:
                    break
    except FloatingPointError as e:
        kept = latest_checkpoint(args.output)
        fail(f"step {state['step'] + 1}: the loss is {e}; stopping before the update. "
             + (f"The last good checkpoint is {args.output}/checkpoints/{kept}: lower --lr and --resume."
                if kept else "No checkpoint was saved yet: lower --lr and start again with --overwrite."))
    except KeyboardInterrupt:  # Ctrl-C (torchrun passes it on to every worker)
        stopped(args, state)
    metrics.bar.close()
    if args.lora:  # the LoRA weights and the adapter only: the base stays in the folders the run records
        lora.save_run(model, args, tokenizer_path, zero3=args.zero == 3)
    else:  # stage 1's towers: their folders, or None for the demo's random ones
        model.save_trained(args.output, args.stage, args.vision and (args.vision, args.llm), tokenizer_path, args.zero == 3)
    log(f"wrote the stage-{args.stage} {'LoRA run' if args.lora else 'adapter' if args.stage == 1 else 'model'} to "
        f"{args.output} after {state['step']} steps; {state['dropped']} samples dropped while training (an "
        f"unreadable image, or too long with that epoch's prompt)")
    dist.barrier()
    dist.destroy_process_group()


def stopped(args, state):
    """Ctrl-C: one line from rank 0 saying where training stopped and how to go on; exit 130."""
    if rank_zero():
        kept, local = latest_checkpoint(args.output), os.environ.get("LOCAL_WORLD_SIZE")
        again = shlex.join(a for a in sys.argv[1:] if a not in ("--overwrite", "--resume"))
        launcher = ("python" if local is None else "torchrun (with the same options, on every node)"
                    if local != os.environ["WORLD_SIZE"] else f"torchrun --nproc_per_node {local}")
        print(f"\ntrain.py: stopped at step {state['step']} (epoch {state['epoch']}); " + (
            f"the last checkpoint is {args.output}/checkpoints/{kept}; continue with: {launcher} train.py {again} "
            "--resume" if kept else "no checkpoint was saved yet (see --save-every)"), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)  # at once: the other ranks are stopping too, so no collective (and no teardown) can finish


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before the loop began
        if rank_zero():
            print("\ntrain.py: stopped before training began; nothing was written", file=sys.stderr, flush=True)
        os._exit(130)
