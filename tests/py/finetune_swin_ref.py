"""Reference values for tests/finetune_swin.rs: the Swin classifier of iBOT's
models/swin_transformer.py (`SwinTransformer(num_classes > 0)`: 4-px-style conv patch embedding
with its LayerNorm, stages of window / shifted-window blocks with relative position bias, the
padding of each block's map to whole windows, the official SW-MSA mask, PatchMerging with odd-grid
padding, final norm, average pool, linear head), written out here in plain PyTorch under the
official state-dict names, with the official `get_parameter_groups` and Swin layer ids
(tests/py/finetune_ref.py), timm's Mixup targets and SoftTargetCrossEntropy, `clip_grad_norm_`
and `torch.optim.AdamW`; and the relative-position-table / position-embedding resizing
conventions (timm's `resize_rel_pos_bias_table_simple`, the official Swin's `init_weights`
formula, run_class_finetuning.py's pos_embed interpolation).

Usage:
  python finetune_swin_ref.py step IN.npz OUT.npz
      IN.npz: parameters under "p.<name>", buffers (relative_position_index) under "b.<name>",
      x [B,3,S,S] (already mixed), y [B] int64, lam [] , cfg JSON as a uint8 array
      ({"embed_dim", "depths", "num_heads", "window_size", "patch", "img_size", "nb_classes",
        "smoothing", "layer_decay", "lr", "wd", "clip"})
      OUT.npz: "p.<name>" after one step, "g.<name>" the clipped gradients, "loss", "grad_norm",
      "target" (timm's mixup_target), "index_ok" (1 when every given relative_position_index
      equals the official one for the block's window)
  python finetune_swin_ref.py resize IN.npz OUT.npz
      IN.npz: "table.<i>" [(2s-1)^2, heads] with "window.<i>" (new window), "pos.<i>" [1, 1+n, D]
      with "grid.<i>" (new grid side)
      OUT.npz: "timm.<i>" (timm.layers.resize_rel_pos_bias_table_simple), "official.<i>" (the
      official Swin init_weights formula), "index.<i>" (the official relative_position_index of
      the new window), "pos.<i>" (run_class_finetuning.py's interpolation)
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import finetune_ref as ref  # noqa: E402


def drop_path(x, p, training):
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype)).floor_()
    return x.div(keep) * mask


def window_partition(x, ws):
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, C)


def window_reverse(windows, ws, H, W):
    B = int(windows.shape[0] / (H * W / ws / ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


def official_index(ws):
    coords = torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)


class Mlp(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    def __init__(self, d, ws, heads):
        super().__init__()
        self.ws, self.num_heads = ws, heads
        self.scale = (d // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", official_index(ws))
        self.qkv = nn.Linear(d, 3 * d, bias=True)
        self.proj = nn.Linear(d, d)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            self.ws * self.ws, self.ws * self.ws, -1).permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B_, N, C))


class SwinTransformerBlock(nn.Module):
    def __init__(self, d, res, heads, ws, shift, dpr):
        super().__init__()
        # The official rule: a map not larger than the window is one window, without shift.
        if res <= ws:
            shift, ws = 0, res
        self.ws, self.shift, self.dpr = ws, shift, dpr
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = WindowAttention(d, ws, heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, 4 * d)

    def create_attn_mask(self, H, W):
        ws, s = self.ws, self.shift
        Hp, Wp = int(np.ceil(H / ws)) * ws, int(np.ceil(W / ws)) * ws
        img_mask = torch.zeros((1, Hp, Wp, 1))
        slices = (slice(0, -ws), slice(-ws, -s), slice(-s, None))
        cnt = 0
        for h in slices:
            for w in slices:
                img_mask[:, h, w, :] = cnt
                cnt += 1
        mw = window_partition(img_mask, ws).view(-1, ws * ws)
        m = mw.unsqueeze(1) - mw.unsqueeze(2)
        return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)

    def forward(self, x):
        B, L, C = x.shape
        H = W = int(math.sqrt(L))
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        ws = self.ws
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, Hp, Wp, _ = x.shape
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = self.create_attn_mask(H, W)
        else:
            mask = None
        w = window_partition(x, ws).view(-1, ws * ws, C)
        w = self.attn(w, mask).view(-1, ws, ws, C)
        x = window_reverse(w, ws, Hp, Wp)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        if pad_r > 0 or pad_b > 0:
            x = x[:, :H, :W, :].contiguous()
        x = shortcut + drop_path(x.view(B, H * W, C), self.dpr, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.dpr, self.training)


class PatchMerging(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.reduction = nn.Linear(4 * d, 2 * d, bias=False)
        self.norm = nn.LayerNorm(4 * d, eps=1e-6)

    def forward(self, x):
        B, L, C = x.shape
        H = W = int(math.sqrt(L))
        x = x.view(B, H, W, C)
        if H % 2 == 1 or W % 2 == 1:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class BasicLayer(nn.Module):
    def __init__(self, d, res, depth, heads, ws, dprs, downsample):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(d, res, heads, ws, 0 if j % 2 == 0 else ws // 2, dprs[j])
            for j in range(depth)])
        self.downsample = PatchMerging(d) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, patch, d):
        super().__init__()
        self.proj = nn.Conv2d(3, d, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, x):
        x = self.proj(x)
        B, C, H, W = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(B, C, H, W)


class SwinTransformer(nn.Module):
    """models/swin_transformer.py's classifier (ape=False, patch_norm=True, LayerNorm eps 1e-6)."""

    def __init__(self, img_size, patch, d, depths, heads, ws, nb_classes, drop_path_rate=0.0):
        super().__init__()
        self.depths = depths
        self.patch_embed = PatchEmbed(patch, d)
        res = img_size // patch
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        self.layers = nn.ModuleList([
            BasicLayer(d * 2 ** i, res // 2 ** i, depths[i], heads[i], ws,
                       dpr[sum(depths[:i]):sum(depths[:i + 1])], i < len(depths) - 1)
            for i in range(len(depths))])
        self.num_features = d * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.head = nn.Linear(self.num_features, nb_classes)

    def no_weight_decay(self):
        return {"absolute_pos_embed"}

    def get_num_layers(self):
        return sum(self.depths)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        x = torch.flatten(F.adaptive_avg_pool1d(x.transpose(1, 2), 1), 1)
        return self.head(x)


