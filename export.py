"""Serve a trained Qilin-Med-VL elsewhere: write it in transformers' llava-hf layout (LlavaForConditionalGeneration),
which transformers and vLLM load as it is, with the processor files and the chat template that turn an image and a
dialog into the very inputs chat.py gives the model (the model of paper section 4.1, the dialogs of section 4.2).

    python export.py runs/stage2 exported/         # then AutoProcessor + LlavaForConditionalGeneration, or vLLM

llava-hf marks images with a real vocabulary id, repeated once per feature, so the export appends an `<image>` row
to the embedding and the output layer (the mean of the others, as transformers' resize sets it: in practice never
the argmax). Written from https://huggingface.co/docs/transformers/model_doc/llava.
"""

import argparse
import json
import os
import sys

import torch

from chat import load_model, one_line
from checkpoint import CheckpointError, read_config, save_weights, write_config, write_output
from data import CLIP_MEAN, CLIP_STD, IMAGE, PROMPT_DIR, STAGE_TEMPLATE, TEMPLATES, Tokenizer, build_conversation

TO_LLAVA_HF_KEYS = (  # our name -> llava-hf's, as transformers 5's save_pretrained writes them
    ("vision.", "vision_tower."),
    ("projector.0.", "multi_modal_projector.linear_1."),
    ("projector.2.", "multi_modal_projector.linear_2."),
    ("llm.lm_head.", "language_model.lm_head."),
    ("llm.", "language_model.model."),
)


def export_llava_hf(model, folder, tokenizer=None):
    """Weights and config.json in the llava-hf layout; with `tokenizer` (a tokenizer.model) the processor files too."""
    config = model.config
    if config.projector != "mlp2x_gelu":
        raise ValueError("export_llava_hf needs projector='mlp2x_gelu': transformers' Llava projector is "
                         "always two linear layers with a GELU, so a 'linear' adapter has no place in it (train with "
                         "--projector mlp2x_gelu, as the release was)")
    if tokenizer is not None:  # first: a tokenizer that does not fit fails before the weights are written
        tok, image_token = Tokenizer(tokenizer), config.llm.vocab_size  # the row appended below
        if tok.vocab_size != image_token:  # transformers numbers an added token right after the pieces
            raise ValueError(f"{tokenizer}: {tok.vocab_size} pieces but the model has {image_token} embedding rows; "
                             f"the processor's <image> token would get id {tok.vocab_size}, not {image_token}")
        write_processor(folder, config, tok)
    state = {}
    for name, t in model.state_dict().items():  # vision.*, projector.0/2.*, llm.*
        if name in ("llm.embed_tokens.weight", "llm.lm_head.weight"):
            t = torch.cat([t, t.float().mean(0, keepdim=True).to(t.dtype)])  # + the <image> row
        ours, theirs = next((o, h) for o, h in TO_LLAVA_HF_KEYS if name.startswith(o))
        state[theirs + name.removeprefix(ours)] = t
    save_weights(state, folder)
    write_config(folder, llava_hf_config(config), tokenizer)


def llava_hf_config(config):
    """llava-hf's config.json from the towers' Hugging Face configs; the <image> id is the row after the vocabulary,
    once per patch. prompt_style and image_fit (ignored by transformers) tell our loader how the model was trained."""
    image_token = config.llm.vocab_size
    return dict(model_type="llava", architectures=["LlavaForConditionalGeneration"],
                vision_config=config.vision.to_hf_config(), prompt_style=config.style, image_fit=config.image_fit,
                text_config=dict(config.llm.to_hf_config(), vocab_size=image_token + 1, pad_token_id=None),
                image_token_index=image_token, image_seq_length=config.vision.num_patches,
                vision_feature_layer=config.select_layer, vision_feature_select_strategy="default",
                projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False)


