"""Reference values for tests/finetune.rs, from the official fine-tuning code's definitions
written out in plain PyTorch (no timm in the venv): the classifier of
evaluation/classification_layer_decay/modeling_finetune.py (abs. position embedding, no
relative position bias, no layer scale, as `run.sh imagenet_cls` builds it), the official
`optim_factory.get_parameter_groups` with `LayerDecayValueAssigner`, timm's Mixup targets and
SoftTargetCrossEntropy, `clip_grad_norm_` and `torch.optim.AdamW` with the groups' lr scales.

Usage:
  python finetune_ref.py groups '{"embed_dim":384,"depth":12,"num_heads":6,"nb_classes":10,
                                  "mean_pooling":false,"layer_decay":0.75,"weight_decay":0.05}'
      prints the groups as JSON: [[name, weight_decay, lr_scale, [param names...]], ...]
  python finetune_ref.py step IN.npz OUT.npz
      IN.npz: the model's tensors under their names (prefix "p."), x [B,3,S,S], y [B] (int64),
      cfg [embed_dim, depth, num_heads, patch, nb_classes, lam, smoothing, layer_decay, lr, wd,
      clip, mean_pooling]
      OUT.npz: "p.<name>" after one step, "g.<name>" the gradients after clipping, "loss",
      "grad_norm"
"""
import json
import math
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Mlp(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.num_heads = heads
        self.scale = (d // heads) ** -0.5
        self.qkv = nn.Linear(d, 3 * d, bias=True)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, 4 * d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, d):
        super().__init__()
        self.proj = nn.Conv2d(3, d, kernel_size=patch, stride=patch)


class VisionTransformer(nn.Module):
    """modeling_finetune.VisionTransformer's parameters, in its registration order."""

    def __init__(self, d, depth, heads, patch, grid, nb_classes, mean_pooling):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, d))
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(depth)])
        self.norm = nn.Identity() if mean_pooling else nn.LayerNorm(d, eps=1e-6)
        self.fc_norm = nn.LayerNorm(d, eps=1e-6) if mean_pooling else None
        self.head = nn.Linear(d, nb_classes)

    def get_num_layers(self):
        return len(self.blocks)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        x = self.fc_norm(x[:, 1:, :].mean(1)) if self.fc_norm is not None else x[:, 0]
        return self.head(x)


# ---- optim_factory.py, written from its definition
def get_num_layer_for_vit(var_name, num_max_layer):
    if var_name in ("cls_token", "mask_token", "pos_embed"):
        return 0
    elif var_name.startswith("patch_embed"):
        return 0
    elif var_name.startswith("rel_pos_bias"):
        return num_max_layer - 1
    elif var_name.startswith("blocks"):
        return int(var_name.split(".")[1]) + 1
    return num_max_layer - 1


class LayerDecayValueAssigner:
    def __init__(self, values):
        self.values = values

    def get_scale(self, layer_id):
        return self.values[layer_id]

    def get_layer_id(self, var_name):
        return get_num_layer_for_vit(var_name, len(self.values))


def get_parameter_groups(model, weight_decay=1e-5, skip_list=(), get_num_layer=None, get_layer_scale=None):
    names, vars_ = {}, {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip_list:
            group_name, this_wd = "no_decay", 0.0
        else:
            group_name, this_wd = "decay", weight_decay
        if get_num_layer is not None:
            layer_id = get_num_layer(name)
            group_name = "layer_%d_%s" % (layer_id, group_name)
        else:
            layer_id = None
        if group_name not in names:
            scale = get_layer_scale(layer_id) if get_layer_scale is not None else 1.0
            names[group_name] = {"weight_decay": this_wd, "params": [], "lr_scale": scale}
            vars_[group_name] = {"weight_decay": this_wd, "params": [], "lr_scale": scale}
        vars_[group_name]["params"].append(param)
        names[group_name]["params"].append(name)
    return names, list(vars_.values())


def groups_of(model, layer_decay, weight_decay):
    num_layers = model.get_num_layers()
    assigner = None
    if layer_decay < 1.0:
        assigner = LayerDecayValueAssigner(
            list(layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)))
    return get_parameter_groups(
        model, weight_decay, model.no_weight_decay(),
        assigner.get_layer_id if assigner is not None else None,
        assigner.get_scale if assigner is not None else None)


# ---- models/swin_transformer.py's parameters (registration order and shapes; no forward: the
# groups only need named_parameters), classifier head as SwinTransformer(num_classes>0) has it.
class SwinAttention(nn.Module):
    def __init__(self, d, ws, heads):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", torch.zeros(ws * ws, ws * ws, dtype=torch.long))
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)


class SwinBlock(nn.Module):
    def __init__(self, d, ws, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = SwinAttention(d, ws, heads)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = Mlp(d, 4 * d)


class PatchMerging(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.reduction = nn.Linear(4 * d, 2 * d, bias=False)
        self.norm = nn.LayerNorm(4 * d)


class BasicLayer(nn.Module):
    def __init__(self, d, depth, ws, heads, downsample):
        super().__init__()
        self.blocks = nn.ModuleList([SwinBlock(d, ws, heads) for _ in range(depth)])
        self.downsample = PatchMerging(d) if downsample else None


class SwinPatchEmbed(nn.Module):
    def __init__(self, patch, d):
        super().__init__()
        self.proj = nn.Conv2d(3, d, patch, patch)
        self.norm = nn.LayerNorm(d)


class SwinTransformer(nn.Module):
    def __init__(self, d, depths, heads, windows, patch, nb_classes, ape=False):
        super().__init__()
        self.depths = depths
        self.patch_embed = SwinPatchEmbed(patch, d)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, d))
        self.layers = nn.ModuleList([
            BasicLayer(d * 2 ** i, depths[i], windows[i], heads[i], i < len(depths) - 1)
            for i in range(len(depths))])
        self.norm = nn.LayerNorm(d * 2 ** (len(depths) - 1))
        self.head = nn.Linear(d * 2 ** (len(depths) - 1), nb_classes)

    def no_weight_decay(self):
        return {"absolute_pos_embed"}


