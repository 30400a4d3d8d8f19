"""Builds PyTorch checkpoints in the official iBOT layouts, for tests/interop.rs.

Usage: python make_official_pth.py PARAMS.npz OUT_DIR [ARCH]
PARAMS.npz holds a student state dict (official names, `backbone.*` / `head.*`; ViT or Swin);
ARCH (default vit_tiny) only goes into the recorded args. Writes:
  full.pth           like main_ibot.py's checkpoint.pth: student (DDP `module.` prefix), teacher,
                     optimizer, epoch, args (an argparse.Namespace), ibot_loss, fp16_scaler
  teacher_state.pth  {"state_dict": teacher backbone} like the released backbone files
  teacher_bare.pth   the bare backbone dictionary, like extract_backbone_weights.py output
  legacy.pth         full.pth in the pre-1.6 (non-zip) serialisation
  evil.pth           a backbone plus an object whose unpickling would call os.system
"""
import argparse
import collections
import os
import sys

import numpy as np
import torch

params = np.load(sys.argv[1])
out = sys.argv[2]
student = collections.OrderedDict((k, torch.from_numpy(params[k].copy())) for k in params.files)
teacher = collections.OrderedDict((k, v.clone()) for k, v in student.items() if k != "backbone.masked_embed")
backbone = collections.OrderedDict((k[len("backbone."):], v) for k, v in teacher.items() if k.startswith("backbone."))

arch = sys.argv[3] if len(sys.argv) > 3 else "vit_tiny"
ns = argparse.Namespace(arch=arch, patch_size=4 if arch.startswith("swin") else 16, out_dim=1024, epochs=100, lr=5e-4, data_path="/data/imagenet")
trainable = [v for k, v in student.items() if not k.endswith("weight_g")]
optimizer = {
    "state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)} for i, v in enumerate(trainable[:3])},
    "param_groups": [{"lr": 1e-4, "weight_decay": 0.04, "params": list(range(len(trainable)))}],
}
full = {
    "student": collections.OrderedDict(("module." + k, v) for k, v in student.items()),
    "teacher": teacher,
    "optimizer": optimizer,
    "epoch": 7,
    "args": ns,
    "ibot_loss": {"center": torch.zeros(1, 1024), "center2": torch.zeros(1, 1, 1024)},
    "fp16_scaler": None,
}
torch.save(full, os.path.join(out, "full.pth"))
torch.save(full, os.path.join(out, "legacy.pth"), _use_new_zipfile_serialization=False)
torch.save({"state_dict": backbone}, os.path.join(out, "teacher_state.pth"))
torch.save(backbone, os.path.join(out, "teacher_bare.pth"))


class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.path.join(out, "PWNED"),))


torch.save({"state_dict": backbone, "payload": Evil()}, os.path.join(out, "evil.pth"))
