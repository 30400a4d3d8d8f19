"""The official evaluation features (eval_knn.py / eval_linear.py `extract_features`) of a ViT
laid out as the official models/vision_transformer.py (pre-norm blocks, LayerNorm eps 1e-6,
fused qkv with bias, exact GELU, a final `norm` that the mean-pooling model of
`--avgpool_patchtokens 1` replaces by an identity; weights loaded as `load_pretrained_weights`
does, strict=False), written here with plain torch. For tests/eval.rs.

Usage: python features_ref.py IN.npz OUT.npz
IN.npz: cfg [depth, num_heads, patch_size, n_last_blocks], x [B, 3, H, W] (H, W the grid the
        position embedding was built for), and the backbone state dict as `sd/<key>`.
OUT.npz: f0, f1, f2: the features of avgpool_patchtokens 0, 1 and 2; knn: f0 L2-normalised as
         eval_knn.py does before the k-NN.
"""
import sys

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class ViT(nn.Module):
    def __init__(self, dim, depth, heads, hidden, patch, npatch, use_mean_pooling):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, npatch + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if use_mean_pooling else None

    def get_intermediate_layers(self, x, n):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                out.append(self.norm(x))
        return out


d = np.load(sys.argv[1])
depth, heads, patch, n = (int(v) for v in d["cfg"])
x = torch.from_numpy(d["x"])
sd = {k[len("sd/"):]: torch.from_numpy(d[k]) for k in d.files if k.startswith("sd/")}
dim = sd["cls_token"].shape[-1]
hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
npatch = sd["pos_embed"].shape[1] - 1
feats = {}
for avgpool in (0, 1, 2):
    model = ViT(dim, depth, heads, hidden, patch, npatch, use_mean_pooling=avgpool == 1)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert unexpected == ([] if avgpool != 1 else ["norm.weight", "norm.bias"]), unexpected
    model.eval()
    with torch.no_grad():
        inter = model.get_intermediate_layers(x, n)
        if avgpool == 0:
            output = [t[:, 0] for t in inter]
        elif avgpool == 1:
            output = [torch.mean(inter[-1][:, 1:], dim=1)]
        else:
            output = [t[:, 0] for t in inter] + [torch.mean(inter[-1][:, 1:], dim=1)]
        feats[f"f{avgpool}"] = torch.cat(output, dim=-1).numpy()
feats["knn"] = F.normalize(torch.from_numpy(feats["f0"]), dim=1, p=2).numpy()
np.savez(sys.argv[2], **feats)
