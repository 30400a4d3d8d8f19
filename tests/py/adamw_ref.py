"""torch.optim.AdamW over several steps with the official two parameter groups (weight decay on
group 0 only; per step, as main_ibot's loop sets them, `lr` on every group and `weight_decay` on
group 0), including a parameter whose gradient is None on some steps (the frozen last layer:
AdamW skips it, its step count stays behind). For tests/train.rs.

Usage: python adamw_ref.py IN.npz OUT.npz
IN.npz: w, b, v (initial values: w and v in group 0, b in group 1), gw [S, ...], gb [S, ...],
        gv [S, ...], v_has_grad [S] (0/1), lr [S], wd [S]
OUT.npz: for each of w, b, v: the final value, `<n>_exp_avg`, `<n>_exp_avg_sq`, `<n>_step`
"""
import sys

import numpy as np
import torch

d = np.load(sys.argv[1])
p = {n: torch.nn.Parameter(torch.from_numpy(d[n]).clone()) for n in "wbv"}
opt = torch.optim.AdamW(
    [{"params": [p["w"], p["v"]]}, {"params": [p["b"]], "weight_decay": 0.0}],
    lr=0.0, betas=(0.9, 0.999), eps=1e-8, foreach=False,
)
for s in range(d["lr"].shape[0]):
    for i, group in enumerate(opt.param_groups):
        group["lr"] = float(d["lr"][s])
        if i == 0:
            group["weight_decay"] = float(d["wd"][s])
    p["w"].grad = torch.from_numpy(d["gw"][s]).clone()
    p["b"].grad = torch.from_numpy(d["gb"][s]).clone()
    p["v"].grad = torch.from_numpy(d["gv"][s]).clone() if d["v_has_grad"][s] else None
    opt.step()
out = {}
for n, t in p.items():
    st = opt.state[t]
    out[n] = t.detach().numpy()
    out[n + "_exp_avg"] = st["exp_avg"].numpy()
    out[n + "_exp_avg_sq"] = st["exp_avg_sq"].numpy()
    out[n + "_step"] = np.array(float(st["step"]))
np.savez(sys.argv[2], **out)
