"""The revisited Oxford/Paris metric, reimplemented here from the published description of
revisitop's `compute_ap` / `compute_map` (filipradenovic/revisitop, python/evaluate.py): AP as
trapezoids of the precision-recall curve over the positions of the positives, positions lowered
by the junk images ranked before them, queries without positives skipped (NaN); mP@k with
k clipped to the position of the last positive. For tests/protocols.rs.

Usage: python revisitop_map.py IN.npz OUT.npz
IN.npz: either ranks [n_db, nq] (0-based database indices, best first) or db [n_db, D] and
        q [nq, D] (L2-normalised features, ranked as eval_image_retrieval.py does:
        argsort(-db @ q.T, dim=0)); ok [nq, L] and junk [nq, L] padded with -1; ks [k]
OUT.npz: map [], aps [nq], pr [k], prs [nq, k]; with features also the official protocols
         mapM, mapH, mprM, mprH, mapE, mprE from easy/hard/junk [nq, L] given instead of ok/junk
"""
import sys

import numpy as np
import torch


def ap_of(pos, nres):
    ap = 0.0
    step = 1.0 / nres
    for j, rank in enumerate(pos):
        p0 = 1.0 if rank == 0 else float(j) / rank
        p1 = float(j + 1) / (rank + 1)
        ap += (p0 + p1) * step / 2.0
    return ap


def map_of(ranks, ok, junk, ks):
    nq = len(ok)
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(ks)), np.nan)
    total, pr, nempty = 0.0, np.zeros(len(ks)), 0
    for i in range(nq):
        qok = np.array(ok[i])
        if qok.shape[0] == 0:
            nempty += 1
            continue
        qjunk = np.array(junk[i])
        col = ranks[:, i]
        pos = np.nonzero(np.isin(col, qok))[0]
        jpos = np.nonzero(np.isin(col, qjunk))[0]
        # each positive moves up by the number of junk images ranked strictly before it
        shift = np.array([np.sum(jpos < p) for p in pos], dtype=np.int64)
        pos = pos - shift
        ap = ap_of(pos, len(qok))
        aps[i] = ap
        total += ap
        pos = pos + 1
        for j, k in enumerate(ks):
            kq = min(pos.max(), k)
            prs[i, j] = (pos <= kq).sum() / kq
        pr += prs[i]
    return total / (nq - nempty), aps, pr / (nq - nempty), prs


def unpad(a):
    return [[int(v) for v in row if v >= 0] for row in a]


d = np.load(sys.argv[1])
ks = [int(k) for k in d["ks"]]
out = {}
if "ranks" in d.files:
    m, aps, pr, prs = map_of(d["ranks"], unpad(d["ok"]), unpad(d["junk"]), ks)
    out.update(map=np.array(m), aps=aps, pr=pr, prs=prs)
else:
    db, q = torch.from_numpy(d["db"]), torch.from_numpy(d["q"])
    ranks = torch.argsort(-torch.mm(db, q.T), dim=0).numpy()
    easy, hard, junk = unpad(d["easy"]), unpad(d["hard"]), unpad(d["junk"])
    nq = len(easy)
    m, _, pr, _ = map_of(ranks, [easy[i] + hard[i] for i in range(nq)], junk, ks)
    out.update(mapM=np.array(m), mprM=pr)
    m, _, pr, _ = map_of(ranks, hard, [junk[i] + easy[i] for i in range(nq)], ks)
    out.update(mapH=np.array(m), mprH=pr)
    m, _, pr, _ = map_of(ranks, easy, [junk[i] + hard[i] for i in range(nq)], ks)
    out.update(mapE=np.array(m), mprE=pr)
np.savez(sys.argv[2], **out)
