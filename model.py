"""Qilin-Med-VL: where the CLIP vision tower, the adapter and the LLaMA language model meet.

Paper section 4.1 (model architecture): a frozen ViT turns each image into patch features, a vision-language
adapter maps them into the LLM's embedding space, and the LLM reads them where an `<image>` placeholder stood:

    pixels (N, 3, 336, 336) --vit--> (N, 576, 1024) --projector--> (N, 576, 5120)
    input_ids (B, L) holding the image token 576 times per image
        --embed: write the features at those positions--> (B, L, 5120) --llama--> logits

The paper's adapter is "a simple linear projection layer" (`projector="linear"`); the released Qilin-Med-VL-Chat
uses LLaVA-1.5's two-layer MLP (`mlp2x_gelu`). Section 4.2's two stages differ only in what trains
(`set_trainable`); the vision tower never trains.
"""

import contextlib
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import (LLAVA_HF_KEYS, LLAVA_KEYS, CheckpointError, assign_weights, detect_layout, from_llava_config,
                        from_llava_hf_config, llava_vision_path, load_projector, read_config, read_weights,
                        save_weights, table_key_map, write_config, write_output)
from data import IMAGE_TOKEN_INDEX
from llama import Llama, LlamaArgs, llama_key
from vit import VisionArgs, VisionTransformer, clip_key

TOWER_KEYS = dict(vision=clip_key, llm=llama_key)  # each tower's own checkpoint names, for the layouts' key tables


@dataclass
class QilinConfig:
    projector: str = "linear"  # paper: "linear"; released weights: "mlp2x_gelu"
    select_layer: int = -2  # which hidden state of the ViT (-2: penultimate block, as LLaVA)
    image_fit: str = "pad"  # how images become squares: "pad" (stage 2, chat) or "crop" (see data.py)
    style: str = "paper"  # prompt style the model was trained with: "paper" or "release" (see data.py)
    image_token_index: int = IMAGE_TOKEN_INDEX  # LLaVA's image placeholder id in input_ids (-200)
    vision: VisionArgs = field(default_factory=VisionArgs)
    llm: LlamaArgs = field(default_factory=LlamaArgs)

    def to_dict(self):
        return dict(model_type="qilin_med_vl", projector=self.projector, select_layer=self.select_layer,
                    image_fit=self.image_fit, style=self.style, image_token_index=self.image_token_index,
                    vision_config=asdict(self.vision), text_config=asdict(self.llm))

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: d[k] for k in ("projector", "select_layer", "image_fit", "style", "image_token_index")},
                   vision=VisionArgs(**d["vision_config"]), llm=LlamaArgs(**d["text_config"]))


def build_projector(kind, vision_dim, llm_dim):
    """The vision-language adapter: (N, P, vision_dim) -> (N, P, llm_dim)."""
    if kind == "linear":
        return nn.Linear(vision_dim, llm_dim)
    if kind == "mlp2x_gelu":  # indices 0 and 2 match LLaVA's `mm_projector.0/.2` keys
        return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
    raise ValueError(f"unknown projector type {kind!r} (expected 'linear' or 'mlp2x_gelu')")


