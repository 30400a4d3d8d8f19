"""The official visualize_correspondence.py operations on one batch, with plain torch/numpy:
nearest patches (bmm + max), the attention brought to the patch grid (nearest) and averaged over
heads, the top-k patches of image 1 and their matches; in instance mode the patch centres from
the crops' corners (np.linspace), the overlap mask, the true nearest patch and the accuracy.
For tests/analysis_tools.rs.

Usage: python correspondence_ref.py IN.npz OUT.npz
IN.npz: x1, x2 [B, N, D]; attn [B, heads, 1 + Na, 1 + Na]; cfg [topk, eval_radius, patch_size,
        img_size, instance]; corners1, corners2 [B, 4] float64 (instance mode).
OUT.npz: value, index [B, N]; attentions [B, ga, ga]; attentions1 [B, N]; points1, points2 [B, k];
         and in instance mode ovlp [B, N] (0/1), real_index [B, N], accuracy [] .
"""
import sys

import numpy as np
import torch
from torch import nn

d = np.load(sys.argv[1])
x1 = torch.from_numpy(d["x1"])
x2 = torch.from_numpy(d["x2"])
attn = torch.from_numpy(d["attn"])
topk, eval_radius, patch_size, img_size, instance = (int(v) for v in d["cfg"])
B, N, _ = x1.shape
unit = int(round(N ** 0.5))
ga = int(round((attn.shape[-1] - 1) ** 0.5))

ovlp = None
if instance:
    p1, p2 = d["corners1"], d["corners2"]
    pos1 = torch.stack((
        torch.from_numpy(np.linspace(p1[:, 0], p1[:, 2], num=2 * unit + 1)[1::2]).unsqueeze(1).expand(-1, unit, -1),
        torch.from_numpy(np.linspace(p1[:, 1], p1[:, 3], num=2 * unit + 1)[1::2]).unsqueeze(0).expand(unit, -1, -1))
    ).flatten(1, 2).permute(2, 1, 0)
    pos2 = torch.stack((
        torch.from_numpy(np.linspace(p2[:, 0], p2[:, 2], num=2 * unit + 1)[1::2]).unsqueeze(1).expand(-1, unit, -1),
        torch.from_numpy(np.linspace(p2[:, 1], p2[:, 3], num=2 * unit + 1)[1::2]).unsqueeze(0).expand(unit, -1, -1))
    ).flatten(1, 2).permute(2, 1, 0)
    eps = patch_size // 2 / img_size
    ovlp = ((pos1 + eps) > pos2.min(dim=1, keepdim=True)[0]).all(dim=-1) & \
        ((pos1 - eps) < pos2.max(dim=1, keepdim=True)[0]).all(dim=-1)
    ovlp_grid = ovlp.view(-1, 1, unit, unit)

attentions = attn[:, :, 0, 1:].reshape(B, -1, ga, ga)
attentions1 = nn.functional.interpolate(attentions, size=(unit, unit), mode="nearest")
if ovlp is not None:
    attentions1 = attentions1 * ovlp_grid.float()
    attentions = attentions * nn.functional.interpolate(ovlp_grid.float(), size=(ga, ga), mode="nearest")
attentions = attentions.mean(1, keepdim=True)
attentions1 = attentions1.mean(1, keepdim=True)

sim_matrix = torch.bmm(x1, x2.permute(0, 2, 1))
value, index = sim_matrix.max(-1)

out = {}
if instance:
    real_sim_matrix = torch.matmul(pos1, pos2.permute(0, 2, 1))
    real_dst_matrix = pos1.square().sum(2, keepdim=True) + \
        pos2.permute(0, 2, 1).square().sum(1, keepdim=True) - 2 * real_sim_matrix
    real_index = real_dst_matrix.min(dim=2)[1]
    index_h, index_w = index // unit, index % unit
    real_index_h, real_index_w = real_index // unit, real_index % unit
    accuracy = (((index_h - real_index_h).abs() <= eval_radius) & ((index_w - real_index_w).abs() <= eval_radius) & ovlp.flatten(1)).sum() / ovlp.sum()
    out.update(ovlp=ovlp.float().numpy(), real_index=real_index.numpy(), accuracy=np.array(accuracy.item()))

points1, points2 = [], []
for id, attention1 in zip(index, attentions1):
    st = attention1[0].flatten().topk(topk)[1]
    points1.append(st.numpy())
    points2.append(id[st].numpy())

np.savez(
    sys.argv[2],
    value=value.numpy(),
    index=index.numpy(),
    attentions=attentions[:, 0].numpy(),
    attentions1=attentions1[:, 0].reshape(B, -1).numpy(),
    points1=np.stack(points1),
    points2=np.stack(points2),
    **out,
)