def get_num_layer_for_swin(var_name, num_max_layer, depths):
    if var_name in ("cls_token", "mask_token", "pos_embed"):
        return 0
    elif var_name.startswith("patch_embed"):
        return 0
    elif var_name.startswith("rel_pos_bias"):
        return num_max_layer - 1
    elif var_name.startswith("layers"):
        layer_id = int(var_name.split(".")[1])
        if "blocks" in var_name:
            block_id = int(var_name.split(".")[3])
        else:
            block_id = depths[layer_id] - 1
        return sum(depths[:layer_id]) + block_id + 1
    return num_max_layer - 1


def swin_groups_of(model, layer_decay, weight_decay):
    # run_class_finetuning.py with 'swin' in --model: LayerDecayValueAssigner(values,
    # is_swin=True, depths=model.depths), num_layers = the Swin's block count.
    num_layers = sum(model.depths)
    values = list(layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2))
    get_num_layer = lambda n: get_num_layer_for_swin(n, len(values), model.depths)
    return get_parameter_groups(
        model, weight_decay, model.no_weight_decay(),
        get_num_layer if layer_decay < 1.0 else None,
        (lambda i: values[i]) if layer_decay < 1.0 else None)


# ---- timm.data.mixup (targets) and timm.loss.SoftTargetCrossEntropy
def one_hot(x, num_classes, on_value=1.0, off_value=0.0):
    x = x.long().view(-1, 1)
    return torch.full((x.size()[0], num_classes), off_value).scatter_(1, x, on_value)


def mixup_target(target, num_classes, lam=1.0, smoothing=0.0):
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    y1 = one_hot(target, num_classes, on_value=on_value, off_value=off_value)
    y2 = one_hot(target.flip(0), num_classes, on_value=on_value, off_value=off_value)
    return y1 * lam + y2 * (1.0 - lam)


def soft_target_ce(x, target):
    return torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean()


def main():
    mode = sys.argv[1]
    if mode == "swin_groups":
        c = json.loads(sys.argv[2])
        m = SwinTransformer(c["embed_dim"], c["depths"], c["num_heads"], c["windows"], c["patch"],
                            c["nb_classes"], c.get("ape", False))
        names, _ = swin_groups_of(m, c["layer_decay"], c["weight_decay"])
        print(json.dumps([[k, v["weight_decay"], repr(v["lr_scale"]), v["params"]] for k, v in names.items()]))
        return
    if mode == "groups":
        c = json.loads(sys.argv[2])
        grid = c.get("grid", 14)
        with torch.device("meta"):
            m = VisionTransformer(c["embed_dim"], c["depth"], c["num_heads"], c.get("patch", 16), grid,
                                  c["nb_classes"], c["mean_pooling"])
        names, _ = groups_of(m, c["layer_decay"], c["weight_decay"])
        # lr_scale as repr(): the shortest string that reads back to the same double (compared as
        # text, so no JSON float parser can round it).
        print(json.dumps([[k, v["weight_decay"], repr(v["lr_scale"]), v["params"]] for k, v in names.items()]))
        return
    d = np.load(sys.argv[2])
    cfg = d["cfg"]
    d_, depth, heads, patch, ncls = (int(v) for v in cfg[:5])
    lam, smoothing, layer_decay, lr, wd, clip, mean_pooling = (float(v) for v in cfg[5:12])
    x = torch.from_numpy(d["x"])
    grid = x.shape[-1] // patch
    m = VisionTransformer(d_, depth, heads, patch, grid, ncls, bool(mean_pooling))
    sd = {k[2:]: torch.from_numpy(d[k]) for k in d.files if k.startswith("p.")}
    m.load_state_dict(sd, strict=True)
    m.train()
    y = torch.from_numpy(d["y"])
    # Mixup in batch mode with the given lambda (timm's _mix_batch: x.mul_(lam).add_(x.flip(0).mul_(1 - lam))).
    x_flipped = x.flip(0).mul(1.0 - lam)
    x = x.mul(lam).add(x_flipped)
    target = mixup_target(y, ncls, lam, smoothing)
    _, param_groups = groups_of(m, layer_decay, wd)
    opt = torch.optim.AdamW(param_groups, lr=lr, weight_decay=0.0, foreach=False)
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
        # weight_decay stays as get_parameter_groups set it (wd on decay groups, 0 elsewhere)
    loss = soft_target_ce(m(x), target)
    opt.zero_grad()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(m.parameters(), clip) if clip > 0 else torch.tensor(0.0)
    opt.step()
    out = {"p." + k: v.detach().numpy() for k, v in m.state_dict().items()}
    for k, v in m.named_parameters():
        out["g." + k] = v.grad.numpy()
    out["loss"] = np.array(loss.item())
    out["grad_norm"] = np.array(float(norm))
    out["x_mixed"] = x.numpy()
    out["target"] = target.numpy()
    np.savez(sys.argv[3], **out)


if __name__ == "__main__":
    main()
