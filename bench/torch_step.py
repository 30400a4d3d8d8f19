"""Time one full iBOT training step in PyTorch eager, for comparison with `ibot bench step`.

Same work as the Rust benchmark: teacher on the global views, student on the masked global views
and on the local views, the iBOT loss with centring, backward, per-tensor clipping, AdamW with
the two official parameter groups, EMA of the teacher. The model is the official architecture
(ViT with qkv bias, LayerNorm eps 1e-6, exact GELU; iBOT head with weight-normed last layer),
written here in plain PyTorch so that no third-party checkout is needed. `--arch swin_*` uses
the official Swin Transformer of iBOT's models/swin_transformer.py instead (4-px patch embedding
with LayerNorm, window attention with relative position bias, shifted windows with the -100
masks, feature maps padded to whole windows, PatchMerging, average-pooled [CLS]; the masks are
on the 32-px grid, i.e. the last stage's, and repeated up to the 4-px grid for masked_embed).

Usage (from the repo root, after scripts/bootstrap.sh):
  .venv/bin/python bench/torch_step.py --arch vit_small --batch 8 --local_crops_number 2
  .venv/bin/python bench/torch_step.py --arch swin_tiny --window_size 7 --batch 4 --local_crops_number 2
  # nn.Linear on oneDNN inside libtorch (as ibot) instead of MKL's sgemm; CPU time per phase
  .venv/bin/python bench/torch_step.py --threads 1 --gemm onednn --batch 4 --local_crops_number 10 --phases
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}
# Swin: embed_dim, depths, heads per stage (official swin_tiny/small/base/large).
SWIN_ARCHS = {"swin_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)), "swin_small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
              "swin_base": (128, (2, 2, 18, 2), (4, 8, 16, 32)), "swin_large": (192, (2, 2, 18, 2), (6, 12, 24, 48))}


PHASES = {}  # phase name -> [CPU seconds, wall seconds], filled when --phases is on
_PHASES_ON = [False]
_PREFIX = [""]


class phase:
    """Adds the CPU and wall time of the block to PHASES[name] (with --phases; with one thread
    the process CPU time is the block's own; wall time, as `ibot bench train` reports, also
    counts waits for a core on a loaded machine)."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        if _PHASES_ON[0]:
            self.t, self.w = time.process_time(), time.perf_counter()

    def __exit__(self, *exc):
        if _PHASES_ON[0]:
            acc = PHASES.setdefault(self.name, [0.0, 0.0])
            acc[0] += time.process_time() - self.t
            acc[1] += time.perf_counter() - self.w


def _dense(t):
    return t.to_dense() if t.is_mkldnn else t


