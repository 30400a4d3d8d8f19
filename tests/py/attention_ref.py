"""The official visualize_attention.py treatment of a last-block attention tensor: the [CLS]
row without its own column, per head, and the mask of the patches that hold `threshold` of a
head's mass (ascending sort, normalise, cumulative sum > 1 - threshold, back to patch order).

Usage: python attention_ref.py IN.npz OUT.npz
IN.npz: attn [1, heads, 1 + N, 1 + N], grid [2] (gh, gw), threshold []
OUT.npz: attentions [heads, gh, gw], th_attn [heads, gh, gw] (float 0/1)
"""
import sys

import numpy as np
import torch

d = np.load(sys.argv[1])
attn = torch.from_numpy(d["attn"])
gh, gw = (int(v) for v in d["grid"])
threshold = float(d["threshold"])
heads = attn.shape[1]
maps = attn[0, :, 0, 1:].reshape(heads, -1)
ranked, order = torch.sort(maps)
ranked = ranked / torch.sum(ranked, dim=1, keepdim=True)
keep = torch.cumsum(ranked, dim=1) > (1 - threshold)
back = torch.argsort(order)
for h in range(heads):
    keep[h] = keep[h][back[h]]
np.savez(
    sys.argv[2],
    attentions=maps.reshape(heads, gh, gw).numpy(),
    th_attn=keep.reshape(heads, gh, gw).float().numpy(),
)
