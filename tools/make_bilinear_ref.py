"""Writes tests/data/bilinear_ref.json: Pillow's BILINEAR crop-and-resize of a fixed random
image (the resampling of torchvision's RandomResizedCrop default, used by the official linear
probe), for tests/augment.rs. Run once with Pillow installed:
  .venv/bin/pip install pillow && .venv/bin/python tools/make_bilinear_ref.py
"""
import json

import numpy as np
import PIL
from PIL import Image

rng = np.random.default_rng(3)
h, w = 23, 31
pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
img = Image.fromarray(pixels, "RGB")
cases = []
# (top, left, height, width, out_h, out_w): down- and up-scaling, one axis unchanged, 1 px.
for box in [(0, 0, 23, 31, 9, 9), (2, 5, 17, 20, 40, 33), (0, 3, 23, 11, 23, 7), (4, 4, 1, 6, 5, 3), (1, 0, 20, 31, 7, 31)]:
    top, left, bh, bw, oh, ow = box
    out = img.crop((left, top, left + bw, top + bh)).resize((ow, oh), Image.BILINEAR)
    cases.append({"box": list(box), "out": np.asarray(out).reshape(-1).tolist()})
json.dump({"pillow": PIL.__version__, "height": h, "width": w, "pixels": pixels.reshape(-1).tolist(), "cases": cases},
          open("tests/data/bilinear_ref.json", "w"))
