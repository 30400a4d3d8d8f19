"""eval_image_retrieval.py's image preparation, for tests/protocols.rs: `img.thumbnail((s, s),
LANCZOS)` (Pillow), ToTensor + Normalize (torchvision's arithmetic: uint8 / 255 in float32, then
(x - mean) / std), and the multi-scale inputs
`F.interpolate(x, scale_factor=s, mode='bilinear', align_corners=False)` for s in 1/sqrt(2), 1/2.

Usage: python retrieval_prep_ref.py IN.npz OUT.npz
IN.npz: img{i} [H, W, 3] uint8, imsize []
OUT.npz: thumb{i} [h, w, 3] uint8; x{i} [1, 3, h, w]; s1_{i}, s2_{i}: the rescaled inputs
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

d = np.load(sys.argv[1])
imsize = int(d["imsize"])
mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
out = {}
i = 0
while f"img{i}" in d.files:
    img = Image.fromarray(d[f"img{i}"])
    img.thumbnail((imsize, imsize), Image.LANCZOS)
    a = np.array(img)
    out[f"thumb{i}"] = a
    x = torch.from_numpy(a).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    x = x.sub(mean).div(std).unsqueeze(0)
    out[f"x{i}"] = x.numpy()
    for j, s in enumerate([1 / 2 ** (1 / 2), 1 / 2]):
        out[f"s{j + 1}_{i}"] = F.interpolate(x, scale_factor=s, mode="bilinear",
                                             align_corners=False).numpy()
    i += 1
np.savez(sys.argv[2], **out)
