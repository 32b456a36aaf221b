"""model.py: image splicing, the loss, per-stage gradients, and every checkpoint layout we load or write.

Reference models are tiny random transformers `LlavaForConditionalGeneration`s; the image is a
real medical image through data.py's preprocessing; comparisons are in fp32.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from checkpoint import CheckpointError, read_safetensors
from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, collate, expand_images, load_image, preprocess_image
from export import export_llava_hf
from llama import LlamaArgs
from model import QilinConfig, QilinMedVL
from vit import VisionArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Parity with transformers is exact: on the CPU in fp32 the same operations give the same floats, and any tolerance
# would hide a near miss (a tanh-approximate GELU in the adapter moves these logits by ~1e-5).
EXACT = 0.0
HF_IMAGE_ID = 120  # llava-hf marks images with a real vocabulary id, once per patch


def vision_config():
    return CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                            image_size=56, patch_size=14)  # 16 patches


def text_config():
    return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=HF_IMAGE_ID + 1, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory):
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision_config(), text_config=text_config(),
                                                      image_token_index=HF_IMAGE_ID)).eval()
    folder = tmp_path_factory.mktemp("llava_hf")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def pixels():
    image = load_image(os.path.join(ROOT, "samples", "images", "chest_xray.png"))
    return preprocess_image(image, size=56, mode="pad")[None]  # (1, 3, 56, 56)


def hf_ids(ids, n_patches=16, image_id=HF_IMAGE_ID):
    """Our ids (one IMAGE_TOKEN_INDEX per image) -> llava-hf's (image id once per patch)."""
    out = []
    for i in ids:
        out += [image_id] * n_patches if i == IMAGE_TOKEN_INDEX else [i]
    return torch.tensor([out])


IDS = [1, 5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9, 10]


def assert_matches(ours, hf, pixels, ids=IDS, image_id=HF_IMAGE_ID, vocab=None):
    with torch.no_grad():
        ref = hf(input_ids=hf_ids(ids, image_id=image_id), pixel_values=pixels).logits
        logits, _ = ours(torch.tensor([expand_images(ids, 16)]), pixels)
    diff = (logits - ref[..., :vocab]).abs().max().item()
    assert logits.shape[1] == len(ids) - 1 + 16
    return diff


def test_llava_hf_parity(hf_llava, pixels):
    hf, folder = hf_llava
    ours = QilinMedVL.from_pretrained(folder)
    assert ours.config.projector == "mlp2x_gelu" and ours.config.select_layer == -2
    diff = assert_matches(ours, hf, pixels)
    print(f"llava-hf (transformers 5 keys): max |logit diff| {diff:.2e}")
    assert diff <= EXACT


def rename_keys(folder, out, rename):
    """Rewrite a llava-hf folder with other key names (transformers 4 variants)."""
    os.makedirs(out)
    state = {rename(k): v.clone() for k, v in read_safetensors(str(folder / "model.safetensors")).items()}
    from safetensors.torch import save_file
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text((folder / "config.json").read_text())


@pytest.mark.parametrize("variant", ["transformers4", "transformers4.52"])
def test_llava_hf_transformers4_variants(hf_llava, pixels, tmp_path, variant):
    hf, folder = hf_llava
    if variant == "transformers4":  # vision_tower.vision_model.*, language_model.model.*
        rename = lambda k: k.replace("vision_tower.", "vision_tower.vision_model.")  # noqa: E731
    else:  # model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head
        def rename(k):
            if k.startswith("language_model.lm_head"):
                return k.removeprefix("language_model.")
            return "model." + k.replace("language_model.model.", "language_model.")
    rename_keys(folder, tmp_path / "m", rename)
    diff = assert_matches(QilinMedVL.from_pretrained(tmp_path / "m"), hf, pixels)
    print(f"llava-hf ({variant} keys): max |logit diff| {diff:.2e}")
    assert diff <= EXACT


