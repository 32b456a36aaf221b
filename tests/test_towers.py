"""vit.py and llama.py against transformers: tiny random models saved in every file layout we read.

Each test builds a random Hugging Face model, saves it, loads it with our `from_pretrained`,
and compares outputs in fp32. The printed differences are the tolerances reached (pytest -s).
"""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from checkpoint import CheckpointError
from llama import Llama, LlamaArgs
from vit import VisionArgs, VisionTransformer

TOL = 1e-4  # for results computed two ways (a KV cache against full forwards)
# Parity with transformers is exact: on the CPU in fp32 the same operations give the same floats, and any tolerance
# would hide a near miss (a tanh-approximate GELU, a norm's eps off by a little)
EXACT = 0.0


def save_bin_shards(model, folder, n_shards=2):
    """The pre-safetensors layout of older repos (and of the released Qilin-Med-VL-Chat):
    pytorch_model-0000k-of-0000n.bin shards plus pytorch_model.bin.index.json."""
    os.makedirs(folder, exist_ok=True)
    model.config.to_json_file(os.path.join(folder, "config.json"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = list(state)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: state[k] for k in keys[i::n_shards]}
        torch.save(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def save(model, folder, layout):
    if layout == "single":
        model.save_pretrained(folder)
    elif layout == "sharded":
        model.save_pretrained(folder, max_shard_size="40KB")
        assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    else:
        save_bin_shards(model, folder)


def clip_vision_config(**kw):
    base = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                image_size=56, patch_size=14)
    return CLIPVisionConfig(**{**base, **kw})


# ---- vision tower ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
@pytest.mark.parametrize("image_size,patch_size", [(56, 14), (84, 14), (64, 16)])
def test_clip_vision_model_parity(tmp_path, layout, image_size, patch_size):
    torch.manual_seed(0)
    hf = CLIPVisionModel(clip_vision_config(image_size=image_size, patch_size=patch_size)).eval()
    save(hf, tmp_path, layout)
    ours = VisionTransformer.from_pretrained(tmp_path)
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        hidden = hf(pixels, output_hidden_states=True).hidden_states
        for layer in (-2, -1, 1):
            diff = (ours(pixels, select_layer=layer) - hidden[layer][:, 1:]).abs().max().item()
            print(f"vit {layout} {image_size}/{patch_size} layer {layer}: max |diff| {diff:.2e}")
            assert diff <= EXACT
    assert ours(pixels).shape == (2, (image_size // patch_size) ** 2, 48)


def test_full_clip_model_parity(tmp_path):
    """openai/clip-vit-large-patch14-336 is a full CLIPModel: `vision_model.*` keys, text tower ignored."""
    torch.manual_seed(1)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=99, bos_token_id=0,
                                         eos_token_id=1),
                        vision_config=clip_vision_config().to_dict(), projection_dim=16)
    hf = CLIPModel(config).eval()
    hf.save_pretrained(tmp_path)
    ours = VisionTransformer.from_pretrained(tmp_path)
    assert ours.args == VisionArgs.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ref = hf.vision_model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        diff = (ours(pixels) - ref).abs().max().item()
    print(f"CLIPModel vision features: max |diff| {diff:.2e}")
    assert diff <= EXACT


def test_vision_args_defaults_from_sparse_config():
    args = VisionArgs.from_hf_config({"vision_config": {"hidden_size": 1024, "image_size": 336, "patch_size": 14,
                                                        "num_hidden_layers": 24, "num_attention_heads": 16,
                                                        "intermediate_size": 4096}})
    assert args == VisionArgs.preset("vit-l-14-336")
    assert args.num_patches == 576 and args.act == "quick_gelu" and args.norm_eps == 1e-5


# ---- language model -------------------------------------------------------------------------

LLAMA_CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa+theta": dict(num_key_value_heads=1, rope_theta=500000.0),
    "eps-given": dict(rms_norm_eps=1e-5),
    "eps-absent": dict(),  # transformers' default 1e-6 must be read back as 1e-6
}


def llama_config(**kw):
    base = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                vocab_size=120, max_position_embeddings=256)
    return LlamaConfig(**{**base, **kw})


