"""Qilin-Med-VL: the CLIP vision tower, the adapter and the LLaMA language model as one model.

Paper section 4.1 (model architecture): a frozen ViT turns each image into patch features, a
vision-language adapter maps them into the LLM's embedding space, and the LLM reads them where
an `<image>` placeholder stood in the text:

    pixels (N, 3, 336, 336) --vit--> (N, 576, 1024) --projector--> (N, 576, 5120)
    input_ids (B, L) holding the image token 576 times per image
        --embed: write the features at those positions--> (B, L, 5120) --llama--> logits

The paper describes the adapter as "a simple linear projection layer" (`projector="linear"`);
the released Qilin-Med-VL-Chat uses LLaVA-1.5's two-layer MLP (`mlp2x_gelu`). Both are here.
Section 4.2's two stages differ only in what trains: stage 1 the adapter, stage 2 the adapter
and the LLM (`set_trainable`). The vision tower never trains.

Checkpoints in three layouts load (`from_pretrained`): this project's own, the original LLaVA
layout the authors released, and transformers' llava-hf layout (`export_llava_hf` writes it).
"""

import json
import os
import shutil
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import (CheckpointError, Weights, assign_weights, read_bin, read_config, read_safetensors,
                        read_weights, save_weights)
from data import CLIP_MEAN, CLIP_STD, IMAGE, PROMPT_DIR, STAGE_TEMPLATE, TEMPLATES, Tokenizer, build_conversation
from llama import Llama, LlamaArgs, llama_key
from vit import VisionArgs, VisionTransformer, clip_key