class OnednnLinear(torch.autograd.Function):
    """y = x @ w.T + b on oneDNN's float32 inner product inside libtorch (aten.mkldnn_linear and
    its two backward ops), saving the dense input and weight as F.linear does: the same products
    ibot's csrc/fastops.cpp runs. F.linear calls MKL's sgemm, which takes an AVX2 path on AMD
    CPUs; on Intel both are AVX-512, so `--gemm onednn` estimates the ratio MKL does not handicap."""

    @staticmethod
    def forward(ctx, x, w, b):
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        wc = w.contiguous()
        bias = b.contiguous() if b is not None else None
        y = _dense(torch.ops.aten.mkldnn_linear(rows.to_mkldnn(), wc, bias))
        ctx.save_for_backward(rows, wc)
        ctx.has_bias, ctx.shape = b is not None, x.shape
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        rows, w = ctx.saved_tensors
        g = gy.reshape(-1, w.shape[0]).contiguous().to_mkldnn()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _dense(torch.ops.aten.mkldnn_linear_backward_input(list(rows.shape), g, w)).view(ctx.shape)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            rw, rb = torch.ops.aten.mkldnn_linear_backward_weights(g, rows.to_mkldnn(), w, ctx.has_bias)
            gw = _dense(rw) if ctx.needs_input_grad[1] else None
            gb = _dense(rb) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def use_onednn_linear(check=True):
    """Routes every float32 CPU nn.Linear (outside autocast) through OnednnLinear. With `check`,
    first compares forward and gradients with F.linear on a ViT-S MLP shape and prints the
    largest differences relative to each result's largest magnitude (float32 summation order
    only: ~1e-6)."""
    plain = nn.Linear.forward

    def forward(self, x):
        if x.dtype == torch.float32 and not x.is_cuda and not torch.is_autocast_enabled("cpu"):
            return OnednnLinear.apply(x, self.weight, self.bias)
        return plain(self, x)

    if check:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 394, 384, generator=g)
        w = torch.randn(1536, 384, generator=g) * 0.05
        b = torch.randn(1536, generator=g)
        gy = torch.randn(4, 394, 1536, generator=g)
        outs = []
        for f in (F.linear, OnednnLinear.apply):
            xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
            y = f(xs, ws, bs)
            y.backward(gy)
            outs.append((y.detach(), xs.grad, ws.grad, bs.grad))
        rel = [float((o - r).abs().max() / r.abs().max()) for r, o in zip(*outs)]
        print("onednn linear vs F.linear, max |diff| / max |ref| (y, dx, dw, db): " + ", ".join(f"{e:.1e}" for e in rel))
        if max(rel) > 1e-5:
            raise SystemExit("oneDNN linear disagrees with F.linear")
    nn.Linear.forward = forward


def drop_path(x, p, training):
    if not training or p == 0:
        return x
    keep = 1 - p
    m = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype)).floor_()
    return x.div(keep) * m


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
    def __init__(self, shape, patch, drop_path, mim, img_size=224):
        super().__init__()
        d, depth, heads = shape
        self.patch = patch
        self.proj = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2 + 1, d))
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


def to_windows(x, w):
    """(B, H, W, C) -> (B * nW, w * w, C), windows in row-major order within each image."""
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


def from_windows(x, w, h, wd):
    b = x.shape[0] // ((h // w) * (wd // w))
    return x.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, wd, -1)


