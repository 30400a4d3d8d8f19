"""References for tests/finetune_opts.rs, computed at test time in the project venv. Each mode
takes all its cases at once (one Python start per test).

Modes (JSON on stdout unless noted):
  deit_sched CASES   CASES: JSON list of [epochs, warmup_epochs, lr, warmup_lr, min_lr].
      evaluation/eval_cls.py's schedule: timm's create_scheduler(args, optimizer) on an
      argparse namespace with eval_cls.py's schedule options (sched cosine, cooldown 10, ...),
      the learning rate each training epoch runs with, the scheduler being stepped with
      lr_scheduler.step(epoch) after each epoch, as the script's loop does.
  beit_sched CASES   CASES: JSON list of [base, final, epochs, niter, warmup_epochs, warmup_steps].
      run_class_finetuning.py's per-iteration schedule: BEiT's utils.cosine_scheduler (written
      here after the official function, evaluation/classification_layer_decay/utils.py), or
      {"error": ...} where the official function fails (its length assertion).
  head_init ROWS COLS SCALES   SCALES: JSON list of init_scale values.
      the official classifier initialisation: timm's trunc_normal_(std=.02) on the weight,
      zero bias, both multiplied by init_scale (modeling_finetune.VisionTransformer,
      eval_cls.py's head.apply(_init_weights) + mul_(init_scale)); the weight's std, mean,
      share within one std of 0, and the largest |bias|.
  forward_drop IN.npz OUT.npz
      modeling_finetune's training forward with dropout (see vit_forward_drop).
  IN.npz OUT.npz (python_reference)
      for each optimizer NAME in IN's "names" (codes), two steps of the optimizer timm's
      create_optimizer_v2 builds for `--opt NAME` over two parameter groups (weight decay on
      the first only) on the given gradients.
"""
import argparse
import json
import math
import sys

import numpy as np
import torch


def deit_sched(epochs, warmup_epochs, lr, warmup_lr, min_lr):
    from timm.scheduler import create_scheduler

    # eval_cls.py's schedule options and their defaults.
    args = argparse.Namespace(
        sched="cosine", epochs=epochs, lr=lr, lr_noise=None, lr_noise_pct=0.67,
        lr_noise_std=1.0, warmup_lr=warmup_lr, min_lr=min_lr, decay_epochs=30,
        warmup_epochs=warmup_epochs, cooldown_epochs=10, patience_epochs=10, decay_rate=0.1,
        seed=0,
    )
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched, num_epochs = create_scheduler(args, opt)
    lrs = []
    for epoch in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])  # what train_one_epoch runs with
        sched.step(epoch)
    return {"lrs": lrs, "num_epochs": num_epochs, "scheduler": type(sched).__name__}


def beit_cosine_scheduler(base, final, epochs, niter, warmup_epochs=0, start_warmup=0,
                          warmup_steps=-1):
    warm = np.array([])
    warmup_iters = warmup_epochs * niter
    if warmup_steps > 0:
        warmup_iters = warmup_steps
    if warmup_epochs > 0:
        warm = np.linspace(start_warmup, base, warmup_iters)
    iters = np.arange(epochs * niter - warmup_iters)
    rest = np.array([final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / len(iters)))
                     for i in iters])
    s = np.concatenate((warm, rest))
    assert len(s) == epochs * niter
    return s


def head_init(rows, cols, init_scale):
    from timm.layers import trunc_normal_

    torch.manual_seed(0)
    head = torch.nn.Linear(cols, rows)
    trunc_normal_(head.weight, std=.02)
    torch.nn.init.constant_(head.bias, 0)
    head.weight.data.mul_(init_scale)
    head.bias.data.mul_(init_scale)
    w = head.weight.detach().double()
    sd = w.std().item()
    return {
        "std": sd,
        "mean": w.mean().item(),
        "within_1sd": (w.abs() <= sd).double().mean().item(),
        "max_abs_bias": head.bias.abs().max().item(),
    }


