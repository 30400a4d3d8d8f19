"""Time one full iBOT training step in PyTorch eager, for comparison with `ibot bench step`.

Same work as the Rust benchmark: teacher on the global views, student on the masked global views
and on the local views, the iBOT loss with centring, backward, per-tensor clipping, AdamW with
the two official parameter groups, EMA of the teacher. The model is the official architecture
(ViT with qkv bias, LayerNorm eps 1e-6, exact GELU; iBOT head with weight-normed last layer),
written here in plain PyTorch so that no third-party checkout is needed.

Usage (from the repo root, after scripts/bootstrap.sh):
  .venv/bin/python bench/torch_step.py --arch vit_small --batch 8 --local_crops_number 2
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}


class Block(nn.Module):
    def __init__(self, d, heads, dpr):
        super().__init__()
        self.heads, self.dpr = heads, dpr
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def drop(self, x):
        if not self.training or self.dpr == 0:
            return x
        keep = 1 - self.dpr
        m = (keep + torch.rand((x.shape[0], 1, 1), dtype=x.dtype)).floor_()
        return x.div(keep) * m

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.drop(self.proj((a @ v).transpose(1, 2).reshape(b, n, c)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class ViT(nn.Module):
    def __init__(self, arch, patch, drop_path, mim):
        super().__init__()
        d, depth, heads = ARCHS[arch]
        self.patch = patch
        self.proj = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, (224 // patch) ** 2 + 1, d))
        self.masked_embed = nn.Parameter(torch.zeros(1, d)) if mim else None
        self.blocks = nn.ModuleList(Block(d, heads, r) for r in torch.linspace(0, drop_path, depth).tolist())
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def pos(self, n, h, w):
        big = self.pos_embed.shape[1] - 1
        if n == big and h == w:
            return self.pos_embed
        s = int(math.sqrt(big))
        d = self.pos_embed.shape[-1]
        gh, gw = h // self.patch + 0.1, w // self.patch + 0.1
        p = F.interpolate(self.pos_embed[:, 1:].reshape(1, s, s, d).permute(0, 3, 1, 2),
                          scale_factor=(gh / s, gw / s), mode="bicubic")
        return torch.cat((self.pos_embed[:, :1], p.permute(0, 2, 3, 1).reshape(1, -1, d)), 1)

    def forward(self, x, mask=None):
        b, _, h, w = x.shape
        t = self.proj(x)
        if mask is not None and self.masked_embed is not None:
            t.permute(0, 2, 3, 1)[mask, :] = self.masked_embed.to(t.dtype)
        t = t.flatten(2).transpose(1, 2)
        t = torch.cat((self.cls_token.expand(b, -1, -1), t), 1)
        t = t + self.pos(t.shape[1] - 1, h, w)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)


class Head(nn.Module):
    def __init__(self, d, out, hidden=2048, bottleneck=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out, bias=False))
        self.last_layer.weight_g.data.fill_(1)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x[:, 0]), self.last_layer(x[:, 1:])


class Net(nn.Module):
    def __init__(self, args, student):
        super().__init__()
        self.backbone = ViT(args.arch, args.patch_size, args.drop_path if student else 0.0, student)
        self.head = Head(ARCHS[args.arch][0], args.out_dim)

    def forward(self, views, masks=None):
        toks = self.backbone(torch.cat(views), torch.cat(masks) if masks is not None else None)
        return self.head(toks)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_small")
    ap.add_argument("--patch_size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--global_crops_size", type=int, default=224)
    ap.add_argument("--local_crops_size", type=int, default=96)
    ap.add_argument("--local_crops_number", type=int, default=2)
    ap.add_argument("--out_dim", type=int, default=8192)
    ap.add_argument("--drop_path", type=float, default=0.1)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none",
                    help="run forward and loss under torch.autocast (CPU, bfloat16), as the official --use_fp16 does on CUDA")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    student, teacher = Net(args, True), Net(args, False)
    teacher.load_state_dict(student.state_dict(), strict=False)
    for p in teacher.parameters():
        p.requires_grad = False
    decay = [p for n, p in student.named_parameters() if not (n.endswith(".bias") or p.ndim == 1)]
    no_decay = [p for n, p in student.named_parameters() if n.endswith(".bias") or p.ndim == 1]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=5e-4, weight_decay=0.04)
    student_params = dict(student.named_parameters())
    teacher_params = {n: p for n, p in teacher.named_parameters() if n in student_params}
    center = torch.zeros(1, args.out_dim)
    center2 = torch.zeros(1, 1, args.out_dim)
    b, g, l = args.batch, args.global_crops_size, args.local_crops_size
    grid = g // args.patch_size

    def forward(views, masks):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
            return forward_and_loss(views, masks)

    def forward_and_loss(views, masks):
        nonlocal center, center2
        with torch.no_grad():
            t_cls, t_patch = teacher(views[:2])
        s_cls, s_patch = student(views[:2], masks)
        s_loc = student(views[2:])[0] if args.local_crops_number else None
        sc = torch.cat([s_cls, s_loc]) if s_loc is not None else s_cls
        sc = (sc / 0.1).chunk(2 + args.local_crops_number)
        sp = (s_patch / 0.1).chunk(2)
        tc = F.softmax((t_cls - center) / 0.04, -1).chunk(2)
        tp = F.softmax((t_patch - center2) / 0.04, -1).chunk(2)
        l1, n1, l2, n2 = 0, 0, 0, 0
        for q in range(2):
            for v in range(len(sc)):
                if v == q:
                    x = torch.sum(-tp[q] * F.log_softmax(sp[v], -1), -1)
                    m = masks[v].flatten(-2, -1)
                    l2 = l2 + (torch.sum(x * m.float(), -1) / m.sum(-1).clamp(min=1.0)).mean()
                    n2 += 1
                else:
                    l1 = l1 + torch.sum(-tc[q] * F.log_softmax(sc[v], -1), -1).mean()
                    n1 += 1
        loss = l1 / n1 + l2 / n2
        with torch.no_grad():
            center = center * 0.9 + t_cls.float().sum(0, keepdim=True) / len(t_cls) * 0.1
            center2 = center2 * 0.9 + t_patch.float().mean(1).sum(0, keepdim=True) / len(t_patch) * 0.1
        return loss

    def step():
        views = [torch.randn(b, 3, g, g) for _ in range(2)] + [torch.randn(b, 3, l, l) for _ in range(args.local_crops_number)]
        masks = [torch.rand(b, grid, grid) < 0.3 for _ in range(2)]
        loss = forward(views, masks)
        opt.zero_grad()
        loss.backward()
        for p in student.parameters():
            if p.grad is not None:
                n = p.grad.norm(2)
                c = 3.0 / (n + 1e-6)
                if c < 1:
                    p.grad.mul_(c)
        opt.step()
        with torch.no_grad():
            for name, pt in teacher_params.items():
                pt.mul_(0.996).add_(student_params[name].detach() * 0.004)
        return loss.item()

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    dt = (time.perf_counter() - t0) / args.iters
    print(f"pytorch {torch.__version__} threads {torch.get_num_threads()} autocast {args.autocast}: {args.arch}/{args.patch_size} batch {b} "
          f"2x{g} + {args.local_crops_number}x{l}: {dt * 1000:.1f} ms/iter, {b / dt:.2f} img/s")


if __name__ == "__main__":
    main()