@dataclass
class QilinConfig:
    projector: str = "linear"  # paper: "linear"; released weights: "mlp2x_gelu"
    select_layer: int = -2  # which hidden state of the ViT (-2: penultimate block, as LLaVA)
    image_fit: str = "pad"  # how images become squares: "pad" (stage 2, chat) or "crop" (see data.py)
    style: str = "paper"  # prompt style the model was trained with: "paper" or "release" (see data.py)
    image_token_index: int = -200  # LLaVA's image placeholder id in input_ids (data.IMAGE_TOKEN_INDEX)
    vision: VisionArgs = field(default_factory=VisionArgs)
    llm: LlamaArgs = field(default_factory=LlamaArgs)

    def to_dict(self):
        return dict(model_type="qilin_med_vl", projector=self.projector, select_layer=self.select_layer,
                    image_fit=self.image_fit, style=self.style, image_token_index=self.image_token_index,
                    vision_config=asdict(self.vision), text_config=asdict(self.llm))

    @classmethod
    def from_dict(cls, d):
        return cls(projector=d["projector"], select_layer=d["select_layer"], image_fit=d["image_fit"],
                   style=d["style"], image_token_index=d["image_token_index"],
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

    def encode_images(self, pixel_values):
        """(N, 3, S, S) -> (N, num_patches, llm_dim). The ViT is frozen: no autograd through it."""
        with torch.no_grad():
            features = self.vision(pixel_values, self.config.select_layer)
        weight = next(self.projector.parameters())
        return self.projector(features.to(weight.dtype))

    def embed(self, input_ids, pixel_values=None, image_positions=None):
        """Token embeddings with the image features written where the image tokens stand.

        input_ids: (B, L), already expanded: config.image_token_index once per image *feature*,
        num_patches in a row per image (transformers' Llava convention; data.expand_images makes
        it from LLaVA's one placeholder per image). pixel_values: (N, 3, S, S), the images in
        row order. image_positions: (N * num_patches,) flat indices into the B*L positions where
        the features go; collate computes them on the CPU, so that nothing here waits for the
        device. Without them they are found here (one wait, fine for chat and tests).
        Returns (B, L, dim).
        """
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
        # A batch of text-only samples carries one zero image and no positions: its features are
        # computed and none is spliced in (features[:0]), so every rank runs the same modules and
        # the adapter stays in the graph with a zero gradient, as LLaVA does.
        features = features[:len(image_positions)].to(x.dtype)
        return x.flatten(0, 1).index_copy(0, image_positions, features).view_as(x)

    def forward(self, input_ids, pixel_values=None, labels=None, image_positions=None, loss_positions=None):
        """Without labels: (logits (B, L, vocab), None). With labels (B, L; negative where nothing
        is learned): (logits at the learned positions (M, vocab), loss), the loss being the mean
        cross-entropy of each learned token given the ones before it.

        loss_positions: (M,) flat indices of the positions whose *next* token is learned (collate
        computes them on the CPU). Only there are logits computed: in stage 2 the answers are a
        few dozen of ~650 positions, so the output layer and the float32 logits shrink ~30x.
        """
        x = self.embed(input_ids, pixel_values, image_positions)
        if labels is None:
            return self.llm(inputs_embeds=x), None  # right padding + causal: no mask needed
        if loss_positions is None:  # one wait for the device; training passes them
            learned = torch.zeros_like(labels, dtype=torch.bool)
            learned[:, :-1] = labels[:, 1:] >= 0
            loss_positions = learned.flatten().nonzero().squeeze(1)
        logits = self.llm(inputs_embeds=x, logits_at=loss_positions)  # (M, vocab)
        targets = labels.flatten()[loss_positions + 1]  # (M,): the token after each position
        # sum / M rather than a mean: a micro-batch with nothing to learn (M = 0) gives 0, not NaN
        loss = F.cross_entropy(logits.float(), targets, reduction="sum") / max(len(loss_positions), 1)
        return logits, loss

    # ---- saving -------------------------------------------------------------------------------

    def save_pretrained(self, folder, tokenizer=None, max_shard_bytes=5 * 2**30):
        """Our layout: safetensors shards + index, config.json, and a copy of tokenizer.model."""
        save_weights(self.state_dict(), folder, max_shard_bytes)
        write_config(folder, self.config.to_dict(), tokenizer)

    def save_projector(self, folder, vision_path=None, llm_path=None, tokenizer=None):
        """Stage 1's output: the adapter alone (projector.safetensors) and a config that records
        which towers it was trained against, so `from_pretrained` can assemble the whole model."""
        os.makedirs(folder, exist_ok=True)
        save_weights(self.projector.state_dict(), os.path.join(folder, "projector"))
        os.replace(os.path.join(folder, "projector", "model.safetensors"), os.path.join(folder, "projector.safetensors"))
        os.rmdir(os.path.join(folder, "projector"))
        write_config(folder, dict(self.config.to_dict(), model_type="qilin_med_vl_projector",
                                  vision_path=vision_path and os.path.abspath(vision_path),
                                  llm_path=llm_path and os.path.abspath(llm_path)), tokenizer)

    def export_llava_hf(self, folder, tokenizer=None):
        """Write transformers' llava-hf layout (LlavaForConditionalGeneration, transformers 5 key
        names), so a trained model can be served with transformers or vLLM.

        With the SentencePiece `tokenizer` (its tokenizer.model) the folder is complete: it also
        gets the processor files (`write_llava_hf_processor`) that AutoProcessor and vLLM read.

        llava-hf marks images with a real vocabulary id repeated once per patch, so the vocabulary
        grows by one `<image>` row (embedding and output rows set to the mean of the others, as
        transformers' resize does: never the argmax in practice)."""
        if self.config.projector != "mlp2x_gelu":
            raise ValueError("export_llava_hf needs projector='mlp2x_gelu': transformers' Llava projector is "
                             "always two linear layers with a GELU, so a 'linear' adapter has no place in it")
        if tokenizer is not None:  # first: a tokenizer that does not fit fails before the weights are written
            write_llava_hf_processor(folder, self.config, tokenizer)
        state = {}
        for k, v in self.vision.state_dict().items():
            state[f"vision_tower.{k}"] = v
        state["multi_modal_projector.linear_1.weight"] = self.projector[0].weight
        state["multi_modal_projector.linear_1.bias"] = self.projector[0].bias
        state["multi_modal_projector.linear_2.weight"] = self.projector[2].weight
        state["multi_modal_projector.linear_2.bias"] = self.projector[2].bias
        for k, v in self.llm.state_dict().items():
            if k in ("embed_tokens.weight", "lm_head.weight"):
                v = torch.cat([v, v.float().mean(0, keepdim=True).to(v.dtype)])  # + the <image> row
            state[("language_model." if k.startswith("lm_head") else "language_model.model.") + k] = v
        save_weights(state, folder)
        image_token = self.config.llm.vocab_size
        text = dict(self.config.llm.to_hf_config(), vocab_size=image_token + 1, pad_token_id=None)
        config = dict(model_type="llava", architectures=["LlavaForConditionalGeneration"],
                      vision_config=self.config.vision.to_hf_config(), text_config=text,
                      image_token_index=image_token, image_seq_length=self.num_image_tokens,
                      vision_feature_layer=self.config.select_layer, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False)
        write_config(folder, config, tokenizer)

    # ---- loading ------------------------------------------------------------------------------

    @classmethod
    def from_parts(cls, config, vision_path=None, llm_path=None, projector_path=None, dtype=None, device=None):
        """Assemble a model for training: official towers from their own folders (random ones where
        a path is None, as in the demo), the adapter from stage 1's output (our folder, or LLaVA's
        `mm_projector.bin`) or freshly initialised. Only what has no path is initialised at random;
        at 13B a random fp32 LLM built first and then overwritten would cost 52 GB and minutes."""
        with torch.device("meta"):
            model = cls(config)
        if vision_path is not None:
            model.vision = VisionTransformer.from_pretrained(vision_path, dtype, device)
            check_vision(model.vision.args, config.vision, vision_path)
        else:
            model.vision = VisionTransformer(config.vision).requires_grad_(False)
        model.llm = Llama.from_pretrained(llm_path, dtype, device) if llm_path is not None else Llama(config.llm)
        model.projector = build_projector(config.projector, config.vision.dim, config.llm.dim)
        if projector_path is not None:
            load_projector(model.projector, projector_path)
        return model.to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, vision_path=None, dtype=None, device=None):
        """Load any supported layout; which one is detected from config.json and the key names.

          our own        config model_type "qilin_med_vl" (save_pretrained)
          stage 1 output config model_type "qilin_med_vl_projector" (towers from the recorded paths)
          LLaVA original keys `model.mm_projector.*` (Qilin-Med-VL-Chat as released); the CLIP tower
                         comes from vision_path, or from config `mm_vision_tower` if that is a folder
          llava-hf       keys `multi_modal_projector.*` (transformers 4 and 5 variants)
        """
        cfg = read_config(path)
        kind = cfg.get("model_type")
        if kind == "qilin_med_vl_projector":
            config = QilinConfig.from_dict(cfg)
            return cls.from_parts(config, vision_path or cfg["vision_path"], cfg["llm_path"],
                                  path, dtype, device)
        weights = read_weights(path)
        llava_hf = any(k.startswith(("multi_modal_projector.", "model.multi_modal_projector.")) for k in weights.tensors)
        if vision_path is not None and (kind == "qilin_med_vl" or llava_hf):
            raise CheckpointError(f"{path}: this checkpoint carries its own vision tower; a separate vision folder "
                                  f"({vision_path}) is only for LLaVA-layout checkpoints and stage-1 outputs")
        if kind == "qilin_med_vl":
            config = QilinConfig.from_dict(cfg)
            with torch.device("meta"):
                model = cls(config)
            assign_weights(model, weights, lambda k: k, dtype, device, what="Qilin-Med-VL model")
            return model.requires_grad_(False)
        if any(k.startswith("model.mm_projector.") for k in weights.tensors):
            return cls._from_llava(cfg, weights, vision_path, dtype, device)
        if llava_hf:
            return cls._from_llava_hf(cfg, weights, dtype, device)
        prefixes = sorted({".".join(k.split(".")[:2]) for k in weights.tensors})[:10]
        raise CheckpointError(f"{path}: not a Qilin-Med-VL, LLaVA or llava-hf checkpoint (config model_type "
                              f"{kind!r}; weight keys start with {prefixes})")

    @classmethod
    def _from_llava(cls, cfg, weights, vision_path, dtype, device):
        """The original LLaVA layout: one LlamaForCausalLM-like folder (LLaMA fields at the top of
        config.json) plus `model.mm_projector.*`; the CLIP tower lives in its own folder."""
        vision_path = vision_path or cfg.get("mm_vision_tower")
        if not vision_path or not os.path.isdir(vision_path):
            raise CheckpointError(f"{weights.folder}: this LLaVA-layout checkpoint keeps its CLIP tower elsewhere "
                                  f"(config says mm_vision_tower={cfg.get('mm_vision_tower')!r}); pass the local "
                                  f"CLIP ViT-L/14-336 folder as vision_path (--vision DIR)")
        vision = VisionTransformer.from_pretrained(vision_path, dtype, device)
        if cfg.get("mm_hidden_size", vision.args.dim) != vision.args.dim:
            raise CheckpointError(f"{vision_path}: vision tower width {vision.args.dim} does not match the "
                                  f"checkpoint's mm_hidden_size {cfg['mm_hidden_size']} ({weights.folder})")
        config = QilinConfig(projector=cfg.get("mm_projector_type", "linear"),
                             select_layer=cfg.get("mm_vision_select_layer", -2),
                             image_fit="pad" if cfg.get("image_aspect_ratio") == "pad" else "crop",
                             style="release", vision=vision.args, llm=LlamaArgs.from_hf_config(cfg))
        with torch.device("meta"):
            model = cls(config)

        def key_map(k):
            if k.startswith("model.mm_projector."):
                return "projector." + k.removeprefix("model.mm_projector.")
            if k.startswith("model.vision_tower."):  # a copy of the frozen CLIP some forks save: use vision_path's
                return None
            return None if llama_key(k) is None else "llm." + llama_key(k)

        # The projector and LLM from this folder, strictly; the vision tower from its own.
        assign_weights(nn.ModuleDict(dict(projector=model.projector, llm=model.llm)), weights, key_map,
                       dtype, device, what="LLaVA language model and projector")
        model.vision = vision
        return model.requires_grad_(False)

    @classmethod
    def _from_llava_hf(cls, cfg, weights, dtype, device):
        """transformers' layout: `vision_tower.[vision_model.]*`, `multi_modal_projector.linear_{1,2}`,
        `language_model.model.*` and `language_model.lm_head` (transformers >= 4.52 may write
        `model.vision_tower`, `model.multi_modal_projector`, `model.language_model` and `lm_head`)."""
        if cfg.get("vision_feature_select_strategy", "default") != "default":
            raise CheckpointError(f"{weights.folder}: vision_feature_select_strategy "
                                  f"{cfg['vision_feature_select_strategy']!r} is not supported (LLaVA drops the "
                                  f"class token: 'default')")
        layer = cfg.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise CheckpointError(f"{weights.folder}: vision_feature_layer {layer!r}: only one layer is supported")
        config = QilinConfig(projector="mlp2x_gelu", select_layer=layer, image_fit="pad", style="release",
                             vision=VisionArgs.from_hf_config(cfg["vision_config"]),
                             llm=LlamaArgs.from_hf_config(cfg["text_config"]))
        with torch.device("meta"):
            model = cls(config)
        assign_weights(model, weights, llava_hf_key, dtype, device, what="llava-hf model")
        return model.requires_grad_(False)