class QilinMedVL(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision).requires_grad_(False)
        self.projector = build_projector(config.projector, config.vision.dim, config.llm.dim)
        self.llm = Llama(config.llm)

    @property
    def num_image_tokens(self):
        return self.config.vision.num_patches

    def set_trainable(self, stage):
        """Paper section 4.2: stage 1 trains the adapter only; stage 2 the adapter and the LLM."""
        self.vision.requires_grad_(False)
        self.projector.requires_grad_(True)
        self.llm.requires_grad_(stage == 2)
        return self

    def encode_images(self, pixel_values):
        """(N, 3, S, S) -> (N, num_patches, llm_dim). The ViT is frozen: no autograd through it."""
        with torch.no_grad():
            features = self.vision(pixel_values, self.config.select_layer)
        return self.projector(features.to(next(self.projector.parameters()).dtype))  # in the adapter's dtype

    def embed(self, input_ids, pixel_values=None, image_positions=None):
        """Token embeddings (B, L, dim), the image features written where the image tokens stand. input_ids (B, L)
        hold config.image_token_index once per image *feature* (data.expand_images, as transformers' Llava);
        pixel_values (N, 3, S, S) are the images in row order; image_positions (N * P,), P = num_patches, the flat
        indices into B*L where the features go. collate finds them on the CPU so that nothing waits for the device;
        without them they are found here (one wait: fine for chat and tests)."""
        is_image = input_ids == self.config.image_token_index
        x = self.llm.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, L, dim); image rows overwritten below
        if pixel_values is None:
            return x
        features = self.encode_images(pixel_values).flatten(0, 1)  # (N * P, dim)
        if image_positions is None:
            image_positions = is_image.flatten().nonzero().squeeze(1)
            if len(image_positions) != len(features):
                raise ValueError(f"{len(image_positions)} image tokens in input_ids but {len(pixel_values)} images "
                                 f"of {self.num_image_tokens} features each")
        # A text-only batch carries one zero image and no positions: its features are computed and none is
        # spliced in, so every rank runs the same modules and the adapter gets a zero gradient, as in LLaVA.
        features = features[:len(image_positions)].to(x.dtype)
        return x.flatten(0, 1).index_copy(0, image_positions, features).view_as(x)

    def forward(self, input_ids, pixel_values=None, labels=None, image_positions=None, loss_positions=None):
        """Without labels: (logits (B, L, vocab), None). With labels (B, L; negative where nothing is learned):
        (logits at the learned positions (M, vocab), the mean cross-entropy of each learned token given those
        before it). loss_positions (M,): the flat indices of the positions whose *next* token is learned (collate
        finds them on the CPU). Only there are logits computed: in stage 2 the answers are a few dozen of ~650
        positions, so the output layer and the float32 logits shrink ~30x."""
        x = self.embed(input_ids, pixel_values, image_positions)
        if labels is None:
            return self.llm(inputs_embeds=x), None  # right padding + causal: no mask needed
        if loss_positions is None:  # one wait for the device; training passes them
            learned = F.pad(labels[:, 1:] >= 0, (0, 1))  # (B, L): is the next token learned
            loss_positions = learned.flatten().nonzero().squeeze(1)
        logits = self.llm(inputs_embeds=x, logits_at=loss_positions)  # (M, vocab)
        targets = labels.flatten()[loss_positions + 1]  # (M,): the token after each position
        # sum / M rather than a mean: a micro-batch with nothing to learn (M = 0) gives 0, not NaN
        loss = F.cross_entropy(logits.float(), targets, reduction="sum") / max(len(loss_positions), 1)
        return logits, loss

    # ---- loading and saving: the layouts are checkpoint.py's ----
    @classmethod
    def from_parts(cls, config, vision_path=None, llm_path=None, projector_path=None, dtype=None, device=None):
        """For training: the official towers from their folders, the adapter from stage 1's output (our folder
        or LLaVA's `mm_projector.bin`); what has no path is random (the demo). Only that is initialised: at 13B
        a random fp32 LLM built and then overwritten would cost 52 GB and minutes."""
        with torch.device("meta"):
            model = cls(config)
        model.vision = (VisionTransformer.from_pretrained(vision_path, dtype, device) if vision_path is not None
                        else VisionTransformer(config.vision).requires_grad_(False))
        found, want = model.vision.args, config.vision  # the tower the adapter was trained for
        if (found.dim, found.num_patches) != (want.dim, want.num_patches):
            raise CheckpointError(f"{vision_path}: vision tower gives {found.num_patches} patches of width "
                                  f"{found.dim}, but the model expects {want.num_patches} of width {want.dim}")
        model.llm = Llama.from_pretrained(llm_path, dtype, device) if llm_path is not None else Llama(config.llm)
        model.projector = build_projector(config.projector, config.vision.dim, config.llm.dim)
        if projector_path is not None:
            load_projector(model.projector, projector_path)
        return model.to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, vision_path=None, dtype=None, device=None):
        """Load our layout, stage 1's output (the towers from the folders it records), the authors'
        LLaVA release (CLIP from vision_path or config `mm_vision_tower`) or llava-hf."""
        cfg = read_config(path)
        if cfg.get("model_type") == "qilin_med_vl_lora":  # lora.py's: the LoRA weights, the base elsewhere
            raise CheckpointError(f"{path}: a LoRA run, not a whole model: chat.py loads it (chat.load_model), "
                                  f"export.py merges it into one")
        if cfg.get("model_type") == "qilin_med_vl_projector":
            return cls.from_parts(QilinConfig.from_dict(cfg), vision_path or cfg["vision_path"], cfg["llm_path"],
                                  path, dtype, device)
        weights = read_weights(path)
        layout, vision = detect_layout(cfg, weights, vision_path), None
        if layout == "qilin_med_vl":
            config, key_map, what = QilinConfig.from_dict(cfg), (lambda k: k), "Qilin-Med-VL model"
        elif layout == "llava":
            vision_path = llava_vision_path(cfg, path, vision_path)
            vision = VisionTransformer.from_pretrained(vision_path, dtype, device)
            config = QilinConfig(**from_llava_config(cfg, path, vision_path, vision.args.dim), vision=vision.args,
                                 llm=LlamaArgs.from_hf_config(cfg))
            key_map, what = table_key_map(LLAVA_KEYS, TOWER_KEYS), "LLaVA language model and projector"
        else:
            config = QilinConfig(**from_llava_hf_config(cfg, path),
                                 vision=VisionArgs.from_hf_config(cfg["vision_config"]),
                                 llm=LlamaArgs.from_hf_config(cfg["text_config"]))
            key_map, what = table_key_map(LLAVA_HF_KEYS, TOWER_KEYS), "llava-hf model"
        with torch.device("meta"):
            model = cls(config)
        # strictly, every tower in this folder; LLaVA's vision tower comes from its own folder
        parts = model if vision is None else nn.ModuleDict(dict(projector=model.projector, llm=model.llm))
        assign_weights(parts, weights, key_map, dtype, device, what=what)
        if vision is not None:
            model.vision = vision
        return model.requires_grad_(False)

    def save_pretrained(self, folder, tokenizer=None, max_shard_bytes=5 * 2**30):
        """Our layout: safetensors shards + index, config.json, and a copy of tokenizer.model."""
        save_weights(self.state_dict(), folder, max_shard_bytes)
        write_config(folder, self.config.to_dict(), tokenizer)

    def save_projector(self, folder, vision_path=None, llm_path=None, tokenizer=None):
        """Stage 1's output: projector.safetensors and a config.json naming its towers' folders (paper section 4.2.1:
        only the adapter trains, so nothing else needs writing)."""
        towers = dict(vision_path=vision_path and os.path.abspath(vision_path),
                      llm_path=llm_path and os.path.abspath(llm_path))
        save_weights(self.projector.state_dict(), folder, stem="projector")
        write_config(folder, dict(self.config.to_dict(), model_type="qilin_med_vl_projector", **towers), tokenizer)

    def save_towers(self, folder, tokenizer=None):
        """folder/vision and folder/llm, laid out as the official CLIP and LLaMA: the demo's towers load alike."""
        vision, llm = os.path.join(folder, "vision"), os.path.join(folder, "llm")
        save_weights({f"vision_model.{k}": v for k, v in self.vision.state_dict().items()}, vision)
        save_weights({(k if k.startswith("lm_head") else f"model.{k}"): v  # LLaMA's keys: model.*, but lm_head
                      for k, v in self.llm.state_dict().items()}, llm)
        write_config(vision, self.config.vision.to_hf_config())
        write_config(llm, self.config.llm.to_hf_config(), tokenizer)

    def save_trained(self, folder, stage, towers=None, tokenizer=None, zero3=False):
        """What a training stage hands on, whole or not at all (write_output): stage 1 the adapter and its towers'
        folders (None: the demo's random towers, written beside it), stage 2 the whole model. Every rank calls this:
        under ZeRO-3 each holds a slice of each weight; all gather them one at a time, for rank 0 to copy and write."""
        model, rank0 = self, not dist.is_initialized() or dist.get_rank() == 0
        if zero3:
            state = gathered(self.named_parameters())
            if rank0:
                with torch.device("meta"):
                    model = QilinMedVL(self.config)
                model.load_state_dict(state, strict=True, assign=True)
        if not rank0:
            return

        def write(tmp):
            if stage == 2:
                return model.save_pretrained(tmp, tokenizer=tokenizer)
            if towers is not None:
                return model.save_projector(tmp, *towers, tokenizer)
            model.save_towers(tmp, tokenizer)  # the demo's
            model.save_projector(tmp, os.path.join(folder, "vision"), os.path.join(folder, "llm"), tokenizer)
        write_output(folder, write)


