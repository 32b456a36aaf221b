"""Reading and writing checkpoint folders: the one loader behind every `from_pretrained`.

The towers of Qilin-Med-VL (paper section 4.1: a CLIP vision encoder, an adapter and a LLaMA-2 language
model) are published as Hugging Face folders: a `config.json` next to the weights, in one of three forms:

    model.safetensors                                  one file
    model-00001-of-00003.safetensors ... + model.safetensors.index.json   shards
    pytorch_model.bin  or  pytorch_model-0000k-of-0000n.bin (+ .index.json)  older PyTorch zips

Loading follows three rules:
  1. Build the module on the `meta` device (no memory), then *assign* the checkpoint's tensors
     as its parameters, so loading holds about one copy of the weights, not two.
  2. Memory-map the files: a tensor's bytes are read from disk only when first touched.
  3. Be strict: every missing, unexpected or mis-shaped key is an error that names the key and
     the file. A silent partial load trains or chats with random weights.

Then come the whole model's four folder layouts (model.py builds the model), and last train.py's run folders.
"""

import json
import math
import os
import shutil
import zipfile
from collections import namedtuple

import torch
import torch.distributed as dist
from safetensors.torch import save_file

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message says why."""


# The tensors of a checkpoint folder: key -> tensor, and key -> the file it came from.
Weights = namedtuple("Weights", "tensors files folder")


def read_config(folder, quantized=False):
    """The folder's config.json as a dict. A quantized model's (quantize.py) is refused unless `quantized`: only chat
    and the commands built on it load one; training and export need the full-precision weights."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json (a checkpoint folder holds config.json next to its weights)")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if config.get("quantization") and not quantized:
        raise CheckpointError(f"{folder}: a quantized model ({config['quantization']}), which only chat.py loads; "
                              f"give the full-precision folder it was quantized from")
    return config


def weight_files(folder):
    """The weight files of a folder, in shard order (name order if unindexed); safetensors before .bin."""
    names = set(os.listdir(folder))
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = single + ".index.json"
        if index in names:
            try:
                with open(os.path.join(folder, index)) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                raise CheckpointError(f"{folder}/{index}: not a valid index (expected JSON with a weight_map)") from None
            if missing := [s for s in shards if s not in names]:
                raise CheckpointError(f"{folder}/{index} names shard files that are not there: {missing}")
            return shards
        if single in names:
            return [single]
    for ext in (".safetensors", ".bin"):  # shards without an index (some hand-made folders)
        if shards := sorted(n for n in names if n.endswith(ext) and n.startswith(("model", "pytorch_model"))):
            return shards
    raise CheckpointError(f"{folder}: no weights found (expected model*.safetensors or pytorch_model*.bin; "
                          f"found {sorted(names)})")


def read_safetensors(path):
    """Memory-map one safetensors file: {key: tensor} viewing the file's bytes, no copy. The format is an
    8-byte little-endian header length, a JSON header {key: {dtype, shape, data_offsets: [begin, end]}},
    then the raw bytes. The mapping is private (copy-on-write): writing to a parameter never touches the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes; its header alone needs {8 + n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    tensors = {}
    for key, v in header.items():
        if (dtype := SAFETENSORS_DTYPES.get(v["dtype"])) is None:
            raise CheckpointError(f"{path}: tensor {key} has dtype {v['dtype']}, which this loader does not read")
        begin, stop = [8 + n + offset for offset in v["data_offsets"]]  # offsets count from the header's end
        if stop - begin != math.prod(v["shape"]) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {key} has {stop - begin} bytes for shape {v['shape']} of {v['dtype']}")
        if stop > size:
            raise CheckpointError(f"{path}: truncated safetensors file ({key} needs {stop} bytes, has {size})")
        raw = torch.tensor([], dtype=torch.uint8).set_(storage, begin, (stop - begin,))  # the bytes
        aligned = begin % dtype.itemsize == 0  # if not (rare, mixed dtypes), copy them out to view them
        tensors[key] = (raw if aligned else raw.clone()).view(dtype).reshape(v["shape"])
    return tensors


def read_bin(path):
    """One PyTorch .bin shard, tensors only (weights_only); memory-mapped unless in the old, non-zip format."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0]})") from None


def read_weights(folder):
    """Every tensor of a checkpoint folder, memory-mapped."""
    tensors, files = {}, {}
    for name in weight_files(folder):
        read = read_safetensors if name.endswith(".safetensors") else read_bin
        for key, t in read(os.path.join(folder, name)).items():
            tensors[key], files[key] = t, name
    return Weights(tensors, files, folder)