def vit_forward_drop(d):
    """modeling_finetune.VisionTransformer's training forward ([CLS] pooling, no drop path)
    with its dropouts as F.dropout / nn.Dropout apply them: pos_drop, attn_drop on the softmax
    probabilities, proj_drop, Mlp.drop after the activation and after fc2; libtorch's generator
    seeded with `seed` first."""
    import torch.nn.functional as F

    c = d["cfg"]
    depth, heads, patch, drop, attn_drop = int(c[0]), int(c[1]), int(c[2]), float(c[3]), float(c[4])
    seed = int(d["seed"][0])
    sd = {k[2:]: torch.from_numpy(v) for k, v in d.items() if k.startswith("p.")}
    x = torch.from_numpy(d["x"])
    ln = lambda t, n: F.layer_norm(t, (t.shape[-1],), sd[n + ".weight"], sd[n + ".bias"], 1e-6)
    lin = lambda t, n: F.linear(t, sd[n + ".weight"], sd[n + ".bias"])
    torch.manual_seed(seed)
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    B, _, D = t.shape
    t = torch.cat((sd["cls_token"].expand(B, -1, -1), t), dim=1) + sd["pos_embed"]
    t = F.dropout(t, drop, True)
    for i in range(depth):
        b = f"blocks.{i}."
        h = ln(t, b + "norm1")
        N = h.shape[1]
        qkv = lin(h, b + "attn.qkv").reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * (D // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        attn = F.dropout(attn, attn_drop, True)
        a = (attn @ v).transpose(1, 2).reshape(B, N, D)
        t = t + F.dropout(lin(a, b + "attn.proj"), drop, True)
        h = F.dropout(F.gelu(lin(ln(t, b + "norm2"), b + "mlp.fc1")), drop, True)
        t = t + F.dropout(lin(h, b + "mlp.fc2"), drop, True)
    return {"logits": lin(ln(t, "norm")[:, 0], "head").numpy()}


NAMES = {0: "adamw", 1: "adam", 2: "sgd", 3: "momentum", 4: "nesterov"}


def opt_steps(inp, out):
    from timm.optim import create_optimizer_v2

    d = dict(np.load(inp))
    res = {}
    for code in d["codes"]:
        name = NAMES[int(code)]
        c = d["cfg"]
        lr, wd, momentum, eps, b1, b2 = (float(v) for v in c[:6])
        ps = [torch.nn.Parameter(torch.from_numpy(d[f"{name}.p0"]).clone()),
              torch.nn.Parameter(torch.from_numpy(d[f"{name}.p1"]).clone())]
        groups = [{"params": [ps[0]], "weight_decay": wd},
                  {"params": [ps[1]], "weight_decay": 0.0}]
        kw = dict(lr=lr, weight_decay=0.0, momentum=momentum)
        if name in ("adamw", "adam"):
            kw.update(eps=eps, betas=(b1, b2))
        opt = create_optimizer_v2(groups, opt=name, **kw)
        for step in (1, 2):
            for i, p in enumerate(ps):
                p.grad = torch.from_numpy(d[f"{name}.g{step}_{i}"]).clone()
            opt.step()
        for i, p in enumerate(ps):
            res[f"{name}.p{i}"] = p.detach().numpy()
        res[f"{name}.nesterov"] = np.array(
            [float(bool(opt.param_groups[0].get("nesterov", False)))])
        res[f"{name}.is_adamw"] = np.array([float(type(opt) is torch.optim.AdamW)])
    np.savez(out, **res)


if __name__ == "__main__":
    mode, a = sys.argv[1], sys.argv[2:]
    if mode == "deit_sched":
        print(json.dumps([deit_sched(int(c[0]), int(c[1]), float(c[2]), float(c[3]), float(c[4]))
                          for c in json.loads(a[0])]))
    elif mode == "beit_sched":
        res = []
        for c in json.loads(a[0]):
            try:
                s = beit_cosine_scheduler(float(c[0]), float(c[1]), int(c[2]), int(c[3]),
                                          warmup_epochs=int(c[4]), warmup_steps=int(c[5]))
                res.append({"schedule": s.tolist()})
            except AssertionError:
                res.append({"error": "the official length assertion fails"})
        print(json.dumps(res))
    elif mode == "head_init":
        print(json.dumps([head_init(int(a[0]), int(a[1]), float(s))
                          for s in json.loads(a[2])]))
    elif mode == "forward_drop":
        np.savez(a[1], **vit_forward_drop(dict(np.load(a[0]))))
    elif mode.endswith(".npz"):
        opt_steps(mode, a[0])
    else:
        sys.exit(f"unknown mode {mode}")