def gathered(named_parameters, zero3=True):
    """{name: a CPU copy of each parameter} on rank 0, {} on the others. Under ZeRO-3 each rank holds a slice of each
    weight: all gather them one at a time (every rank must call this), so no rank holds more than one whole at once."""
    if zero3:
        import deepspeed  # here, as train.py's: only a ZeRO-3 run needs it
    rank0, state = not dist.is_initialized() or dist.get_rank() == 0, {}
    for name, p in named_parameters:
        with deepspeed.zero.GatheredParameters([p]) if zero3 else contextlib.nullcontext():
            if rank0:
                state[name] = p.detach().cpu().clone()
    return state


if __name__ == "__main__":
    # A random demo-size model: where the image features go and what comes out.
    config = QilinConfig(vision=VisionArgs.preset("demo"), llm=LlamaArgs.preset("demo"))
    model = QilinMedVL(config).eval()
    P = model.num_image_tokens
    ids = torch.tensor([[1] + [config.image_token_index] * P + [29871, 13, 100, 200]])  # BOS, the image, then text
    pixels = torch.randn(1, 3, config.vision.image_size, config.vision.image_size)
    with torch.no_grad():
        logits, _ = model(ids, pixels)
    print(f"{ids.shape[1]} positions, {P} of them the image's features -> logits {tuple(logits.shape)}")