def assign_weights(module, weights, mapping, dtype=None, device=None, what="model"):
    """Give a meta-device `module` its parameters from `weights`, strictly. mapping: checkpoint key -> module
    key, or None for a key to ignore on purpose. Floating-point tensors are cast to `dtype` (None keeps theirs)."""
    expected = module.state_dict()  # on meta: names and shapes only
    state, unexpected, misshaped = {}, [], {}
    for key, t in weights.tensors.items():
        if (name := mapping(key)) is None:
            continue
        if name not in expected:
            unexpected.append(f"{key} (in {weights.files[key]})")
        elif t.shape != expected[name].shape:
            misshaped[name] = (f"{key} (in {weights.files[key]}): checkpoint {tuple(t.shape)}, "
                               f"{what} expects {tuple(expected[name].shape)}")
        else:
            state[name] = t
    missing = sorted(set(expected) - set(state) - set(misshaped))
    if missing or unexpected or misshaped:
        lines = [f"{weights.folder}: the checkpoint does not match the {what}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", [*misshaped.values()])):
            if keys:
                lines.append(f"  {len(keys)} {label}: " + "; ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
        raise CheckpointError("\n".join(lines))
    for name, t in state.items():  # first moved, then cast there: on a GPU no host copy
        state[name] = t.to(device).to(dtype=dtype if t.is_floating_point() else None)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def save_weights(state_dict, folder, max_shard_bytes=5 * 2**30, stem="model"):
    """A state dict as {stem}.safetensors, or if larger as shards + {stem}.safetensors.index.json (HF's layout)."""
    os.makedirs(folder, exist_ok=True)
    shards, size = [{}], 0
    for key, t in state_dict.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.detach().contiguous().cpu()
        size += t.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{stem}.safetensors" if len(shards) == 1 else f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        total = sum(t.nbytes for t in state_dict.values())
        with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_config(folder, config, tokenizer=None):
    """config.json, and a copy of the SentencePiece tokenizer.model that chat.py reads beside it."""
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(folder, "tokenizer.model"))


def write_output(folder, write):
    """Fill `folder` by `write(tmp)`, never half-written even by a crash: `write` fills a temporary folder beside it,
    whose files are then renamed into place (atomic on one filesystem), config.json last, as loaders start from it."""
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
    except BaseException:  # a failed write leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):  # config.json last
        target = os.path.join(folder, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)


# ---- the whole model's layouts: Qilin-Med-VL comes in four kinds of folder ----------------------------
#   ours      config model_type "qilin_med_vl": our parameter names as they are
#   stage 1   config model_type "qilin_med_vl_projector": projector.safetensors alone; config.json names the
#             folders of the towers it was trained against (QilinMedVL.save_projector)
#   LLaVA     keys `model.mm_projector.*` beside LLaMA's: Qilin-Med-VL-Chat as the authors released it
#             (LLaVA's LlavaLlamaForCausalLM); the CLIP tower lives in a folder of its own
#   llava-hf  keys `multi_modal_projector.*`: transformers' LlavaForConditionalGeneration
# A key table maps a checkpoint prefix to our module prefix (None: ignore the key). The first matching row wins;
# the rest goes through that tower's own map (vit.clip_key, llama.llama_key), which strips `vision_model.` or `model.`.

LLAVA_KEYS = (
    ("model.mm_projector.", "projector."),
    ("model.vision_tower.", None),  # a copy of the frozen CLIP some forks save: the CLIP folder's is used
    ("", "llm."),  # the rest is a LLaMA checkpoint: model.layers.*, lm_head.*
)
LLAVA_HF_KEYS = (
    ("vision_tower.", "vision."),  # transformers 4 (and 5, which writes these names)
    ("multi_modal_projector.linear_1.", "projector.0."),
    ("multi_modal_projector.linear_2.", "projector.2."),
    ("language_model.", "llm."),
    ("model.vision_tower.", "vision."),  # transformers >= 4.52: towers under `model.`, lm_head on top
    ("model.multi_modal_projector.linear_1.", "projector.0."),
    ("model.multi_modal_projector.linear_2.", "projector.2."),
    ("model.language_model.", "llm."),
    ("lm_head.", "llm.lm_head."),
)


def table_key_map(table, tower_keys):
    """A key map for assign_weights from a key table; tower_keys: {"vision": clip_key, "llm": llama_key}.
    A key no row matches is kept as it is, so that assign_weights names it as unexpected."""
    def key_map(key):
        for prefix, ours in table:
            if key.startswith(prefix):
                name = ours and tower_keys.get(ours.split(".")[0], lambda k: k)(key.removeprefix(prefix))
                return name and ours + name
        return key
    return key_map