def test_export_llava_hf_loads_in_transformers(hf_llava, pixels, tmp_path):
    _, folder = hf_llava
    ours = QilinMedVL.from_pretrained(folder)
    export_llava_hf(ours, tmp_path / "export")
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    image_id = json.loads((tmp_path / "export" / "config.json").read_text())["image_token_index"]
    assert image_id == ours.config.llm.vocab_size  # one new row, after the existing vocabulary
    diff = assert_matches(ours, exported, pixels, image_id=image_id, vocab=ours.config.llm.vocab_size)
    print(f"export_llava_hf -> transformers: max |logit diff| {diff:.2e}")
    assert diff <= EXACT
    linear = QilinMedVL(QilinConfig(projector="linear", vision=VisionArgs.preset("demo"),
                                    llm=LlamaArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=4,
                                                  intermediate_size=64, vocab_size=50)))
    with pytest.raises(ValueError, match="needs projector='mlp2x_gelu'"):
        export_llava_hf(linear, tmp_path / "nope")


def write_original_llava(hf, folder, clip_folder, projector="mlp2x_gelu"):
    """The layout the authors released: LLaMA keys + model.mm_projector.*, .bin shards,
    LLaMA fields at the top of config.json, the CLIP tower named by mm_vision_tower."""
    os.makedirs(folder)
    lm = hf.model.language_model.state_dict()
    state = {"model." + k: v for k, v in lm.items()}
    state["lm_head.weight"] = hf.lm_head.weight.detach()
    p = hf.model.multi_modal_projector
    if projector == "mlp2x_gelu":
        state.update({"model.mm_projector.0.weight": p.linear_1.weight, "model.mm_projector.0.bias": p.linear_1.bias,
                      "model.mm_projector.2.weight": p.linear_2.weight, "model.mm_projector.2.bias": p.linear_2.bias})
    else:
        state.update({"model.mm_projector.weight": p.linear_1.weight, "model.mm_projector.bias": p.linear_1.bias})
    state = {k: v.detach().clone() for k, v in state.items()}
    keys = sorted(state)
    torch.save({k: state[k] for k in keys[::2]}, os.path.join(folder, "pytorch_model-00001-of-00002.bin"))
    torch.save({k: state[k] for k in keys[1::2]}, os.path.join(folder, "pytorch_model-00002-of-00002.bin"))
    index = {k: f"pytorch_model-0000{1 + i % 2}-of-00002.bin" for i, k in enumerate(keys)}
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"weight_map": index}, f)
    config = {**text_config().to_dict(), "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"],
              "mm_projector_type": projector, "mm_vision_select_layer": -2, "mm_hidden_size": 48,
              "image_aspect_ratio": "pad", "mm_vision_tower": str(clip_folder), "mm_use_im_start_end": False}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def clip_folder(hf_llava, tmp_path_factory):
    """The frozen tower as a full CLIPModel folder (as openai/clip-vit-large-patch14-336 is)."""
    hf, _ = hf_llava
    clip = CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=99, bos_token_id=0,
                                                 eos_token_id=1),
                                vision_config=vision_config().to_dict(), projection_dim=16))
    tower = {k.removeprefix("vision_model."): v for k, v in hf.model.vision_tower.state_dict().items()}
    clip.vision_model.load_state_dict(tower)
    folder = tmp_path_factory.mktemp("clip")
    clip.save_pretrained(folder)
    return folder


def test_original_llava_layout(hf_llava, clip_folder, pixels, tmp_path):
    hf, _ = hf_llava
    write_original_llava(hf, tmp_path / "llava", clip_folder)
    ours = QilinMedVL.from_pretrained(tmp_path / "llava")  # CLIP found through mm_vision_tower
    assert ours.config.style == "release" and ours.config.image_fit == "pad"
    diff = assert_matches(ours, hf, pixels)
    print(f"original LLaVA layout (.bin shards + CLIP folder): max |logit diff| {diff:.2e}")
    assert diff <= EXACT
    # The same with the tower given explicitly and a config naming a hub id instead of a folder.
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (tmp_path / "llava" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="keeps its CLIP tower elsewhere"):
        QilinMedVL.from_pretrained(tmp_path / "llava")
    assert assert_matches(QilinMedVL.from_pretrained(tmp_path / "llava", vision_path=clip_folder), hf, pixels) <= EXACT