def step(inp, outp):
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    d = np.load(inp)
    c = json.loads(bytes(d["cfg"]).decode())
    x = torch.from_numpy(d["x"])
    y = torch.from_numpy(d["y"])
    lam = float(d["lam"])
    m = SwinTransformer(c["img_size"], c["patch"], c["embed_dim"], c["depths"], c["num_heads"],
                        c["window_size"], c["nb_classes"])
    sd = m.state_dict()
    index_ok = all(torch.equal(sd[k[2:]], torch.from_numpy(d[k])) for k in d.files if k.startswith("b."))
    index_ok = index_ok and sum(k.startswith("b.") for k in d.files) == sum("relative_position_index" in k for k in sd)
    params = {k[2:]: torch.from_numpy(d[k]) for k in d.files if k.startswith("p.")}
    missing, unexpected = m.load_state_dict(params, strict=False)
    assert not unexpected and all("relative_position_index" in k for k in missing), (missing, unexpected)
    m.train()
    target = mixup_target(y, c["nb_classes"], lam, c["smoothing"])
    # run_class_finetuning.py with 'swin' in --model: the Swin assigner over the official groups.
    names, groups = ref.swin_groups_of(m, c["layer_decay"], c["wd"])
    opt = torch.optim.AdamW(groups, lr=c["lr"], weight_decay=0.0, foreach=False)
    for g in opt.param_groups:
        g["lr"] = c["lr"] * g["lr_scale"]
    loss = SoftTargetCrossEntropy()(m(x), target)
    opt.zero_grad()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(m.parameters(), c["clip"])
    opt.step()
    out = {"p." + k: v.detach().numpy() for k, v in m.named_parameters()}
    for k, v in m.named_parameters():
        out["g." + k] = v.grad.numpy()
    out["loss"] = np.array(loss.item())
    out["grad_norm"] = np.array(float(norm))
    out["target"] = target.numpy()
    out["index_ok"] = np.array(int(index_ok))
    np.savez(outp, **{k: np.ascontiguousarray(v) for k, v in out.items()})


def resize(inp, outp):
    from timm.layers.pos_embed_rel import resize_rel_pos_bias_table_simple

    d = np.load(inp)
    out = {}
    for k in d.files:
        if k.startswith("table."):
            i = k.split(".", 1)[1]
            t = torch.from_numpy(d[k])
            w = int(d["window." + i])
            s2 = 2 * w - 1
            out["timm." + i] = resize_rel_pos_bias_table_simple(t, (w, w), (s2 * s2, t.shape[1])).numpy()
            # models/swin_transformer.py SwinTransformer.init_weights, for a table of another size.
            L1, nH = t.shape
            s1 = int(L1 ** 0.5)
            r = F.interpolate(t.permute(1, 0).view(1, nH, s1, s1), size=(s2, s2), mode="bicubic")
            out["official." + i] = r.view(nH, s2 * s2).permute(1, 0).numpy()
            out["index." + i] = official_index(w).numpy()
        elif k.startswith("pos."):
            i = k.split(".", 1)[1]
            pe = torch.from_numpy(d[k])
            new = int(d["grid." + i])
            # run_class_finetuning.py's pos_embed interpolation (one extra token, the [CLS]).
            dim = pe.shape[-1]
            orig = int((pe.shape[-2] - 1) ** 0.5)
            tok = pe[:, 1:].reshape(-1, orig, orig, dim).permute(0, 3, 1, 2)
            tok = F.interpolate(tok, size=(new, new), mode="bicubic", align_corners=False)
            tok = tok.permute(0, 2, 3, 1).flatten(1, 2)
            out["pos." + i] = torch.cat((pe[:, :1], tok), dim=1).numpy()
    np.savez(outp, **{k: np.ascontiguousarray(v) for k, v in out.items()})


if __name__ == "__main__":
    {"step": step, "resize": resize}[sys.argv[1]](sys.argv[2], sys.argv[3])