def write_config(folder, config, tokenizer=None):
    """config.json, and a copy of the SentencePiece tokenizer.model that chat.py reads beside it."""
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(folder, "tokenizer.model"))


def llava_hf_key(key):
    """llava-hf checkpoint key -> our parameter name (None: ignore)."""
    key = key.removeprefix("model.")  # transformers >= 4.52 nests the towers under `model.`
    if key.startswith("vision_tower."):
        name = clip_key(key.removeprefix("vision_tower."))
        return name and "vision." + name
    if key.startswith("multi_modal_projector."):
        return "projector." + key.removeprefix("multi_modal_projector.").replace("linear_1", "0").replace("linear_2", "2")
    if key.startswith("language_model."):
        key = key.removeprefix("language_model.")
    name = llama_key(key)
    return name and "llm." + name


# ---- the llava-hf export's processor files ------------------------------------------------------
# transformers' AutoProcessor (and vLLM, which loads it) turns an image and a dialog into the
# model's inputs from plain files beside the weights. Written here without transformers, each says
# what chat.py does: https://huggingface.co/docs/transformers/model_doc/llava

def write_llava_hf_processor(folder, config, tokenizer_path):
    """The tokenizer, image processor, processor and chat-template files of a llava-hf folder."""
    tok = Tokenizer(tokenizer_path)
    piece = tok.sp.id_to_piece
    image_token = config.llm.vocab_size  # the row export_llava_hf appends
    if tok.vocab_size != image_token:  # transformers numbers an added token right after the pieces
        raise ValueError(f"{tokenizer_path}: {tok.vocab_size} pieces but the model has {image_token} embedding rows; "
                         f"the processor's <image> token would get id {tok.vocab_size}, not {image_token}")
    files = {
        # LLaMA's SentencePiece model plus one special <image> piece. legacy=True: every stretch
        # between special tokens gets SentencePiece's dummy prefix, as data.py encodes the text
        # around <image> and after </s>. BOS comes from the chat template, so none is added here.
        "tokenizer_config.json": dict(
            tokenizer_class="LlamaTokenizer", legacy=True, add_bos_token=False, add_eos_token=False,
            bos_token=piece(tok.bos_id), eos_token=piece(tok.eos_id), unk_token=piece(tok.sp.unk_id()),
            pad_token=piece(tok.pad_id), clean_up_tokenization_spaces=False,
            model_max_length=config.llm.max_seq_len,
            added_tokens_decoder={str(image_token): dict(content=IMAGE, special=True, normalized=False,
                                                         lstrip=False, rstrip=False, single_word=False)}),
        # data.preprocess_image: "pad" squares the image with the CLIP-mean colour (do_pad), then
        # both fits resize the short side bicubically and take the centre square (a no-op when padded)
        "preprocessor_config.json": dict(
            image_processor_type="LlavaImageProcessor", processor_class="LlavaProcessor",
            do_convert_rgb=True, do_pad=config.image_fit == "pad", do_resize=True, resample=3,  # PIL bicubic
            size=dict(shortest_edge=config.vision.image_size), do_center_crop=True,
            crop_size=dict(height=config.vision.image_size, width=config.vision.image_size),
            do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD),
        # <image> becomes (size / patch)^2 + 1 - 1 tokens: the ViT's outputs less the class token
        # ("default"), one per feature the adapter writes into the text
        "processor_config.json": dict(
            processor_class="LlavaProcessor", image_token=IMAGE, patch_size=config.vision.patch_size,
            vision_feature_select_strategy="default", num_additional_image_tokens=1),
        "generation_config.json": dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id),
    }
    os.makedirs(folder, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
    with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(chat_template(config.style, bos=piece(tok.bos_id), eos=piece(tok.eos_id)))


def chat_template(style, bos, eos):
    """prompts/chat_template.jinja with this style's system prompt and question layouts set on top.
    The layouts come from data.build_conversation itself, with a marker for the question: the
    first turn of a dialog about an image, and a later turn (which never carries the image)."""
    mark = "\x00"
    record = {"image": "image", "conversations": [{"from": "human", "value": mark}, {"from": "gpt", "value": "-"},
                                                  {"from": "human", "value": mark}]}
    first, _, later = build_conversation(record, 2, style)
    values = dict(bos=bos, eos=eos, system=TEMPLATES[STAGE_TEMPLATE[(2, style)]]["system"],
                  question_with_image=first["value"].split(mark), question_alone=later["value"].split(mark))
    header = "".join(f"{{%- set {k} = {json.dumps(v, ensure_ascii=False)} -%}}\n" for k, v in values.items())
    return header + (PROMPT_DIR / "chat_template.jinja").read_text(encoding="utf-8")


def check_vision(found, expected, path):
    """A vision folder must have the width and patch count the adapter was trained for."""
    if (found.dim, found.num_patches) != (expected.dim, expected.num_patches):
        raise CheckpointError(f"{path}: vision tower gives {found.num_patches} patches of width {found.dim}, but the "
                              f"model expects {expected.num_patches} of width {expected.dim}")


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