def write_processor(folder, config, tokenizer):
    """AutoProcessor's files, giving exactly chat.py's inputs. config: the QilinConfig; tokenizer: data.Tokenizer."""
    piece, size = tokenizer.sp.id_to_piece, config.vision.image_size
    files = {
        # LLaMA's SentencePiece model plus a special <image> piece. legacy=True: each stretch between special tokens
        # gets the dummy prefix, as data.py encodes text around <image> and after </s>; BOS comes from the template.
        "tokenizer_config.json": dict(
            tokenizer_class="LlamaTokenizer", legacy=True, add_bos_token=False, add_eos_token=False,
            bos_token=piece(tokenizer.bos_id), eos_token=piece(tokenizer.eos_id),
            unk_token=piece(tokenizer.sp.unk_id()), pad_token=piece(tokenizer.pad_id),
            clean_up_tokenization_spaces=False, model_max_length=config.llm.max_seq_len,
            added_tokens_decoder={str(config.llm.vocab_size): dict(content=IMAGE, special=True, normalized=False,
                                                                   lstrip=False, rstrip=False, single_word=False)}),
        # data.preprocess_image: "pad" squares the image with the CLIP-mean colour (do_pad), then both fits
        # resize the short side bicubically and take the centre square (a no-op when padded)
        "preprocessor_config.json": dict(
            image_processor_type="LlavaImageProcessor", processor_class="LlavaProcessor",
            do_convert_rgb=True, do_pad=config.image_fit == "pad", do_resize=True, resample=3,  # PIL bicubic
            size=dict(shortest_edge=size), do_center_crop=True, crop_size=dict(height=size, width=size),
            do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD),
        # <image> becomes (size / patch)^2 + 1 - 1 tokens: the ViT's outputs less the class token ("default"),
        # one per feature the adapter writes into the text
        "processor_config.json": dict(
            processor_class="LlavaProcessor", image_token=IMAGE, patch_size=config.vision.patch_size,
            vision_feature_select_strategy="default", num_additional_image_tokens=1),
        "generation_config.json": dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                       pad_token_id=tokenizer.pad_id),
        "chat_template.jinja": chat_template(config.style, tokenizer),
    }
    os.makedirs(folder, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(content if name.endswith(".jinja") else json.dumps(content, indent=2, ensure_ascii=False))


def chat_template(style, tokenizer):
    """prompts/chat_template.jinja with this style's system prompt and question layouts on top, as data.py's
    build_conversation lays out a marker question: first with the image, then without."""
    mark = "\x00"
    record = {"image": "image", "conversations": [{"from": "human", "value": mark}, {"from": "gpt", "value": "-"},
                                                  {"from": "human", "value": mark}]}
    first, _, later = build_conversation(record, 2, style)
    values = dict(bos=tokenizer.sp.id_to_piece(tokenizer.bos_id), eos=tokenizer.sp.id_to_piece(tokenizer.eos_id),
                  system=TEMPLATES[STAGE_TEMPLATE[(2, style)]]["system"],
                  question_with_image=first["value"].split(mark), question_alone=later["value"].split(mark))
    header = "".join(f"{{%- set {k} = {json.dumps(v, ensure_ascii=False)} -%}}\n" for k, v in values.items())
    return header + (PROMPT_DIR / "chat_template.jinja").read_text(encoding="utf-8")


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a trained model in the llava-hf layout, for transformers and vLLM.")
    p.add_argument("model", help="model folder chat.py loads (ours, a LoRA run, merged here, or LLaVA's original "
                                 "layout with --vision), with its tokenizer.model")
    p.add_argument("output", help="the llava-hf folder to write (new or empty)")
    p.add_argument("--vision", help="CLIP ViT folder, for a checkpoint in the original LLaVA layout")
    p.add_argument("--llm", help="a LoRA run's base LLaMA folder, if it has moved since training")
    args = p.parse_args(argv)
    if os.path.isdir(args.output) and os.listdir(args.output):
        p.error(f"{args.output} is not empty; choose a new folder")
    try:
        # read_config refuses a quantized model: llava-hf holds full-precision weights
        if os.path.isdir(args.model) and read_config(args.model).get("model_type") == "qilin_med_vl_projector":
            raise CheckpointError(f"{args.model}: a stage-1 output (the adapter alone); export needs a stage-2 model "
                                  f"(train.py --stage 2, in full or with --lora)")
        model, _ = load_model(args.model, args.vision, llm=args.llm)  # a stage-2 model, a tokenizer that fits
        write_output(args.output, lambda tmp: export_llava_hf(model, tmp, os.path.join(args.model, "tokenizer.model")))
    except (CheckpointError, ValueError, OSError) as e:
        print(f"export.py: error: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
