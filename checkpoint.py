"""Reading and writing checkpoint folders: the one loader behind every `from_pretrained`.

The towers of Qilin-Med-VL (paper section 4.1: a CLIP vision encoder, an adapter and a LLaMA-2
language model) are published as Hugging Face folders: a `config.json` next to the weights, in
one of three forms:

    model.safetensors                                  one file
    model-00001-of-00003.safetensors ... + model.safetensors.index.json   shards
    pytorch_model.bin  or  pytorch_model-0000k-of-0000n.bin (+ .index.json)  older PyTorch zips

Loading follows three rules:
  1. Build the module on the `meta` device (no memory), then *assign* the checkpoint's tensors
     as its parameters, so loading holds about one copy of the weights, not two.
  2. Memory-map the files: a tensor's bytes are read from disk only when first touched.
  3. Be strict: every missing, unexpected or mis-shaped key is an error that names the key and
     the file. A silent partial load trains or chats with random weights.
"""

import json
import os
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

# Element types of the safetensors format (its JSON header spells them like this).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message says why."""


@dataclass
class Weights:
    """The tensors of a checkpoint folder: key -> tensor, and key -> the file it came from."""
    tensors: dict
    files: dict
    folder: str


def read_config(folder):
    """The folder's config.json as a dict."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json (a checkpoint folder holds config.json next to its weights)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def weight_files(folder):
    """The weight files of a folder, in shard order. safetensors is preferred over .bin."""
    names = set(os.listdir(folder))
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if index in names:
            try:
                with open(os.path.join(folder, index)) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                raise CheckpointError(f"{folder}/{index}: not a valid index (expected JSON with a weight_map)") from None
            missing = [s for s in shards if s not in names]
            if missing:
                raise CheckpointError(f"{folder}/{index} names shard files that are not there: {missing}")
            return shards
        if single in names:
            return [single]
    # Shards without an index (some hand-made folders): take them in name order.
    for ext in (".safetensors", ".bin"):
        shards = sorted(n for n in names if n.endswith(ext) and n.startswith(("model", "pytorch_model")))
        if shards:
            return shards
    raise CheckpointError(f"{folder}: no weights found (expected model*.safetensors or pytorch_model*.bin; "
                          f"found {sorted(names)})")


def read_safetensors(path):
    """Memory-map one safetensors file: {key: tensor} viewing the file's bytes, no copy.

    The format is an 8-byte little-endian header length, a JSON header
    {key: {dtype, shape, data_offsets: [begin, end]}}, then the raw tensor bytes.
    The mapping is private (copy-on-write): writing to a parameter never touches the file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if data_start + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file (needs {data_start + end} bytes, has {size})")
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    tensors = {}
    for key, v in header.items():
        if v["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has dtype {v['dtype']}, which this loader does not read")
        dtype = SAFETENSORS_DTYPES[v["dtype"]]
        begin, stop = v["data_offsets"]
        itemsize = torch.tensor([], dtype=dtype).element_size()
        if (data_start + begin) % itemsize == 0:  # aligned: a view into the mapping
            t = torch.tensor([], dtype=dtype).set_(storage, (data_start + begin) // itemsize, v["shape"])
        else:  # unaligned (rare, mixed dtypes): copy these bytes out
            t = torch.frombuffer(bytearray(storage[data_start + begin:data_start + stop]), dtype=dtype)
            t = t.reshape(v["shape"])
        tensors[key] = t
    return tensors


def read_bin(path):
    """One PyTorch .bin shard, memory-mapped, unpickling tensors only (weights_only)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # files in the old, non-zip format cannot be mapped: read them whole
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0]})") from None


def read_weights(folder):
    """Every tensor of a checkpoint folder, memory-mapped."""
    tensors, files = {}, {}
    for name in weight_files(folder):
        path = os.path.join(folder, name)
        shard = read_safetensors(path) if name.endswith(".safetensors") else read_bin(path)
        for key, t in shard.items():
            tensors[key], files[key] = t, name
    return Weights(tensors, files, folder)


def assign_weights(module, weights, mapping, dtype=None, device=None, what="model"):
    """Give a meta-device `module` its parameters from `weights`, strictly.

    mapping: checkpoint key -> module key, or None for a key to ignore on purpose.
    Floating-point tensors are cast to `dtype` (None keeps the checkpoint's dtype).
    """
    expected = module.state_dict()  # on meta: names and shapes only
    state, unexpected, misshaped, wrong = {}, [], [], set()
    for key, t in weights.tensors.items():
        name = mapping(key)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(f"{key} (in {weights.files[key]})")
        elif tuple(t.shape) != tuple(expected[name].shape):
            wrong.add(name)
            misshaped.append(f"{key} (in {weights.files[key]}): checkpoint {tuple(t.shape)}, "
                             f"{what} expects {tuple(expected[name].shape)}")
        else:
            state[name] = t
    missing = sorted(set(expected) - set(state) - wrong)
    if missing or unexpected or misshaped:
        lines = [f"{weights.folder}: the checkpoint does not match the {what}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if keys:
                lines.append(f"  {len(keys)} {label}: " + "; ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
        raise CheckpointError("\n".join(lines))
    for name, t in state.items():
        t = t.to(device) if device is not None else t  # first moved, then cast there: on a GPU no host copy
        state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    module.load_state_dict(state, strict=True, assign=True)
    return module


def save_weights(state_dict, folder, max_shard_bytes=5 * 2**30):
    """Write a state dict as safetensors shards + model.safetensors.index.json (HF's layout)."""
    os.makedirs(folder, exist_ok=True)
    shards, current, size = [], {}, 0
    for key, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t.detach().contiguous().cpu()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