def detect_layout(config, weights, vision_path=None):
    """The layout, "qilin_med_vl", "llava" or "llava_hf", from config.json and the key names (stage 1's folder is
    told by its config alone, before any weights are read). vision_path, a separate CLIP folder, fits only "llava"."""
    kind = config.get("model_type")
    llava_hf = any(k.startswith(("multi_modal_projector.", "model.multi_modal_projector.")) for k in weights.tensors)
    if vision_path is not None and (kind == "qilin_med_vl" or llava_hf):
        raise CheckpointError(f"{weights.folder}: this checkpoint carries its own vision tower; a separate vision "
                              f"folder ({vision_path}) is only for LLaVA-layout checkpoints and stage-1 outputs")
    if kind == "qilin_med_vl":
        return "qilin_med_vl"
    if any(k.startswith("model.mm_projector.") for k in weights.tensors):
        return "llava"
    if llava_hf:
        return "llava_hf"
    prefixes = sorted({".".join(k.split(".")[:2]) for k in weights.tensors})[:10]
    raise CheckpointError(f"{weights.folder}: not a Qilin-Med-VL, LLaVA or llava-hf checkpoint (config model_type "
                          f"{kind!r}; weight keys start with {prefixes})")


def llava_vision_path(config, folder, vision_path=None):
    """Where a LLaVA-layout checkpoint's CLIP tower is: vision_path, or `mm_vision_tower` if that is a
    local folder (the release names the hub id openai/clip-vit-large-patch14-336)."""
    vision_path = vision_path or config.get("mm_vision_tower")
    if not vision_path or not os.path.isdir(vision_path):
        raise CheckpointError(f"{folder}: this LLaVA-layout checkpoint keeps its CLIP tower elsewhere "
                              f"(config says mm_vision_tower={config.get('mm_vision_tower')!r}); pass the local "
                              f"CLIP ViT-L/14-336 folder as vision_path (--vision DIR)")
    return vision_path


def from_llava_config(config, folder, vision_path, vision_dim):
    """QilinConfig's fields but the towers, from a LLaVA config.json (LLaMA's fields and `mm_*` ones)."""
    if config.get("mm_hidden_size", vision_dim) != vision_dim:
        raise CheckpointError(f"{vision_path}: vision tower width {vision_dim} does not match the "
                              f"checkpoint's mm_hidden_size {config['mm_hidden_size']} ({folder})")
    return dict(projector=config.get("mm_projector_type", "linear"),
                select_layer=config.get("mm_vision_select_layer", -2),
                image_fit="pad" if config.get("image_aspect_ratio") == "pad" else "crop", style="release")


def from_llava_hf_config(config, folder):
    """The same from a llava-hf config.json (the towers' own are its vision_config and text_config)."""
    if config.get("vision_feature_select_strategy", "default") != "default":
        raise CheckpointError(f"{folder}: vision_feature_select_strategy {config['vision_feature_select_strategy']!r} "
                              f"is not supported (LLaVA drops the class token: 'default')")
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"{folder}: vision_feature_layer {layer!r}: only one layer is supported")
    processor = os.path.join(folder, "preprocessor_config.json")  # pad or crop, as the image processor does
    do_pad = json.load(open(processor)).get("do_pad", True) if os.path.isfile(processor) else True
    fit = config.get("image_fit", "pad" if do_pad else "crop")  # our export records the fit and the prompt style
    return dict(projector="mlp2x_gelu", select_layer=layer, image_fit=fit, style=config.get("prompt_style", "release"))


# ---- stage 1's output: the adapter alone ------------------------------------------------------------

def load_projector(projector, path, dtype=None, device=None):
    """The adapter from stage 1's output folder, or from LLaVA's `mm_projector.bin`."""
    if os.path.isdir(path):
        file = os.path.join(path, "projector.safetensors")
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: no projector.safetensors (is this a stage-1 output folder?)")
        tensors, key_map = read_safetensors(file), lambda k: k
    else:  # LLaVA names them `model.mm_projector.0.weight`, ...
        file, tensors, key_map = path, read_bin(path), lambda k: k.split("mm_projector.")[-1]
    weights = Weights(tensors, {k: os.path.basename(file) for k in tensors}, os.path.dirname(file))
    assign_weights(projector, weights, key_map, dtype, device, what="projector")


