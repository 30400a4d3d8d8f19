"""The official extract_topk_cluster.py selection on given head outputs, with plain torch: the
memory bank of (max value, argmax) per token, the per-prototype counts over `out_dim` in chunks,
and for EVERY prototype the official candidate list: for patches `(value * mask).max(-1)` per
image then `topk(values, 2 * topk)` over images (instance, row, column), for [CLS]
`topk(value * mask, topk)`. For tests/analysis_tools.rs.

Usage: python patterns_ref.py IN.npz OUT.npz
IN.npz: logits [N, L, D] (patch) or [N, D] (cls); cfg [topk, chunks, npatch_side].
OUT.npz: counts [D]; members [D, K, 2] (image, spatial), values [D, K], member [D, K] (1 where
         the candidate really is assigned to that prototype: the official list also holds
         images without any, at value 0).
"""
import sys

import numpy as np
import torch

d = np.load(sys.argv[1])
feature = torch.from_numpy(d["logits"])
topk, chunks, npatch = (int(v) for v in d["cfg"])
patch = feature.dim() == 3
out_dim = feature.shape[-1]

memory_bank = torch.stack(feature.max(-1), dim=-1)  # [N, L, 2] or [N, 2]

num_per_cluster = torch.Tensor([])
all_dim = torch.arange(out_dim).chunk(chunks)
for i in all_dim:
    if patch:
        mask = memory_bank[..., 1, None] == i.view(1, 1, -1)
        num_per_cluster = torch.cat((num_per_cluster, mask.sum((0, 1))))
    else:
        mask = memory_bank[..., 1, None] == i.view(1, -1)
        num_per_cluster = torch.cat((num_per_cluster, mask.sum(0)))

K = 2 * topk if patch else topk
members = np.full((out_dim, K, 2), -1, dtype=np.int64)
values = np.zeros((out_dim, K), dtype=np.float32)
member = np.zeros((out_dim, K), dtype=np.int64)
for i in range(out_dim):
    mask = memory_bank[..., 1] == i
    if patch:
        vals, spatial_id = (memory_bank[..., 0] * mask).max(-1)
        vals, instance_id = torch.topk(vals, K)
        spatial_id = spatial_id[instance_id]
        for j in range(K):
            inst, sp = int(instance_id[j]), int(spatial_id[j])
            members[i, j] = (inst, sp)
            values[i, j] = float(vals[j])
            member[i, j] = int(mask[inst, sp])
    else:
        vals, indices = torch.topk((memory_bank[..., 0] * mask), K)
        for j in range(K):
            members[i, j] = (int(indices[j]), 0)
            values[i, j] = float(vals[j])
            member[i, j] = int(mask[int(indices[j])])

np.savez(sys.argv[2], counts=num_per_cluster.long().numpy(), members=members, values=values, member=member)
