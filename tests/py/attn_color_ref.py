"""The official visualize_attention.py `show_attn_color` pixels (the masked_image it shows),
with numpy as the official code computes them: the normalised image stretched, grey, lightened
and darkened to a tenth; per head (the first six, `company_colors`) the attention times its mass
mask, kept where the head is the largest and no earlier head has a value, painted with
`apply_mask2` (alpha 1). One guard the official code lacks: a head whose map is constant paints
nothing (the official division by zero would make the picture NaN). For tests/analysis_tools.rs.

Usage: python attn_color_ref.py IN.npz OUT.npz
IN.npz: img [3, H, W] (normalised), attentions [nh, gh, gw], th_attn [nh, gh, gw], patch [].
OUT.npz: pic [H, W, 3] uint8.
"""
import sys

import numpy as np
import torch
from torch import nn

d = np.load(sys.argv[1])
patch = int(d["patch"])
img = torch.from_numpy(d["img"])
attentions = nn.functional.interpolate(torch.from_numpy(d["attentions"]).unsqueeze(0), scale_factor=patch, mode="nearest")[0].numpy()
th_attn = nn.functional.interpolate(torch.from_numpy(d["th_attn"]).unsqueeze(0), scale_factor=patch, mode="nearest")[0].numpy()

company_colors = [(0, 160, 215), (220, 55, 60), (245, 180, 0), (10, 120, 190), (40, 150, 100), (135, 75, 145)]
company_colors = [(float(c[0]) / 255.0, float(c[1]) / 255.0, float(c[2]) / 255.0) for c in company_colors]


def apply_mask2(image, mask, color, alpha=0.5):
    t = 0.2
    mi = np.min(mask)
    ma = np.max(mask)
    if ma == mi:  # the guard (see above)
        return image
    mask = (mask - mi) / (ma - mi)
    for c in range(3):
        image[:, :, c] = image[:, :, c] * (1 - alpha * np.sqrt(mask) * (mask > t)) + alpha * np.sqrt(mask) * (mask > t) * color[c] * 255
    return image


image = img.permute(1, 2, 0).numpy()
head = list(range(min(attentions.shape[0], 6)))
M = image.max()
m = image.min()
span = 64
image = ((image - m) / (M - m)) * span + (256 - span)
image = image.mean(axis=2)
image = np.repeat(image[:, :, np.newaxis], 3, axis=2)
for j in head:
    mm = attentions[j]
    mm *= th_attn[j]
    attentions[j] = mm
mask = np.stack([attentions[j] for j in head])
N = mask.shape[0]
for i in range(N):
    mask[i] = mask[i] * (mask[i] == np.amax(mask, axis=0))
a = np.cumsum(mask, axis=0)
for i in range(N):
    mask[i] = mask[i] * (mask[i] == a[i])
colors = company_colors[:N]
masked_image = 0.1 * image.astype(np.uint32).copy()
for i in range(N):
    masked_image = apply_mask2(masked_image, mask[i], colors[i], 1)
np.savez(sys.argv[2], pic=masked_image.astype(np.uint8))
