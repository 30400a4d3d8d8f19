"""Steps of eval_linear_multi.py's optimisers on a linear classifier, for tests/protocols.rs:
torch.optim.SGD(momentum=0.9, weight_decay=wd) and the official utils.LARS (reimplemented here
from its published definition: decay and the trust ratio eta * |p| / |dp| on parameters with
more than one dimension, momentum buffer starting at zero, p -= lr * mu).

Usage: python linear_opt_ref.py IN.npz OUT.npz
IN.npz: feats [S, B, F], targets [S, B], weight [C, F], bias [C], and per case i: lr [k],
        wd [k], lars [k] (1 for LARS, 0 for SGD)
OUT.npz: weight{i}, bias{i} after the S steps of case i
"""
import sys

import numpy as np
import torch
from torch import nn


class Lars(torch.optim.Optimizer):
    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(pn)
                    q = torch.where(pn > 0.0, torch.where(un > 0, g["eta"] * pn / un, one), one)
                    dp = dp.mul(q)
                st = self.state[p]
                if "mu" not in st:
                    st["mu"] = torch.zeros_like(p)
                st["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(st["mu"], alpha=-g["lr"])


d = np.load(sys.argv[1])
feats, targets = torch.from_numpy(d["feats"]), torch.from_numpy(d["targets"])
out = {}
for i in range(len(d["lr"])):
    linear = nn.Linear(feats.shape[-1], d["weight"].shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(d["weight"]))
        linear.bias.copy_(torch.from_numpy(d["bias"]))
    lr, wd = float(d["lr"][i]), float(d["wd"][i])
    if d["lars"][i] > 0:
        opt = Lars(linear.parameters(), lr, momentum=0.9, weight_decay=wd)
    else:
        opt = torch.optim.SGD(linear.parameters(), lr, momentum=0.9, weight_decay=wd)
    for s in range(feats.shape[0]):
        loss = nn.CrossEntropyLoss()(linear(feats[s]), targets[s])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out[f"weight{i}"] = linear.weight.detach().numpy()
    out[f"bias{i}"] = linear.bias.detach().numpy()
np.savez(sys.argv[2], **out)
