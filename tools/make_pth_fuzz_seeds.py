"""Writes seed inputs for the `pth` fuzz target into fuzz/corpus/pth: small files in each layout
the reader must understand (official full checkpoint with `module.` names and an
argparse.Namespace, released `state_dict` file, legacy non-zip pickle, mixed dtypes).
  .venv/bin/python tools/make_pth_fuzz_seeds.py
"""
import argparse
import collections
import os

import torch

out = "fuzz/corpus/pth"
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
net = collections.OrderedDict(
    (f"module.backbone.{k}", torch.randn(*shape))
    for k, shape in [
        ("cls_token", (1, 1, 8)),
        ("pos_embed", (1, 5, 8)),
        ("patch_embed.proj.weight", (8, 3, 2, 2)),
        ("blocks.0.norm1.weight", (8,)),
        ("blocks.0.mlp.fc1.weight", (32, 8)),
    ]
)
bare = {k.removeprefix("module.backbone."): v for k, v in net.items()}
ns = argparse.Namespace(arch="vit_tiny", lr=1e-3)
torch.save({"student": net, "teacher": net, "epoch": 3, "args": ns}, f"{out}/full.pth")
torch.save({"state_dict": bare}, f"{out}/state_dict.pth")
torch.save(net, f"{out}/legacy.pth", _use_new_zipfile_serialization=False)
torch.save({"x": torch.arange(5), "h": torch.zeros(3, dtype=torch.float16)}, f"{out}/mixed.pth")
print("seeds in", out)
