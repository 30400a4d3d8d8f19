"""Writes linear-classifier checkpoints as the official eval_linear.py and eval_linear_multi.py
save them, and scores features with a classifier as the official validate_network +
utils.accuracy. For tests/analysis_tools.rs.

Usage: python linear_ref.py IN.npz OUT.npz OUT_DIR
IN.npz: weight [C, F], bias [C], weight2 [C, F], bias2 [C] (a second classifier of a sweep),
        feats [M, F], labels [M].
OUT.npz: acc1 [], acc5 [] (percent, classifier 1 on feats).
OUT_DIR: linear.pth ({"epoch", "state_dict": {"module.linear.weight", ...}, "optimizer", "best_acc"})
         multi.pth ({"state_dict": {"0.module.linear.weight", "1.module.linear...."}, "best_acc_hidx": 1, ...})
"""
import collections
import os
import sys

import numpy as np
import torch

d = np.load(sys.argv[1])
out = sys.argv[3]
w, b = torch.from_numpy(d["weight"]), torch.from_numpy(d["bias"])
w2, b2 = torch.from_numpy(d["weight2"]), torch.from_numpy(d["bias2"])
sd = collections.OrderedDict([("module.linear.weight", w), ("module.linear.bias", b)])
torch.save({"epoch": 3, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}, "best_acc": 12.5},
           os.path.join(out, "linear.pth"))
multi = collections.OrderedDict([
    ("0.module.linear.weight", w2), ("0.module.linear.bias", b2),
    ("1.module.linear.weight", w), ("1.module.linear.bias", b),
])
torch.save({"epoch": 3, "state_dict": multi, "best_acc": 12.5, "best_acc_hidx": 1, "best_acc_sweep_lr_only": 10.0},
           os.path.join(out, "multi.pth"))


def accuracy(output, target, topk=(1,)):
    maxk = max(topk)
    batch_size = target.size(0)
    _, pred = output.topk(maxk, 1, True, True)
    pred = pred.t()
    correct = pred.eq(target.reshape(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0) * 100. / batch_size for k in topk]


feats = torch.from_numpy(d["feats"])
labels = torch.from_numpy(d["labels"])
output = torch.nn.functional.linear(feats.view(feats.size(0), -1), w, b)
acc1, acc5 = accuracy(output, labels, topk=(1, 5))
np.savez(sys.argv[2], acc1=np.array(acc1.item()), acc5=np.array(acc5.item()))
