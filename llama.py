"""LLaMA-2, the language model of Qilin-Med-VL (paper section 4.1).

Qilin-Med-VL's LLM, a Chinese fine-tune of LLaMA-2-13B-Chat, is a decoder-only transformer: RMSNorm before each
sub-layer, rotary position embeddings (RoPE), SwiGLU feed-forward layers, (in later LLaMAs) grouped-query attention.
model.py feeds it `inputs_embeds` with image features where `<image>` stood; otherwise a plain causal language model.

Two paths through attention, both via `F.scaled_dot_product_attention`:
  * training / full forward: no cache and no dense mask. Batches are right-padded, so every pad sits after every
    real token and `is_causal=True` alone is exact for the real tokens; SDPA can then pick its flash kernel.
  * decoding: a static KV cache, preallocated once and written in place at the slots `input_pos` names. Every step
    attends over the whole cache with a mask of the filled slots, so each step has the same shapes: a compiled
    decode step is captured once as a CUDA graph and replayed (gpt-fast's recipe; see chat.generate).

Reference: Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models"; module names follow the
Hugging Face checkpoints (`model.layers.N.self_attn.q_proj`, ...).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoint import assign_weights, read_config, read_weights


@dataclass
class LlamaArgs:
    dim: int = 5120
    n_layers: int = 40
    n_heads: int = 40
    n_kv_heads: int = 40  # fewer than n_heads = grouped-query attention
    intermediate_size: int = 13824
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def flops_per_token(self, seq_len, backward=True, lm_head=True):
        """Matmul FLOPs per token, as nanoGPT and PaLM count them: 2 per weight N forward (multiply and add), twice
        that again backward, so 6N; plus attention's scores and weighted sum, 2 * 2 * d * T per layer forward (over
        the full T x T square, though causal needs half). Embedding lookup and norms are free. lm_head=False leaves
        out the output layer, for tokens whose logits are never computed. From the shapes alone, so it also holds
        while ZeRO-3 has the weights scattered."""
        d, q, kv = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        n = self.n_layers * (d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size) + d * self.vocab_size * lm_head
        forward = 2 * n + 4 * self.n_layers * d * seq_len
        return 3 * forward if backward else forward

    def step_flops(self, lengths, n_logits, weight_grads=True):
        """A training step's FLOPs for sequences of these lengths, the output layer only at the n_logits positions
        that get logits: 3x the forward, or 2x without weight gradients (stage 1: the frozen LLM still passes
        gradients through to the adapter, so about 4N per token rather than 6N)."""
        body = sum(T * self.flops_per_token(T, backward=False, lm_head=False) for T in lengths)
        head = self.flops_per_token(0, backward=False) - self.flops_per_token(0, backward=False, lm_head=False)
        return (3 if weight_grads else 2) * (body + n_logits * head)

    @classmethod
    def preset(cls, name):
        return {
            "13b": cls(),  # LLaMA-2-13B, as in Qilin-Med-VL
            "7b": cls(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008),
            # CPU demo size; vocab_size is set from the demo tokenizer.
            "demo": cls(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, intermediate_size=352, max_seq_len=512),
        }[name]

    @classmethod
    def from_hf_config(cls, c):
        """From a LlamaConfig dict. Absent keys mean Hugging Face's defaults: rms_norm_eps 1e-6,
        num_key_value_heads = num_attention_heads, rope_theta 10000 (transformers 5 nests it in `rope_parameters`)."""
        rope = c.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or c.get("rope_scaling"):
            raise ValueError(f"RoPE scaling {rope or c.get('rope_scaling')} is not supported (LLaMA-2 uses none)")
        n_heads, dim = c.get("num_attention_heads", 32), c.get("hidden_size", 4096)
        if c.get("head_dim", dim // n_heads) != dim // n_heads:
            raise ValueError(f"head_dim {c['head_dim']} != hidden_size / num_attention_heads is not supported")
        if c.get("tie_word_embeddings"):
            raise ValueError("tie_word_embeddings is not supported: LLaMA-2 has separate input and output embeddings")
        return cls(dim=dim, n_layers=c.get("num_hidden_layers", 32), n_heads=n_heads,
                   n_kv_heads=c.get("num_key_value_heads") or n_heads, vocab_size=c.get("vocab_size", 32000),
                   intermediate_size=c.get("intermediate_size", 11008), norm_eps=c.get("rms_norm_eps", 1e-6),
                   rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                   max_seq_len=c.get("max_position_embeddings", 4096))

    def to_hf_config(self):
        return dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=self.dim,
                    num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                    num_key_value_heads=self.n_kv_heads, intermediate_size=self.intermediate_size,
                    vocab_size=self.vocab_size, rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                    max_position_embeddings=self.max_seq_len, tie_word_embeddings=False,
                    hidden_act="silu", bos_token_id=1, eos_token_id=2)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as the reference does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps):
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """RoPE angles for integer positions (B, T) -> cos, sin (B, 1, T, head_dim), in float32 each forward: cheap, and
    exact at any position. HF's weights pair dimension i with i + head_dim/2 ("rotate_half"), so angles come twice."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):  # x: (B, H, T, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache(nn.Module):
    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        for name in ("k", "v"):  # a captured CUDA graph may write to them in place (chat.compiled)
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            torch._dynamo.mark_static_address(getattr(self, name))

    def update(self, input_pos, k, v):
        """Write k, v (B, Hkv, T, hd) at slots input_pos (T,); return the whole cache (B, Hkv, S, hd).
        Writing through an index tensor (no Python int) keeps the shapes fixed from step to step."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.head_dim = args.head_dim
        self.gqa = args.n_kv_heads != args.n_heads  # fewer key/value heads than query heads: grouped-query attention
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache = None  # a KVCache while decoding (Llama.setup_cache)

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # q (B, H, T, hd); k, v (B, Hkv, T, hd)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is None:  # full sequence, right-padded: causal alone is exact
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
        else:  # decoding: attend over the whole cache; `mask` hides the slots not (yet) visible
            k, v = self.cache.update(input_pos, k, v)  # (B, Hkv, S, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def swiglu(gate, up):
    return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward (training memory)
        for m in self.modules():  # HF's initializer_range, 0.02, for random models; loading replaces it
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, input_ids=None, *, inputs_embeds=None, input_pos=None, positions=None, pad_mask=None,
                logits_at=None):
        """Token ids (B, T) or embeddings (B, T, dim) -> logits (B, T, vocab): a causal forward with no cache, unless
        input_pos (T,) long, after `setup_cache`, names the cache slots of these T tokens; each then sees the filled
        slots up to its own. Decoding also passes:
          positions (B, T): RoPE positions, default input_pos; left-padded rows count only their real tokens.
          pad_mask (B, S): bool over the S cache slots, False where a slot holds padding.
        And training or a prefill:
          logits_at (M,): flat indices into the B*T positions -> only their logits (M, vocab): the answer tokens' for
            the loss, the last position's for a prefill; the full matrix can cost more than a small model's layers."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, dim)
        B, T, _ = x.shape
        if positions is None:
            positions = (input_pos if input_pos is not None else torch.arange(T, device=x.device)).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta, x.dtype)
        mask = None
        if input_pos is not None:
            slots = torch.arange(self.cache_len, device=x.device)  # (S,)
            mask = slots <= input_pos[:, None]  # (T, S): causal over the cache
            if pad_mask is not None:  # hide padding; a query always sees its own slot (no all-masked row, no NaN)
                mask = (mask & pad_mask[:, None, None, :]) | (slots == input_pos[:, None])  # (B, 1, T, S)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, input_pos, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, input_pos, mask)
        if logits_at is not None:
            x = x.flatten(0, 1)[logits_at]  # (M, dim)
        return self.lm_head(self.norm(x))

    def setup_cache(self, batch_size, max_seq_len=None, dtype=None, device=None):
        """A static KV cache for decoding (forward with input_pos). A cache of the same batch size, dtype and device
        that is long enough is kept, and new ones get a multiple of 256 slots (capped at the model's context), so a
        compiled decode step replays its captured graph instead of compiling again."""
        dtype, device = dtype or self.lm_head.weight.dtype, torch.device(device or self.lm_head.weight.device)
        need = max_seq_len or self.args.max_seq_len
        old = self.layers[0].self_attn.cache
        if (old is not None and old.k.shape[0] == batch_size and old.k.shape[2] >= need
                and old.k.dtype == dtype and old.k.device == device):
            return
        slots = min(-(-need // 256) * 256, max(need, self.args.max_seq_len))
        for layer in self.layers:
            layer.self_attn.cache = KVCache(batch_size, slots, self.args.n_kv_heads, self.args.head_dim, dtype, device)

    @property
    def cache_len(self):
        return self.layers[0].self_attn.cache.k.shape[2]

    def clear_cache(self):
        for layer in self.layers:
            layer.self_attn.cache = None

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """Load a Hugging Face LLaMA folder (LlamaForCausalLM weights + config.json)."""
        with torch.device("meta"):
            model = cls(LlamaArgs.from_hf_config(read_config(path)))
        return assign_weights(model, read_weights(path), llama_key, dtype=dtype, device=device, what="LLaMA model")


POINTWISE = dict(rms_norm=rms_norm, apply_rope=apply_rope, swiglu=swiglu)  # their eager versions


def fuse_pointwise(enable=True):
    """Compile the pointwise work between the matmuls, so each runs as one fused kernel instead of several passes over
    memory: RMSNorm's float32 round trip (casts, a reduction, multiplies), RoPE and SwiGLU; eager, they take about a
    quarter of a 13B training step's GPU time. Only these parameter-free functions are compiled, not whole blocks, so
    DeepSpeed's ZeRO-3 hooks on each weight stay outside the compiled code. train.py --compile calls this."""
    # The modules above look these names up when they run, so rebinding them here swaps the compiled versions in
    # everywhere at once, without a second set of modules; enable=False rebinds the eager ones.
    globals().update({name: torch.compile(f, dynamic=True) if enable else f for name, f in POINTWISE.items()})


def llama_key(key):
    """Checkpoint key -> our parameter name: strip `model.`; skip old files' RoPE buffers."""
    return None if key.endswith("rotary_emb.inv_freq") else key.removeprefix("model.")


if __name__ == "__main__":
    # Logits of a short token sequence from a random demo-size model, or from a real folder.
    import sys

    llm = Llama.from_pretrained(sys.argv[1]) if len(sys.argv) > 1 else Llama(LlamaArgs.preset("demo"))
    ids = torch.tensor([[1, 319, 13, 29871]]) % llm.args.vocab_size
    with torch.no_grad():
        logits = llm(ids)
    print(f"tokens {tuple(ids.shape)} -> logits {tuple(logits.shape)}; next token {logits[0, -1].argmax().item()}")