def read_stage1_config(folder, projector=None):
    """Stage 1's config.json, checked: stage 2 takes its adapter (shaped `projector`, if given), towers and prompts."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder (run stage 1 first: its --output starts stage 2)")
    config = read_config(folder)
    if config.get("model_type") != "qilin_med_vl_projector":
        raise CheckpointError(f"{folder}: config.json is not a stage-1 output "
                              f"(model_type {config.get('model_type')!r}, expected 'qilin_med_vl_projector')")
    if missing := [key for key in ("projector", "style", "vision_path", "llm_path") if key not in config]:
        raise CheckpointError(f"{folder}/config.json lacks {', '.join(missing)} "
                              f"(it was not written by this train.py's stage 1)")
    if projector not in (None, config["projector"]):
        raise CheckpointError(f"--projector {projector} but {folder} holds a {config['projector']!r} adapter")
    return config


# ---- train.py's run folder: args.json, metrics.jsonl, checkpoints/step-N, then the trained model ----------
# A checkpoint is DeepSpeed's resumable state (engine, optimizer, scheduler, our step counters) and run.json,
# the settings a resumed run must share; `checkpoints/latest` names the newest complete one.

# What --resume must find unchanged in a checkpoint's run.json: data order, lr schedule, DeepSpeed's layout
# (train.py adds lora.SETTINGS)
RUN_SETTINGS = ("stage", "zero", "precision", "max_length", "style", "projector", "image_fit", "batch_size",
                "grad_accum", "epochs", "max_steps", "lr", "warmup_ratio", "weight_decay", "grad_clip", "seed")


def latest_checkpoint(folder):
    """The tag `checkpoints/latest` points to, or None."""
    path = os.path.join(folder, "checkpoints", "latest")
    return open(path).read().strip() if os.path.isfile(path) else None


def check_output_folder(folder, resume, overwrite):
    """Refuse to mix two runs in one folder; --resume needs a checkpoint to resume from."""
    if resume and latest_checkpoint(folder) is None:
        raise CheckpointError(f"--resume: {folder} has no checkpoints/latest to resume from (was it run with "
                              f"--save-every?)")
    if not resume and not overwrite and os.path.isdir(folder) and os.listdir(folder):
        raise CheckpointError(f"{folder} already holds another run ({', '.join(sorted(os.listdir(folder))[:5])}); "
                              f"pass --resume to continue it, --overwrite to replace it, or choose another --output")


def check_resume(folder, run):
    """Stop before anything is written if the latest checkpoint's run.json differs from `run`."""
    tag = latest_checkpoint(folder)
    path = os.path.join(folder, "checkpoints", tag, "run.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume: {path} is missing, so {folder}/checkpoints/{tag} is not a complete checkpoint")
    with open(path) as f:
        saved = json.load(f)
    if changed := [f"{key} was {saved.get(key)!r}, now {value!r}" for key, value in run.items() if saved.get(key) != value]:
        raise CheckpointError(f"cannot resume {folder}/checkpoints/{tag}: this run's settings differ from the "
                              f"checkpoint's ({'; '.join(changed)}). Resume with the same settings, or start a new run "
                              f"with --overwrite or another --output")


def prepare_output(folder, overwrite, args):
    """The run folder, made (or emptied, to overwrite) by rank 0 once every input has been checked."""
    if dist.get_rank() == 0:
        if overwrite:
            shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "args.json"), "w") as f:
            json.dump(args, f, indent=2)
    dist.barrier()


def save_checkpoint(engine, folder, state, run):
    """A resumable checkpoint under a new tag; `latest` moves to it only once every rank is done, and older
    ones are deleted. Frozen weights are left out (a resume rebuilds them from the towers), and no random state is
    saved: data order and prompts are seeded by the epoch, and train.py seeds each step (LoRA's dropout) by its number."""
    root, tag = os.path.join(folder, "checkpoints"), f"step-{state['step']:08d}"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)  # half-written by a crashed run
    dist.barrier()
    engine.save_checkpoint(root, tag=tag, client_state=state, save_latest=False, exclude_frozen_parameters=True)
    dist.barrier()  # every rank has written its part of this tag
    if rank0:
        with open(os.path.join(root, tag, "run.json"), "w") as f:
            json.dump(run, f, indent=2)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))  # DeepSpeed's pointer format
        for old in os.listdir(root):
            if old.startswith("step-") and old != tag:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def resume(engine, folder):
    """Restore engine, optimizer and scheduler from the latest checkpoint: (tag, train.py's step counters).
    metrics.jsonl keeps the steps up to the checkpoint (those after it run again), without a last line that a kill
    left half-written."""
    tag = latest_checkpoint(folder)
    path, state = engine.load_checkpoint(os.path.join(folder, "checkpoints"), tag=tag, load_module_strict=False)
    if path is None:
        raise CheckpointError(f"{folder}/checkpoints/{tag}: DeepSpeed could not load this checkpoint")
    metrics = os.path.join(folder, "metrics.jsonl")
    if dist.get_rank() == 0 and os.path.isfile(metrics):
        with open(metrics) as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= state["step"]]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics + ".tmp", metrics)
    return tag, {k: state[k] for k in ("step", "epoch", "micro_done", "dropped")}