def test_original_llava_linear_projector(hf_llava, clip_folder, pixels, tmp_path):
    """The paper's adapter in LLaVA's layout: `model.mm_projector.{weight,bias}`."""
    hf, _ = hf_llava
    write_original_llava(hf, tmp_path / "llava", clip_folder, projector="linear")
    ours = QilinMedVL.from_pretrained(tmp_path / "llava")
    assert isinstance(ours.projector, torch.nn.Linear)
    feats = ours.vision(pixels)
    expected = F.linear(feats, hf.model.multi_modal_projector.linear_1.weight, hf.model.multi_modal_projector.linear_1.bias)
    assert (ours.encode_images(pixels) - expected).abs().max() <= EXACT


def test_vision_folder_that_does_not_match(hf_llava, tmp_path):
    from transformers import CLIPVisionModel
    hf, _ = hf_llava
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=56, patch_size=14)).save_pretrained(tmp_path / "clip")
    write_original_llava(hf, tmp_path / "llava", tmp_path / "clip")
    with pytest.raises(CheckpointError, match="does not match the checkpoint's mm_hidden_size 48"):
        QilinMedVL.from_pretrained(tmp_path / "llava")


def test_unknown_layout_says_what_it_found(tmp_path):
    from transformers import LlamaForCausalLM
    LlamaForCausalLM(text_config()).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"not a Qilin-Med-VL, LLaVA or llava-hf checkpoint \(config "
                                              r"model_type 'llama'; weight keys start with \['lm_head.weight'"):
        QilinMedVL.from_pretrained(tmp_path)


# ---- our own layouts ------------------------------------------------------------------------

def demo_config(projector="mlp2x_gelu"):
    return QilinConfig(projector=projector, vision=VisionArgs(image_size=56, patch_size=14, dim=32, n_layers=2,
                                                              n_heads=4, intermediate_size=64),
                       llm=LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                                     vocab_size=100, max_seq_len=128))


def test_save_pretrained_round_trip(tmp_path, pixels):
    torch.manual_seed(0)
    model = QilinMedVL(demo_config("linear")).eval()
    tok = os.path.join(ROOT, "samples", "tokenizer.model")
    model.save_pretrained(tmp_path / "m", tokenizer=tok, max_shard_bytes=100_000)
    assert (tmp_path / "m" / "model.safetensors.index.json").exists() and (tmp_path / "m" / "tokenizer.model").exists()
    loaded = QilinMedVL.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    ids = torch.tensor([expand_images([1, 3, IMAGE_TOKEN_INDEX, 4, 5], 16)])
    with torch.no_grad():
        assert torch.equal(model(ids, pixels)[0], loaded(ids, pixels)[0])


def test_stage1_projector_folder_and_llava_mm_projector_bin(tmp_path, pixels):
    """Stage 1 saves the adapter alone; it loads as a whole model (towers from the recorded
    folders) and, like LLaVA's mm_projector.bin, as the starting adapter of stage 2."""
    torch.manual_seed(0)
    model = QilinMedVL(demo_config()).eval()
    os.makedirs(tmp_path / "vision")
    from checkpoint import save_weights
    save_weights({"vision_model." + k: v for k, v in model.vision.state_dict().items()}, tmp_path / "vision")
    (tmp_path / "vision" / "config.json").write_text(json.dumps({"vision_config": model.config.vision.to_hf_config()}))
    save_weights({"model." + k if k != "lm_head.weight" else k: v for k, v in model.llm.state_dict().items()},
                 tmp_path / "llm")
    (tmp_path / "llm" / "config.json").write_text(json.dumps(model.config.llm.to_hf_config()))
    model.save_projector(tmp_path / "stage1", tmp_path / "vision", tmp_path / "llm")
    assert sorted(os.listdir(tmp_path / "stage1")) == ["config.json", "projector.safetensors"]
    ids = torch.tensor([expand_images([1, IMAGE_TOKEN_INDEX, 4, 5], 16)])
    with torch.no_grad():
        ref = model(ids, pixels)[0]
        assert torch.equal(QilinMedVL.from_pretrained(tmp_path / "stage1")(ids, pixels)[0], ref)
        torch.save({"model.mm_projector." + k: v for k, v in model.projector.state_dict().items()},
                   tmp_path / "mm_projector.bin")
        again = QilinMedVL.from_parts(demo_config(), tmp_path / "vision", tmp_path / "llm", tmp_path / "mm_projector.bin")
        assert torch.equal(again(ids, pixels)[0], ref)


