"""One fine-tuning step of the official ImageNet recipe (classification_layer_decay's
run_class_finetuning.py with `run.sh imagenet_cls`'s options) in plain PyTorch eager, on random
images: the official fine-tuning ViT (modeling_finetune: abs. position embedding, [CLS] token,
drop path 0.1), timm's batch-mode Mixup/CutMix targets with smoothing 0.1 and
SoftTargetCrossEntropy, backward, AdamW over the official layer-decay groups (0.65) with each
group's lr set from its lr_scale. timm is not needed: the pieces are written out from their
definitions (the model and groups as in tests/py/finetune_ref.py). Data loading is excluded.
Compare with `ibot finetune --bench_steps N` (bash bench/compare.sh finetune-step).

`--arch swin_tiny|swin_small|swin_base|swin_large --window_size 7|14`: the official Swin
classifier of models/swin_transformer.py (tests/py/finetune_swin_ref.py, drop path 0.1) with the
Swin layer-decay groups (`get_num_layer_for_swin`); bash bench/compare.sh finetune-swin-step.

Usage: python bench/torch_finetune_step.py [--arch vit_small] [--batch 32] [--iters 3] [--warmup 1]
                                           [--window_size 7] [--threads N] [--gemm onednn]
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "py"))
import finetune_ref as ref  # noqa: E402
import finetune_swin_ref as swin_ref  # noqa: E402

SWIN_ARCHS = {"swin_tiny": (96, [2, 2, 6, 2], [3, 6, 12, 24]), "swin_small": (96, [2, 2, 18, 2], [3, 6, 12, 24]),
              "swin_base": (128, [2, 2, 18, 2], [4, 8, 16, 32]), "swin_large": (192, [2, 2, 18, 2], [6, 12, 24, 48])}


def drop_path(x, p, training):
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype)).floor_()
    return x.div(keep) * mask


class Block(ref.Block):
    def __init__(self, d, heads, dp):
        super().__init__(d, heads)
        self.dp = dp

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.dp, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.dp, self.training)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input_size", type=int, default=224)
    ap.add_argument("--nb_classes", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--window_size", type=int, default=7, help="Swin window")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--gemm", choices=["default", "onednn"], default="default",
                    help="onednn: nn.Linear on oneDNN inside libtorch, as ibot (bench/torch_step.py --gemm)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.gemm == "onednn":
        import torch_step  # noqa: E402 (bench/, the script's own folder)
        torch_step.use_onednn_linear()
    torch.manual_seed(0)
    if a.arch in SWIN_ARCHS:
        d, depths, heads = SWIN_ARCHS[a.arch]
        m = swin_ref.SwinTransformer(a.input_size, 4, d, depths, heads, a.window_size, a.nb_classes, 0.1)
        m.train()
        _, groups = ref.swin_groups_of(m, 0.65, 0.05)
    else:
        d, depth, heads = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}[a.arch]
        m = ref.VisionTransformer(d, depth, heads, 16, a.input_size // 16, a.nb_classes, False)
        m.blocks = nn.ModuleList([Block(d, heads, 0.1 * i / (depth - 1)) for i in range(depth)])
        m.train()
        _, groups = ref.groups_of(m, 0.65, 0.05)
    opt = torch.optim.AdamW(groups, lr=4e-3, weight_decay=0.0)
    x0 = torch.randn(a.batch, 3, a.input_size, a.input_size)
    y0 = torch.randint(a.nb_classes, (a.batch,))
    for i in range(a.warmup + a.iters):
        if i == a.warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        # timm Mixup, batch mode: mixup (alpha 0.8) or cutmix (alpha 1.0) with probability 0.5.
        x = x0.clone()
        if np.random.rand() < 0.5:
            lam = float(np.random.beta(1.0, 1.0))
            H, W = x.shape[-2:]
            cut = np.sqrt(1 - lam)
            ch, cw = int(H * cut), int(W * cut)
            cy, cx = np.random.randint(H), np.random.randint(W)
            y1, y2 = np.clip(cy - ch // 2, 0, H), np.clip(cy + ch // 2, 0, H)
            x1, x2 = np.clip(cx - cw // 2, 0, W), np.clip(cx + cw // 2, 0, W)
            x[:, :, y1:y2, x1:x2] = x.flip(0)[:, :, y1:y2, x1:x2]
            lam = 1 - (y2 - y1) * (x2 - x1) / float(H * W)
        else:
            lam = float(np.random.beta(0.8, 0.8))
            x.mul_(lam).add_(x.flip(0).mul_(1 - lam))
        target = ref.mixup_target(y0, a.nb_classes, lam, 0.1)
        for g in opt.param_groups:
            g["lr"] = 4e-3 * g["lr_scale"]
        loss = ref.soft_target_ce(m(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    win = f" window {a.window_size}" if a.arch in SWIN_ARCHS else ""
    print(f"PyTorch eager finetune step ({a.arch}{win}, {torch.get_num_threads()} thread(s), gemm {a.gemm}, batch {a.batch}): "
          f"{dt * 1e3 / a.iters:.1f} ms/iter (CPU {cpu * 1e3 / a.iters:.1f} ms/iter), {a.batch * a.iters / dt:.2f} img/s")


if __name__ == "__main__":
    main()