@pytest.mark.parametrize("name", list(LLAMA_CONFIGS))
@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_llama_parity(tmp_path, name, layout):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(llama_config(**LLAMA_CONFIGS[name])).eval()
    save(hf, tmp_path, layout)
    config = json.loads((tmp_path / "config.json").read_text())
    if name == "eps-absent":
        config.pop("rms_norm_eps", None)
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert LlamaArgs.from_hf_config(config).norm_eps == 1e-6
    ours = Llama.from_pretrained(tmp_path)
    ids = torch.randint(0, 120, (2, 40))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    print(f"llama {name} {layout}: max |logit diff| {diff:.2e}")
    assert diff <= EXACT


def test_llama_config_variants():
    """rope_theta at the top level (transformers 4) or under rope_parameters (transformers 5)."""
    assert LlamaArgs.from_hf_config({"rope_theta": 1e6}).rope_theta == 1e6
    assert LlamaArgs.from_hf_config({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}).rope_theta == 5e5
    assert LlamaArgs.from_hf_config({}).rope_theta == 10000.0
    assert LlamaArgs.from_hf_config({"num_attention_heads": 8}).n_kv_heads == 8
    with pytest.raises(ValueError, match="RoPE scaling"):
        LlamaArgs.from_hf_config({"rope_scaling": {"rope_type": "linear", "factor": 2.0}})


def test_llama_inputs_embeds_and_backward_match(tmp_path):
    """The training path: embeddings in, gradients out, both equal to transformers'."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(llama_config(num_key_value_heads=2)).train()
    hf.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(tmp_path).train().requires_grad_(True)
    ours.gradient_checkpointing = True  # recomputation must not change gradients
    ids = torch.randint(0, 120, (2, 24))
    ours(inputs_embeds=ours.embed_tokens(ids)).square().mean().backward()
    hf(inputs_embeds=hf.model.embed_tokens(ids)).logits.square().mean().backward()
    for name, ref in (("layers.0.self_attn.q_proj.weight", hf.model.layers[0].self_attn.q_proj.weight),
                      ("layers.2.mlp.down_proj.weight", hf.model.layers[2].mlp.down_proj.weight),
                      ("embed_tokens.weight", hf.model.embed_tokens.weight)):
        grad = dict(ours.named_parameters())[name].grad
        diff = ((grad - ref.grad).abs().max() / ref.grad.abs().max()).item()
        print(f"grad {name}: max relative diff {diff:.2e}")
        assert diff <= EXACT


def test_kv_cache_rollout_equals_full_forwards(tmp_path):
    """Greedy decoding with the static cache gives the logits of full, uncached forwards."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(llama_config(num_key_value_heads=2)).eval()
    hf.save_pretrained(tmp_path)
    model = Llama.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, 120, (1, 11))
    with torch.no_grad():
        model.setup_cache(batch_size=1, max_seq_len=64)
        logits = model(prompt, input_pos=torch.arange(prompt.shape[1]))[:, -1]
        seq, pos, worst = prompt, prompt.shape[1], 0.0
        for _ in range(12):
            full = model(seq)[:, -1]  # no cache, whole sequence
            worst = max(worst, (full - logits).abs().max().item())
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits = model(nxt, input_pos=torch.tensor([pos]))[:, -1]
            pos += 1
        model.clear_cache()
    print(f"cached vs full logits over 12 greedy steps: max |diff| {worst:.2e}")
    assert worst < TOL


def test_kv_cache_chunked_prefill_and_left_padding(tmp_path):
    """Two prompt chunks (the second at slots 4.. with T > 1) and a left-padded batch give the same logits."""
    torch.manual_seed(0)
    model = Llama(LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                            vocab_size=100, max_seq_len=64)).eval()
    a, b = torch.randint(0, 100, (1, 9)), torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        ref_a, ref_b = model(a)[:, -1], model(b)[:, -1]
        model.setup_cache(1, 32)
        model(a[:, :4], input_pos=torch.arange(4))
        chunked = model(a[:, 4:], input_pos=torch.arange(4, 9))[:, -1]
        # Batch [a, b] with b left-padded by 4: positions count real tokens only.
        batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
        real = torch.ones(2, 9, dtype=torch.bool)
        real[1, :4] = False
        positions = (real.cumsum(1) - 1).clamp(min=0)
        model.setup_cache(2, 32)
        pad_mask = torch.ones(2, model.cache_len, dtype=torch.bool)
        pad_mask[:, :9] = real
        out = model(batch, input_pos=torch.arange(9), positions=positions, pad_mask=pad_mask)[:, -1]
    assert (chunked - ref_a).abs().max() < TOL
    assert (out[0] - ref_a[0]).abs().max() < TOL and (out[1] - ref_b[0]).abs().max() < TOL