class SwinBlock(nn.Module):
    def __init__(self, d, heads, res, window, shift, dpr):
        super().__init__()
        if res <= window:  # as the official block: one window over the whole (224-px) grid, no shift
            window, shift = res, 0
        self.heads, self.window, self.shift, self.dpr = heads, window, shift, dpr
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        c = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.masks = {}

    def attn_mask(self, hp):
        """The official SW-MSA mask for a padded hp x hp map: 0 within a region, -100 across."""
        if hp not in self.masks:
            w, s = self.window, self.shift
            img = torch.zeros(1, hp, hp, 1)
            cuts = (slice(0, -w), slice(-w, -s), slice(-s, None))
            for i, (a, b) in enumerate((a, b) for a in cuts for b in cuts):
                img[:, a, b, :] = i
            mw = to_windows(img, w).squeeze(-1)
            m = mw[:, None, :] - mw[:, :, None]
            self.masks[hp] = m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)
        return self.masks[hp]

    def forward(self, x):
        b, n, c = x.shape
        h = math.isqrt(n)
        w, s = self.window, self.shift
        y = self.norm1(x).view(b, h, h, c)
        pad = (w - h % w) % w
        y = F.pad(y, (0, 0, 0, pad, 0, pad))
        hp = h + pad
        if s:
            y = torch.roll(y, (-s, -s), (1, 2))
        y = to_windows(y, w)
        bw, nt, _ = y.shape
        qkv = self.qkv(y).reshape(bw, nt, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // self.heads) ** -0.5, qkv[1], qkv[2]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(nt, nt, -1)
        a = q @ k.transpose(-2, -1) + bias.permute(2, 0, 1).unsqueeze(0)
        if s:
            m = self.attn_mask(hp)
            a = (a.view(bw // m.shape[0], m.shape[0], self.heads, nt, nt) + m[None, :, None]).view(bw, self.heads, nt, nt)
        y = self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(bw, nt, c))
        y = from_windows(y, w, hp, hp)
        if s:
            y = torch.roll(y, (s, s), (1, 2))
        y = y[:, :h, :h].reshape(b, n, c)
        x = x + drop_path(y, self.dpr, self.training)
        return x + drop_path(self.fc2(F.gelu(self.fc1(self.norm2(x)))), self.dpr, self.training)


class PatchMerging(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(4 * d, eps=1e-6)
        self.reduction = nn.Linear(4 * d, 2 * d, bias=False)

    def forward(self, x):
        b, n, c = x.shape
        h = math.isqrt(n)
        x = x.view(b, h, h, c)
        if h % 2:
            x = F.pad(x, (0, 0, 0, 1, 0, 1))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class Swin(nn.Module):
    def __init__(self, arch, patch, window, drop_path, mim):
        super().__init__()
        d, depths, heads = SWIN_ARCHS[arch]
        self.proj = nn.Conv2d(3, d, patch, patch)
        self.patch_norm = nn.LayerNorm(d, eps=1e-6)
        self.masked_embed = nn.Parameter(torch.zeros(1, d)) if mim else None
        dpr = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.blocks = nn.ModuleList()
        res, k = 224 // patch, 0
        for i, (depth, nh) in enumerate(zip(depths, heads)):
            for j in range(depth):
                self.blocks.append(SwinBlock(d, nh, res, window, 0 if j % 2 == 0 else window // 2, dpr[k]))
                k += 1
            if i < len(depths) - 1:
                self.blocks.append(PatchMerging(d))
                d, res = 2 * d, res // 2
        self.num_features = d
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, x, mask=None):
        t = self.proj(x)
        b, c, h, w = t.shape
        t = self.patch_norm(t.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        if mask is not None and self.masked_embed is not None:
            mask = mask.repeat_interleave(h // mask.shape[-2], -2).repeat_interleave(w // mask.shape[-1], -1)
            t.permute(0, 2, 3, 1)[mask, :] = self.masked_embed.to(t.dtype)
        t = t.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        return torch.cat((t.mean(1, keepdim=True), t), 1)


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
        dp = args.drop_path if student else 0.0
        if args.arch in SWIN_ARCHS:
            self.backbone = Swin(args.arch, args.patch_size, args.window_size, dp, student)
            self.head = Head(self.backbone.num_features, args.out_dim)
        else:
            d, depth, heads = ARCHS[args.arch]
            shape = (args.embed_dim or d, args.depth or depth, args.num_heads or heads)
            self.backbone = ViT(shape, args.patch_size, dp, student, args.img_size)
            self.head = Head(shape[0], args.out_dim, args.head_hidden_dim, args.head_bottleneck_dim)

    def forward(self, views, masks=None):
        with phase(_PREFIX[0] + " backbone"):
            toks = self.backbone(torch.cat(views), torch.cat(masks) if masks is not None else None)
        with phase(_PREFIX[0] + " head"):
            return self.head(toks)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_small", choices=list(ARCHS) + list(SWIN_ARCHS))
    ap.add_argument("--patch_size", type=int, default=None, help="default 16 for ViT, 4 for Swin")
    ap.add_argument("--window_size", type=int, default=7, help="Swin window size (7 or 14 in the paper)")
    ap.add_argument("--embed_dim", type=int, default=None, help="override the ViT preset's width")
    ap.add_argument("--depth", type=int, default=None, help="override the ViT preset's number of blocks")
    ap.add_argument("--num_heads", type=int, default=None, help="override the ViT preset's heads")
    ap.add_argument("--img_size", type=int, default=224, help="resolution of the ViT position table")
    ap.add_argument("--head_hidden_dim", type=int, default=2048)
    ap.add_argument("--head_bottleneck_dim", type=int, default=256)
    ap.add_argument("--batch", "--batch_size_per_gpu", type=int, default=8)
    ap.add_argument("--global_crops_size", type=int, default=224)
    ap.add_argument("--local_crops_size", type=int, default=96)
    ap.add_argument("--local_crops_number", type=int, default=2)
    ap.add_argument("--out_dim", type=int, default=8192)
    ap.add_argument("--drop_path", type=float, default=0.1)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--gemm", choices=["default", "onednn"], default="default",
                    help="onednn: every float32 nn.Linear on oneDNN's inner product inside libtorch (as ibot does) "
                         "instead of F.linear's MKL sgemm, to see the ratio where MKL is not handicapped (Intel CPUs)")
    ap.add_argument("--phases", action="store_true",
                    help="print the CPU ms per step of each phase (teacher / student backbone and head, loss, backward, ...)")
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none",
                    help="run forward and loss under torch.autocast (CPU, bfloat16), as the official --use_fp16 does on CUDA")
    args = ap.parse_args()
    swin = args.arch in SWIN_ARCHS
    if args.patch_size is None:
        args.patch_size = 4 if swin else 16
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gemm == "onednn":
        use_onednn_linear()
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
    # Swin masks are on the last stage's grid (8 patches a cell), as the official pred_size.
    grid = g // (args.patch_size * 8 if swin else args.patch_size)

    def forward(views, masks):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
            return forward_and_loss(views, masks)

    def forward_and_loss(views, masks):
        with torch.no_grad():
            _PREFIX[0] = "teacher"
            t_cls, t_patch = teacher(views[:2])
        _PREFIX[0] = "student global"
        s_cls, s_patch = student(views[:2], masks)
        _PREFIX[0] = "student local"
        s_loc = student(views[2:])[0] if args.local_crops_number else None
        with phase("loss"):
            return loss_and_center(t_cls, t_patch, s_cls, s_patch, s_loc, masks)

    def loss_and_center(t_cls, t_patch, s_cls, s_patch, s_loc, masks):
        nonlocal center, center2
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
        with phase("inputs"):
            views = [torch.randn(b, 3, g, g) for _ in range(2)] + [torch.randn(b, 3, l, l) for _ in range(args.local_crops_number)]
            masks = [torch.rand(b, grid, grid) < 0.3 for _ in range(2)]
        loss = forward(views, masks)
        with phase("backward"):
            opt.zero_grad()
            loss.backward()
        with phase("clip"):
            for p in student.parameters():
                if p.grad is not None:
                    n = p.grad.norm(2)
                    c = 3.0 / (n + 1e-6)
                    if c < 1:
                        p.grad.mul_(c)
        with phase("optimizer"):
            opt.step()
        with phase("EMA"), torch.no_grad():
            for name, pt in teacher_params.items():
                pt.mul_(0.996).add_(student_params[name].detach() * 0.004)
        return loss.item()

    for _ in range(args.warmup):
        step()
    _PHASES_ON[0] = args.phases
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.iters):
        step()
    dt = (time.perf_counter() - t0) / args.iters
    cpu = (time.process_time() - c0) / args.iters
    print(f"pytorch {torch.__version__} threads {torch.get_num_threads()} autocast {args.autocast} gemm {args.gemm}: {args.arch}/{args.patch_size}{f' window {args.window_size}' if swin else ''} batch {b} "
          f"2x{g} + {args.local_crops_number}x{l}: {dt * 1000:.1f} ms/iter (CPU {cpu * 1000:.1f} ms/iter), {b / dt:.2f} img/s")

    if args.phases:
        total = sum(v[0] for v in PHASES.values())
        print("where the time goes (ms per step: CPU, wall; share of the phases' CPU time):")
        for k, (c, w) in PHASES.items():
            print(f"  {k:<26} {c / args.iters * 1000:9.1f} {w / args.iters * 1000:9.1f}  {100 * c / total:5.1f}%")


if __name__ == "__main__":
    main()
