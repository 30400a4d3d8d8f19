"""The official linear-probe optimisation (eval_linear.py: nn.Linear, CrossEntropyLoss, SGD with
momentum 0.9 and no weight decay, CosineAnnealingLR(epochs, eta_min=0) stepped per epoch) on
given features, for tests/eval.rs.

Usage: python linear_probe_ref.py IN.npz OUT.npz
IN.npz: feats [E, S, B, F] (epoch, step, batch), targets [E, S, B], weight [C, F], bias [C],
        lr [] (already scaled by batch/256)
OUT.npz: weight, bias after training, losses [E, S]
"""
import sys

import numpy as np
import torch
from torch import nn

d = np.load(sys.argv[1])
feats, targets = torch.from_numpy(d["feats"]), torch.from_numpy(d["targets"])
epochs, steps = targets.shape[:2]
linear = nn.Linear(feats.shape[-1], d["weight"].shape[0])
with torch.no_grad():
    linear.weight.copy_(torch.from_numpy(d["weight"]))
    linear.bias.copy_(torch.from_numpy(d["bias"]))
opt = torch.optim.SGD(linear.parameters(), float(d["lr"]), momentum=0.9, weight_decay=0)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
losses = np.zeros((epochs, steps), dtype=np.float64)
for e in range(epochs):
    for s in range(steps):
        loss = nn.CrossEntropyLoss()(linear(feats[e, s]), targets[e, s])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses[e, s] = loss.item()
    sched.step()
np.savez(sys.argv[2], weight=linear.weight.detach().numpy(), bias=linear.bias.detach().numpy(), losses=losses)