# ---- bad checkpoints ------------------------------------------------------------------------

@pytest.fixture
def llama_folder(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path / "ok")
    return tmp_path / "ok"


def rewrite(folder, edit):
    from checkpoint import read_safetensors
    state = {k: v.clone() for k, v in read_safetensors(str(folder / "model.safetensors")).items()}
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def test_missing_tensor_is_named(llama_folder):
    rewrite(llama_folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing: layers\.1\.mlp\.up_proj\.weight"):
        Llama.from_pretrained(llama_folder)


def test_wrong_shape_is_named(llama_folder):
    def edit(s):
        s["model.norm.weight"] = torch.ones(63)
    rewrite(llama_folder, edit)
    with pytest.raises(CheckpointError, match=r"wrong shape: model\.norm\.weight \(in model\.safetensors\): "
                                              r"checkpoint \(63,\), LLaMA model expects \(64,\)"):
        Llama.from_pretrained(llama_folder)


def test_unknown_key_is_named(llama_folder):
    def edit(s):
        s["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    rewrite(llama_folder, edit)
    with pytest.raises(CheckpointError, match=r"unexpected: model\.layers\.0\.self_attn\.q_norm\.weight"):
        Llama.from_pretrained(llama_folder)


def test_missing_config_json(llama_folder):
    (llama_folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        Llama.from_pretrained(llama_folder)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        VisionTransformer.from_pretrained(tmp_path / "nowhere")


def test_truncated_safetensors(llama_folder):
    path = llama_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        Llama.from_pretrained(llama_folder)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        Llama.from_pretrained(llama_folder)


def test_safetensors_header_whose_shape_disagrees_with_its_bytes(llama_folder):
    path = llama_folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k.endswith("norm.weight"))
    header[key]["shape"] = [header[key]["shape"][0] + 1]  # one element more than its bytes hold
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(data[:8] + text.ljust(n) + data[8 + n:])  # the same header length, padded with spaces
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor {key} has"):
        Llama.from_pretrained(llama_folder)


def test_missing_shard_and_no_weights(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path / "m", max_shard_size="40KB")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="names shard files that are not there"):
        Llama.from_pretrained(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        Llama.from_pretrained(tmp_path / "empty")


def test_corrupt_bin_shard(tmp_path):
    torch.manual_seed(0)
    save_bin_shards(LlamaForCausalLM(llama_config()), tmp_path)
    (tmp_path / "pytorch_model-00002-of-00002.bin").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        Llama.from_pretrained(tmp_path)


def test_loaded_weights_are_not_written_back(llama_folder):
    """The mapping is private: training the loaded model never changes the file on disk."""
    before = (llama_folder / "model.safetensors").read_bytes()
    model = Llama.from_pretrained(llama_folder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert (llama_folder / "model.safetensors").read_bytes() == before


def test_bad_index_and_unknown_dtype_are_named(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path / "m", max_shard_size="40KB")
    (tmp_path / "m" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a valid index"):
        Llama.from_pretrained(tmp_path / "m")
    header = json.dumps({"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "f8").mkdir()
    (tmp_path / "f8" / "config.json").write_text(json.dumps(llama_config().to_dict()))
    (tmp_path / "f8" / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0")
    with pytest.raises(CheckpointError, match="tensor x has dtype F8_E4M3"):
        Llama.from_pretrained(tmp_path / "f8")


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="tie_word_embeddings is not supported"):
        LlamaArgs.from_hf_config({"tie_word_embeddings": True})
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        VisionArgs.from_hf_config({"hidden_act": "relu"})
