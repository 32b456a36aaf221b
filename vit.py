"""CLIP ViT-L/14-336, the frozen vision encoder of Qilin-Med-VL (paper section 4.1).

The image is cut into 14x14 patches (336/14 = 24, so 24x24 = 576 patches), each patch is embedded, a class
token is prepended, and 24 pre-LayerNorm transformer blocks mix them. Like LLaVA, Qilin-Med-VL takes the patch
tokens of the *penultimate* block (`hidden_states[-2]` in Hugging Face's terms) and drops the class token:
(B, 576, 1024) features per image. LLaVA's ablation (Liu et al. 2023, "Visual Instruction Tuning") found them
better than the last block's, which it reads as more global and abstract, where the one before keeps the local
detail an answer needs. The encoder is frozen in both training stages (paper section 4.2).

Reference: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision";
module names follow the official checkpoint (openai/clip-vit-large-patch14-336) so loading is a prefix strip.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import assign_weights, read_config, read_weights


@dataclass
class VisionArgs:
    image_size: int = 336
    patch_size: int = 14
    dim: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    intermediate_size: int = 4096
    norm_eps: float = 1e-5
    act: str = "quick_gelu"
    num_channels: int = 3

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def preset(cls, name):
        return {
            "vit-l-14-336": cls(),
            # A few-kilobyte tower for CPU demos and tests: 112/14 = 8, so 64 patches.
            "demo": cls(image_size=112, patch_size=14, dim=64, n_layers=3, n_heads=4, intermediate_size=128),
        }[name]

    @classmethod
    def from_hf_config(cls, config):
        """From a CLIPConfig (its `vision_config`) or a flat CLIPVisionConfig; absent keys take HF's defaults."""
        c = config.get("vision_config", config)
        if c.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
            raise ValueError(f"vision hidden_act {c['hidden_act']!r} is not supported ({', '.join(ACTIVATIONS)})")
        return cls(image_size=c.get("image_size", 224), patch_size=c.get("patch_size", 32),
                   dim=c.get("hidden_size", 768), n_layers=c.get("num_hidden_layers", 12),
                   n_heads=c.get("num_attention_heads", 12), intermediate_size=c.get("intermediate_size", 3072),
                   norm_eps=c.get("layer_norm_eps", 1e-5), act=c.get("hidden_act", "quick_gelu"),
                   num_channels=c.get("num_channels", 3))

    def to_hf_config(self):
        return dict(model_type="clip_vision_model", image_size=self.image_size, patch_size=self.patch_size,
                    hidden_size=self.dim, num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                    intermediate_size=self.intermediate_size, layer_norm_eps=self.norm_eps,
                    hidden_act=self.act, num_channels=self.num_channels)


ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}  # quick_gelu: CLIP's cheap GELU


class Embeddings(nn.Module):
    """Pixels -> patch tokens with a class token in front and learned positions added."""

    def __init__(self, args):
        super().__init__()
        self.patch_embedding = nn.Conv2d(args.num_channels, args.dim, args.patch_size, args.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(args.dim))
        self.position_embedding = nn.Embedding(args.num_patches + 1, args.dim)
        nn.init.normal_(self.class_embedding, std=args.dim ** -0.5)  # only matters for a random tower

    def forward(self, pixel_values):  # (B, 3, H, W)
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, C, H/p, W/p) -> (B, N, C), row-major
        x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1 + N, C)
        return x + self.position_embedding.weight.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads = args.n_heads
        self.q_proj = nn.Linear(args.dim, args.dim)
        self.k_proj = nn.Linear(args.dim, args.dim)
        self.v_proj = nn.Linear(args.dim, args.dim)
        self.out_proj = nn.Linear(args.dim, args.dim)

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, H, T, C/H)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # no mask: bidirectional, as images have no causal order
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.fc1 = nn.Linear(args.dim, args.intermediate_size)
        self.fc2 = nn.Linear(args.intermediate_size, args.dim)
        self.act = ACTIVATIONS[args.act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.self_attn = Attention(args)
        self.layer_norm2 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.embeddings = Embeddings(args)
        self.pre_layrnorm = nn.LayerNorm(args.dim, eps=args.norm_eps)  # sic: the checkpoint's spelling
        # A dict so the parameter names read `encoder.layers.N.*`, as in the checkpoint.
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(EncoderLayer(args) for _ in range(args.n_layers))})
        # Serves only CLIP's pooled class token, unused by LLaVA: kept so that every official tensor loads and exports.
        self.post_layernorm = nn.LayerNorm(args.dim, eps=args.norm_eps)

    def forward(self, pixel_values, select_layer=-2):
        """(B, 3, S, S) pixels -> (B, num_patches, dim) patch features. select_layer indexes Hugging Face's
        `hidden_states` list: entry 0 is the embedding after pre_layrnorm, entry i the output of block i, so
        -2 is the output of the second-to-last block. Blocks after the selected one are not run at all."""
        n_blocks = select_layer % (self.args.n_layers + 1)  # -2 -> 23 of 24 for ViT-L
        x = self.pre_layrnorm(self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype)))
        for layer in self.encoder["layers"][:n_blocks]:
            x = layer(x)
        return x[:, 1:]  # drop the class token: (B, num_patches, dim)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """Load a CLIP folder: a full CLIPModel (keys `vision_model.*`, text tower ignored)
        or a CLIPVisionModel (transformers 5 writes its keys without the `vision_model.` prefix)."""
        with torch.device("meta"):
            model = cls(VisionArgs.from_hf_config(read_config(path)))
        assign_weights(model, read_weights(path), clip_key, dtype=dtype, device=device, what="CLIP vision tower")
        return model.eval().requires_grad_(False)


def clip_key(key):
    """Checkpoint key -> our parameter name, or None for keys off the vision feature path (ignored on purpose)."""
    key = key.removeprefix("vision_model.")
    ignored = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "embeddings.position_ids")
    return None if key.startswith(ignored) else key


if __name__ == "__main__":
    # Features of a random image from a randomly initialised demo tower, or from a real CLIP folder.
    import sys

    vit = (VisionTransformer.from_pretrained(sys.argv[1]) if len(sys.argv) > 1
           else VisionTransformer(VisionArgs.preset("demo")).eval())
    size = vit.args.image_size
    with torch.no_grad():
        feats = vit(torch.randn(1, 3, size, size))
    print(f"image {size}x{size} -> features {tuple(feats.shape)}")
