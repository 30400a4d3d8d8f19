"""eval_copy_detection.py's operations, for tests/protocols.rs: the [CLS] + GeM (p = 4) feature
from the last block's tokens, the whitening (mean of the whitening features subtracted, PCA of
their uncentred second moment with power 0.5, eigenvalues floored at 1e-5 of the largest), L2
normalisation, top-20 retrieval and the per-block mAP of `eval_result` with the Holidays AP
(`score_ap_from_ranks_1`), reimplemented here from the published script.

Usage: python copydetection_ref.py IN.npz OUT.npz
IN.npz: tokens [B, 1 + h*w, D], grid [h, w]; queries [nq, D2], database [ndb, D2], whit [nw, D2]
        (use_whit [] 0/1), sizes [nblocks], strong [] (index of the strong block, -1: none),
        strong_pos [n_strong, L] padded with -1
OUT.npz: feat [B, 2D]; ids [nq, 20]; maps [nblocks]
"""
import sys

import numpy as np
import torch
from torch import nn

d = np.load(sys.argv[1])
out = {}
feats = torch.from_numpy(d["tokens"])
h, w = (int(v) for v in d["grid"])
b, dim = feats.shape[0], feats.shape[-1]
cls = feats[:, 0, :]
g = feats[:, 1:, :].reshape(b, h, w, dim).clamp(min=1e-6).permute(0, 3, 1, 2)
g = nn.functional.avg_pool2d(g.pow(4), (h, w)).pow(1.0 / 4).reshape(b, -1)
out["feat"] = torch.cat((cls, g), dim=1).numpy()

database = torch.from_numpy(d["database"]).double()
queries = torch.from_numpy(d["queries"]).double()
if int(d["use_whit"]):
    fw = torch.from_numpy(d["whit"]).double()
    mean = torch.mean(fw, dim=0)
    database -= mean
    queries -= mean
    cov = (torch.mm(fw.T, fw) / fw.shape[0]).numpy()
    ev, vec = np.linalg.eigh(cov)
    eps = ev.max() * 1e-5
    ev[ev < eps] = eps
    idx = np.argsort(ev)[::-1][: database.shape[-1]]
    ev, vec = ev[idx], vec[:, idx]
    dvt = np.dot(np.diag(1.0 / ev ** 0.5), vec.T)
    database = torch.mm(torch.from_numpy(dvt), database.T).T
    queries = torch.mm(torch.from_numpy(dvt), queries.T).T
database = nn.functional.normalize(database, dim=1, p=2)
queries = nn.functional.normalize(queries, dim=1, p=2)
_, ids = torch.mm(queries, database.T).topk(20, largest=True, sorted=True)
ids = ids.numpy()
out["ids"] = ids


def ap_from_ranks(ranks, nres):
    ap = 0.0
    step = 1.0 / nres
    for ntp, rank in enumerate(ranks):
        p0 = 1.0 if rank == 0 else ntp / float(rank)
        p1 = (ntp + 1) / float(rank + 1)
        ap += (p1 + p0) * step / 2.0
    return ap


strong = int(d["strong"])
spos = [[int(v) for v in row if v >= 0] for row in d["strong_pos"]]
maps = []
j0 = 0
for i, size in enumerate(int(s) for s in d["sizes"]):
    j1 = j0 + size
    positives_per_query = spos if i == strong else [[q] for q in range(size)]
    total = 0.0
    for qno, line in enumerate(ids[j0:j1]):
        pos = positives_per_query[qno]
        ranks = [r for r, bno in enumerate(line) if bno in pos]
        total += ap_from_ranks(ranks, len(pos))
    maps.append(total / size)
    j0 = j1
out["maps"] = np.array(maps)
np.savez(sys.argv[2], **out)
