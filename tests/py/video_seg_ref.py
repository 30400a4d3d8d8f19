"""The label propagation of eval_video_segmentation.py (restrict_neighborhood, norm_mask,
label_propagation and the queue loop of eval_video_tracking_davis), reimplemented here from the
published script on given patch features, for tests/protocols.rs.

Usage: python video_seg_ref.py IN.npz OUT.npz
IN.npz: feats [T, h*w, dim] (frame patch features), seg [h, w] int64 (first frame's labels at
        patch resolution), cfg [n_last_frames, size_mask_neighborhood, topk, h, w, patch]
OUT.npz: labels{t} [h*patch, w*patch] for t = 1..T-1
"""
import copy
import queue
import sys

import numpy as np
import torch
from torch.nn import functional as F

d = np.load(sys.argv[1])
n_last_frames, size_mask, topk, h, w, patch = (int(v) for v in d["cfg"])
feats = torch.from_numpy(d["feats"])


def restrict_neighborhood(h, w):
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size_mask + 1):
                for q in range(2 * size_mask + 1):
                    if i - size_mask + p < 0 or i - size_mask + p >= h:
                        continue
                    if j - size_mask + q < 0 or j - size_mask + q >= w:
                        continue
                    mask[i, j, i - size_mask + p, j - size_mask + q] = 1
    return mask.reshape(h * w, h * w)


def norm_mask(mask):
    c = mask.size(0)
    for cnt in range(c):
        m = mask[cnt, :, :]
        if m.max() > 0:
            m = m - m.min()
            m = m / m.max()
            mask[cnt, :, :] = m
    return mask


def label_propagation(feat_tar, list_frame_feats, list_segs, mask_neighborhood):
    return_feat_tar = feat_tar.T
    ncontext = len(list_frame_feats)
    feat_sources = torch.stack(list_frame_feats)
    feat_tar = F.normalize(feat_tar, dim=1, p=2)
    feat_sources = F.normalize(feat_sources, dim=1, p=2)
    feat_tar = feat_tar.unsqueeze(0).repeat(ncontext, 1, 1)
    aff = torch.exp(torch.bmm(feat_tar, feat_sources) / 0.1)
    if size_mask > 0:
        if mask_neighborhood is None:
            mask_neighborhood = restrict_neighborhood(h, w).unsqueeze(0).repeat(ncontext, 1, 1)
        aff *= mask_neighborhood
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    tk_val, _ = torch.topk(aff, dim=0, k=topk)
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    segs = torch.cat(list_segs)
    nmb_context, C, hh, ww = segs.shape
    segs = segs.reshape(nmb_context, C, -1).transpose(2, 1).reshape(-1, C).T
    seg_tar = torch.mm(segs, aff).reshape(1, C, h, w)
    return seg_tar, return_feat_tar, mask_neighborhood


seg = torch.from_numpy(d["seg"])
n = int(seg.max()) + 1
first_seg = torch.zeros(h * w, n).scatter_(1, seg.view(-1, 1), 1).view(h, w, n).permute(2, 0, 1).unsqueeze(0)
que = queue.Queue(n_last_frames)
frame1_feat = feats[0].T
mask_neighborhood = None
out = {}
for cnt in range(1, feats.shape[0]):
    used_feats = [frame1_feat] + [pair[0] for pair in list(que.queue)]
    used_segs = [first_seg] + [pair[1] for pair in list(que.queue)]
    avg, feat_tar, mask_neighborhood = label_propagation(feats[cnt], used_feats, used_segs, mask_neighborhood)
    if que.qsize() == n_last_frames:
        que.get()
    que.put([feat_tar, copy.deepcopy(avg)])
    avg = F.interpolate(avg, scale_factor=patch, mode="bilinear", align_corners=False,
                        recompute_scale_factor=False)[0]
    avg = norm_mask(avg)
    _, lab = torch.max(avg, dim=0)
    out[f"labels{cnt}"] = lab.numpy().astype(np.int64)
np.savez(sys.argv[2], **out)