# ---- forward, loss, gradients ---------------------------------------------------------------

def sample(ids, labels, pixels=None):
    """A dataset sample as ChiMedDataset gives it: ids and labels with the image expanded."""
    ids, labels = expand_images(ids, 16, labels)
    return dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), id=0,
                pixel_values=pixels if pixels is not None else torch.zeros(0, 3, 56, 56))


def test_loss_equals_hand_computation(pixels):
    """Two ragged samples, right-padded by collate: the loss is the mean over every learned next
    token, whether collate's positions are passed or the model finds them."""
    torch.manual_seed(0)
    model = QilinMedVL(demo_config()).eval()
    a_ids, a_lab = [1, 5, IMAGE_TOKEN_INDEX, 7, 8, 9, 2], [IGNORE_INDEX] * 4 + [8, 9, 2]
    b_ids, b_lab = [1, 11, 12, 13, 2], [IGNORE_INDEX] * 3 + [13, 2]
    batch = collate([sample(a_ids, a_lab, pixels), sample(b_ids, b_lab)], pad_id=0, image_size=56)
    with torch.no_grad():
        _, loss = model(batch["input_ids"], batch["pixel_values"], batch["labels"], batch["image_positions"],
                        batch["loss_positions"])
        _, found = model(batch["input_ids"], batch["pixel_values"], batch["labels"])
        # By hand: embed each sample separately, run the LLM alone, sum -log p(next) over learned tokens.
        image = model.projector(model.vision(pixels))[0]  # (16, 64)
        emb = model.llm.embed_tokens
        seq_a = torch.cat([emb(torch.tensor(a_ids[:2])), image, emb(torch.tensor(a_ids[3:]))])
        targets_a = [IGNORE_INDEX] * 2 + [IGNORE_INDEX] * 16 + a_lab[3:]
        seq_b, targets_b = emb(torch.tensor(b_ids)), b_lab
        total, count = 0.0, 0
        for seq, targets in ((seq_a, targets_a), (seq_b, targets_b)):
            logp = model.llm(inputs_embeds=seq[None])[0].log_softmax(-1)
            for t in range(1, len(targets)):
                if targets[t] != IGNORE_INDEX:
                    total -= logp[t - 1, targets[t]].item()
                    count += 1
    assert count == 3 + 2 == len(batch["loss_positions"])
    print(f"loss {loss.item():.6f} vs by hand {total / count:.6f}")
    assert abs(loss.item() - total / count) < 1e-5 and abs(found.item() - loss.item()) < 1e-6


@pytest.mark.parametrize("stage", [1, 2])
def test_text_only_batch_keeps_every_module_in_the_graph(stage):
    """A micro-batch without any image (LLaVA mixes text-only dialogs into stage 2) still runs the
    vision tower and the adapter, on collate's zero image, and splices none of it: the loss has a
    gradient path (stage 1 trains the adapter alone) and the adapter's gradient is exactly zero."""
    torch.manual_seed(0)
    model = QilinMedVL(demo_config()).train()
    model.set_trainable(stage)
    batch = collate([sample([1, 11, 12, 13, 2], [IGNORE_INDEX] * 3 + [13, 2]), None], pad_id=0, image_size=56)
    assert batch["pixel_values"].shape == (1, 3, 56, 56) and len(batch["image_positions"]) == 0
    _, loss = model(batch["input_ids"], batch["pixel_values"], batch["labels"], batch["image_positions"],
                    batch["loss_positions"])
    loss.backward()
    assert torch.isfinite(loss) and loss.requires_grad
    assert all(p.grad is not None and not p.grad.any() for p in model.projector.parameters())
    assert (stage == 2) == (model.llm.lm_head.weight.grad is not None)


def test_every_sample_dropped_gives_a_zero_loss_step():
    torch.manual_seed(0)
    model = QilinMedVL(demo_config()).train()
    model.set_trainable(1)
    batch = collate([None, None], pad_id=0, image_size=56)
    assert batch["n_dropped"] == 2 and batch["ids"] == [] and batch["input_ids"].shape == (1, 1)
    _, loss = model(batch["input_ids"], batch["pixel_values"], batch["labels"], batch["image_positions"],
                    batch["loss_positions"])
    loss.backward()
    assert loss.item() == 0 and all(p.grad is not None for p in model.projector.parameters())


SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::masked_select")


@pytest.mark.parametrize("stage", [1, 2])
def test_training_step_never_waits_for_the_device(stage, pixels):
    """Forward and backward with collate's positions run no op whose result size or value the
    host must read back (on a GPU each such op stalls the CPU until the GPU catches up)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = QilinMedVL(demo_config()).train()
    model.set_trainable(stage)
    model.llm.gradient_checkpointing = True
    samples = [sample([1, 5, IMAGE_TOKEN_INDEX, 7, 8, 9, 2], [IGNORE_INDEX] * 4 + [8, 9, 2], pixels),
               sample([1, 11, 12, 13, 2], [IGNORE_INDEX] * 3 + [13, 2])]
    batch = collate(samples, pad_id=0, image_size=56)
    with Recorder() as rec:
        _, loss = model(batch["input_ids"], batch["pixel_values"], batch["labels"], batch["image_positions"],
                        batch["loss_positions"])
        loss.backward()
    assert len(rec.ops) > 100 and "aten::index_copy" in rec.ops  # the recorder saw the step
    waits = [op for op in rec.ops if op in SYNC_OPS]
    print(f"stage {stage}: {len(rec.ops)} ops in forward+backward, {len(waits)} that wait for the device")
    assert waits == []
    with Recorder() as rec:  # the recorder can fail: without positions the model looks them up
        model(batch["input_ids"], batch["pixel_values"], batch["labels"])
    assert "aten::nonzero" in rec.ops


@pytest.mark.parametrize("stage", [1, 2])
def test_gradients_reach_exactly_the_trainable_parts(stage, pixels):
    torch.manual_seed(0)
    model = QilinMedVL(demo_config()).train()
    model.set_trainable(stage)
    ids, labels = expand_images([1, IMAGE_TOKEN_INDEX, 4, 5, 6, 2], 16, [IGNORE_INDEX] * 3 + [5, 6, 2])
    _, loss = model(torch.tensor([ids]), pixels, torch.tensor([labels]))
    loss.backward()
    for name, p in model.named_parameters():
        trainable = name.startswith("projector.") or (stage == 2 and name.startswith("llm."))
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_image_token_count_must_match_images(pixels):
    model = QilinMedVL(demo_config()).eval()
    with pytest.raises(ValueError, match="32 image tokens in input_ids but 1 images of 16 features each"):
        model(torch.tensor([expand_images([1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 4], 16)]), pixels)


def test_vision_folder_refused_where_the_checkpoint_has_its_own(hf_llava, clip_folder, tmp_path):
    _, folder = hf_llava
    with pytest.raises(CheckpointError, match="carries its own vision tower"):
        QilinMedVL.from_pretrained(folder, vision_path=clip_folder)
