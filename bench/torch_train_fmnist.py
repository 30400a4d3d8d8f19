"""Whole iBOT pre-training epochs on Fashion-MNIST, the way the official main_ibot.py runs them,
for comparison with `ibot train` (`bash bench/compare.sh fmnist-epochs`).

What runs is the official training loop of bytedance/ibot, rewritten here (not copied) so that no
checkout of it is needed, on the CPU in float32 (the official CUDA autocast does nothing there):

* data: the Fashion-MNIST training images of the IDX files (the Debian package
  dataset-fashion-mnist, the files `ibot train --data_path` reads), decoded once into PIL images
  in memory, gray converted to RGB as torchvision's ImageFolder loader does;
  DataAugmentationiBOT (torchvision + Pillow: RandomResizedCrop bicubic, flip, colour jitter,
  grayscale, Gaussian blur, solarization, normalisation; crop sizes are options instead of the
  official's fixed 224/96); the block masks of loader.py's ImageFolderMask (BEiT-style, with
  the per-image masking ratio); a DistributedSampler (one replica) with set_epoch, a DataLoader
  with num_workers, drop_last;
* model: the official ViT and iBOT head of bench/torch_step.py (imported), student with drop
  path and masked_embed, teacher with the student's weights and no gradients;
* train_one_epoch: per-iteration lr / weight-decay / teacher-momentum cosine schedules (lr
  scaled by batch / 256, linear warm-up), utils.get_params_groups's two groups, AdamW, the
  iBOT loss with the teacher-temperature schedules and centring, per-tensor clip_gradients
  (one .item() per tensor, as the official), cancel_gradients_last_layer, the EMA over the
  names common to student and teacher, the official per-iteration statistics (.item() of the
  losses, the teacher/student agreement) and, at the end of each epoch, the NMI/ARI/F of the
  teacher's predictions (scikit-learn, as evaluation/unsupervised/unsup_cls.eval_pred) and a
  checkpoint (torch.save) when --output_dir is given.

The model code is plain PyTorch; the official code's only departures here are CUDA calls (none
on a CPU), the tensorboard writer and the distributed collectives (one process).

Usage (from the repo root, after scripts/bootstrap.sh; torchvision and Pillow are in the venv):
  .venv/bin/python bench/torch_train_fmnist.py --subset 1280 --epochs 2 --num_workers 2 --threads 1
"""
import argparse
import gzip
import math
import os
import random
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_step  # noqa: E402  (the official architecture: ViT, iBOT head, Net)


# ---------------------------------------------------------------- data


def read_idx(path):
    """An IDX file (optionally gzipped) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_idx(root, stem):
    for name in (f"{stem}-idx{3 if 'images' in stem else 1}-ubyte", f"{stem}-idx{3 if 'images' in stem else 1}-ubyte.gz"):
        p = os.path.join(root, name)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"no {stem} IDX file in {root} (apt-get install dataset-fashion-mnist)")


class GaussianBlur:
    """utils.GaussianBlur: a PIL Gaussian blur of radius U(0.1, 2) with probability p."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if random.random() <= self.prob:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))
        return img


class Solarization:
    """utils.Solarization: PIL solarize with probability p."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class DataAugmentationiBOT:
    """main_ibot.DataAugmentationiBOT with the crop sizes as parameters."""

    def __init__(self, gscale, lscale, gnum, lnum, gsize, lsize):
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])
        bicubic = transforms.InterpolationMode.BICUBIC
        self.gnum, self.lnum = gnum, lnum
        self.global1 = transforms.Compose([
            transforms.RandomResizedCrop(gsize, scale=gscale, interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(1.0), normalize])
        self.global2 = transforms.Compose([
            transforms.RandomResizedCrop(gsize, scale=gscale, interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(0.1), Solarization(0.2), normalize])
        self.local = transforms.Compose([
            transforms.RandomResizedCrop(lsize, scale=lscale, interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(p=0.5), normalize])

    def __call__(self, img):
        return [self.global1(img)] + [self.global2(img) for _ in range(self.gnum - 1)] + [self.local(img) for _ in range(self.lnum)]


class FmnistMask(torch.utils.data.Dataset):
    """In-memory images with loader.ImageFolderMask's __getitem__: (crops, label, block masks)."""

    def __init__(self, images, labels, transform, psz, pred_ratio, pred_ratio_var, pred_shape="block",
                 pred_start_epoch=0, pred_aspect_ratio=(0.3, 1 / 0.3)):
        self.images, self.labels, self.transform, self.psz = images, labels, transform, psz
        self.pred_ratio = pred_ratio[0] if len(pred_ratio) == 1 else list(pred_ratio)
        self.pred_ratio_var = pred_ratio_var[0] if len(pred_ratio_var) == 1 else list(pred_ratio_var)
        if isinstance(self.pred_ratio, list) and not isinstance(self.pred_ratio_var, list):
            self.pred_ratio_var = [self.pred_ratio_var] * len(self.pred_ratio)
        self.log_aspect_ratio = tuple(math.log(x) for x in pred_aspect_ratio)
        self.pred_shape, self.pred_start_epoch, self.epoch = pred_shape, pred_start_epoch, 0

    def __len__(self):
        return len(self.images)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def get_pred_ratio(self):
        if self.epoch < self.pred_start_epoch:
            return 0
        if isinstance(self.pred_ratio, list):
            ratios = [random.uniform(m - v, m + v) if v > 0 else m for m, v in zip(self.pred_ratio, self.pred_ratio_var)]
            return random.choice(ratios)
        m, v = self.pred_ratio, self.pred_ratio_var
        return random.uniform(m - v, m + v) if v > 0 else m

    def block_mask(self, h, w, high):
        mask = np.zeros((h, w), dtype=bool)
        count = 0
        while count < high:
            budget = high - count
            delta = 0
            for _ in range(10):
                low = (min(h, w) // 3) ** 2
                area = random.uniform(low, budget)
                aspect = math.exp(random.uniform(*self.log_aspect_ratio))
                bh = int(round(math.sqrt(area * aspect)))
                bw = int(round(math.sqrt(area / aspect)))
                if bw < w and bh < h:
                    top, left = random.randint(0, h - bh), random.randint(0, w - bw)
                    already = mask[top: top + bh, left: left + bw].sum()
                    if 0 < bh * bw - already <= budget:
                        for i in range(top, top + bh):  # cell by cell, as the official loop
                            for j in range(left, left + bw):
                                if not mask[i, j]:
                                    mask[i, j] = True
                                    delta += 1
                if delta > 0:
                    break
            if delta == 0:
                break
            count += delta
        return mask

    def __getitem__(self, index):
        crops = self.transform(self.images[index])
        masks = []
        for img in crops:
            h, w = img.shape[1] // self.psz, img.shape[2] // self.psz
            high = self.get_pred_ratio() * h * w
            if self.pred_shape == "block":
                masks.append(self.block_mask(h, w, high))
            else:
                m = np.hstack([np.zeros(h * w - int(high)), np.ones(int(high))]).astype(bool)
                np.random.shuffle(m)
                masks.append(m.reshape(h, w))
        return crops, self.labels[index], masks


# ---------------------------------------------------------------- training


def cosine_scheduler(base, end, epochs, niter, warmup_epochs=0, start_warmup_value=0.0):
    warm = np.linspace(start_warmup_value, base, warmup_epochs * niter) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter - warmup_epochs * niter)
    sched = end + 0.5 * (base - end) * (1 + np.cos(np.pi * iters / len(iters)))
    sched = np.concatenate((warm, sched))
    assert len(sched) == epochs * niter
    return sched


class IbotLoss(torch.nn.Module):
    def __init__(self, out_dim, ngcrops, nlcrops, wt, t, wt2, t2, warm_epochs, epochs, mim_start_epoch=0,
                 lambda1=1.0, lambda2=1.0):
        super().__init__()
        self.ngcrops, self.ncrops = ngcrops, ngcrops + nlcrops
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, out_dim))
        self.temp = np.concatenate((np.linspace(wt, t, warm_epochs), np.ones(epochs - warm_epochs) * t))
        if mim_start_epoch == 0:
            self.temp2 = np.concatenate((np.linspace(wt2, t2, warm_epochs), np.ones(epochs - warm_epochs) * t2))
        else:
            self.temp2 = np.concatenate((np.ones(mim_start_epoch) * wt2, np.linspace(wt2, t2, warm_epochs),
                                         np.ones(epochs - warm_epochs - mim_start_epoch) * t2))

    def forward(self, student_output, teacher_output, student_local_cls, masks, epoch):
        s_cls, s_patch = student_output
        t_cls, t_patch = teacher_output
        if student_local_cls is not None:
            s_cls = torch.cat([s_cls, student_local_cls])
        s_cls_c = (s_cls / 0.1).chunk(self.ncrops)
        s_patch_c = (s_patch / 0.1).chunk(self.ngcrops)
        t_cls_c = F.softmax((t_cls - self.center) / self.temp[epoch], dim=-1).detach().chunk(self.ngcrops)
        t_patch_c = F.softmax((t_patch - self.center2) / self.temp2[epoch], dim=-1).detach().chunk(self.ngcrops)
        l1, n1, l2, n2 = 0, 0, 0, 0
        for q in range(len(t_cls_c)):
            for v in range(len(s_cls_c)):
                if v == q:
                    x = torch.sum(-t_patch_c[q] * F.log_softmax(s_patch_c[v], dim=-1), dim=-1)
                    m = masks[v].flatten(-2, -1)
                    l2 = l2 + (torch.sum(x * m.float(), dim=-1) / m.sum(dim=-1).clamp(min=1.0)).mean()
                    n2 += 1
                else:
                    l1 = l1 + torch.sum(-t_cls_c[q] * F.log_softmax(s_cls_c[v], dim=-1), dim=-1).mean()
                    n1 += 1
        l1 = l1 / n1 * self.lambda1
        l2 = l2 / n2 * self.lambda2
        self.update_center(t_cls, t_patch)
        return dict(cls=l1, patch=l2, loss=l1 + l2)

    @torch.no_grad()
    def update_center(self, t_cls, t_patch):
        self.center = self.center * 0.9 + torch.sum(t_cls, dim=0, keepdim=True) / len(t_cls) * 0.1
        self.center2 = self.center2 * 0.9 + torch.sum(t_patch.mean(1), dim=0, keepdim=True) / len(t_patch) * 0.1


def params_groups(model):
    reg, noreg = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (noreg if name.endswith(".bias") or len(p.shape) == 1 else reg).append(p)
    return [{"params": reg}, {"params": noreg, "weight_decay": 0.0}]


def clip_gradients(model, clip):
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            n = p.grad.data.norm(2)
            norms.append(n.item())
            c = clip / (n + 1e-6)
            if c < 1:
                p.grad.data.mul_(c)
    return np.array(norms)


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


def eval_pred(labels, preds):
    try:
        from sklearn import metrics
    except ImportError:
        return None
    return metrics.normalized_mutual_info_score(labels, preds), metrics.adjusted_rand_score(labels, preds)


def train_one_epoch(student, teacher, loss_fn, loader, opt, lr_s, wd_s, mom_s, epoch, args):
    real, pred = [], []
    ng = args.global_crops_number
    stats = []
    for it, (images, labels, masks) in enumerate(loader):
        it = len(loader) * epoch + it
        for i, g in enumerate(opt.param_groups):
            g["lr"] = lr_s[it]
            if i == 0:
                g["weight_decay"] = wd_s[it]
        teacher_output = teacher(images[:ng])
        student_output = student(images[:ng], masks[:ng])
        student_local_cls = student(images[ng:])[0] if len(images) > ng else None
        all_loss = loss_fn(student_output, teacher_output, student_local_cls, masks, epoch)
        loss = all_loss.pop("loss")
        if not math.isfinite(loss.item()):
            print(f"Loss is {loss.item()}, stopping training")
            sys.exit(1)
        p1 = teacher_output[0].chunk(ng)[0].max(dim=1)[1]
        p2 = student_output[0].chunk(ng)[1].max(dim=1)[1]
        acc = (p1 == p2).sum() / p1.size(0)
        pred.append(p1)
        real.append(labels)
        opt.zero_grad()
        loss.backward()
        if args.clip_grad:
            clip_gradients(student, args.clip_grad)
        cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        opt.step()
        with torch.no_grad():
            m = mom_s[it]
            nq = dict(student.named_parameters())
            nk = dict(teacher.named_parameters())
            common = set(nq) & set(nk)
            for name in nk:
                if name in common:
                    nk[name].data.mul_(m).add_((1 - m) * nq[name].detach().data)
        stats.append((loss.item(), *(v.item() for v in all_loss.values()), opt.param_groups[0]["lr"],
                      opt.param_groups[0]["weight_decay"], float(acc)))
    nmi = eval_pred(torch.cat(real).numpy(), torch.cat(pred).numpy())
    mean = np.mean(np.array(stats), 0)
    print(f"epoch {epoch}: {len(stats)} iterations, loss {mean[0]:.4f}, acc {mean[-1]:.3f}" +
          (f", NMI {nmi[0]:.4f}, ARI {nmi[1]:.4f}" if nmi else ""), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data_path", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--subset", type=int, default=0, help="train on the first N images (0: all 60000)")
    ap.add_argument("--batch_size_per_gpu", "--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--num_workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in the main process (0: default)")
    ap.add_argument("--output_dir", default="", help="save checkpoint.pth here after every epoch (official); empty: no saving")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gemm", choices=["default", "onednn"], default="default",
                    help="route nn.Linear through oneDNN inside libtorch (see bench/torch_step.py)")
    # model (issue 14's Fashion-MNIST recipe by default)
    ap.add_argument("--arch", default="vit_tiny", choices=list(torch_step.ARCHS))
    ap.add_argument("--patch_size", type=int, default=4)
    ap.add_argument("--embed_dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--num_heads", type=int, default=3)
    ap.add_argument("--img_size", type=int, default=32)
    ap.add_argument("--out_dim", type=int, default=8192)
    ap.add_argument("--head_hidden_dim", type=int, default=2048)
    ap.add_argument("--head_bottleneck_dim", type=int, default=256)
    ap.add_argument("--norm_last_layer", type=int, default=1)
    ap.add_argument("--drop_path", type=float, default=0.1)
    # crops and masks
    ap.add_argument("--global_crops_number", type=int, default=2)
    ap.add_argument("--local_crops_number", type=int, default=6)
    ap.add_argument("--global_crops_size", type=int, default=32)
    ap.add_argument("--local_crops_size", type=int, default=16)
    ap.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.14, 1.0))
    ap.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.4))
    ap.add_argument("--pred_ratio", type=float, nargs="+", default=[0.3])
    ap.add_argument("--pred_ratio_var", type=float, nargs="+", default=[0.0])
    ap.add_argument("--pred_shape", default="block", choices=["block", "rand"])
    ap.add_argument("--pred_start_epoch", type=int, default=0)
    # optimisation
    ap.add_argument("--lr", type=float, default=0.0005)
    ap.add_argument("--min_lr", type=float, default=1e-6)
    ap.add_argument("--warmup_epochs", type=int, default=1)
    ap.add_argument("--weight_decay", type=float, default=0.04)
    ap.add_argument("--weight_decay_end", type=float, default=0.4)
    ap.add_argument("--momentum_teacher", type=float, default=0.996)
    ap.add_argument("--clip_grad", type=float, default=3.0)
    ap.add_argument("--freeze_last_layer", type=int, default=1)
    ap.add_argument("--warmup_teacher_temp", type=float, default=0.04)
    ap.add_argument("--teacher_temp", type=float, default=0.04)
    ap.add_argument("--warmup_teacher_patch_temp", type=float, default=0.04)
    ap.add_argument("--teacher_patch_temp", type=float, default=0.07)
    ap.add_argument("--warmup_teacher_temp_epochs", type=int, default=1)
    args = ap.parse_args()

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gemm == "onednn":
        torch_step.use_onednn_linear()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    images = read_idx(find_idx(args.data_path, "train-images"))
    labels = read_idx(find_idx(args.data_path, "train-labels"))
    n = args.subset or len(images)
    pil = [Image.fromarray(images[i], mode="L").convert("RGB") for i in range(n)]
    transform = DataAugmentationiBOT(args.global_crops_scale, args.local_crops_scale, args.global_crops_number,
                                     args.local_crops_number, args.global_crops_size, args.local_crops_size)
    dataset = FmnistMask(pil, labels[:n].astype(np.int64), transform, args.patch_size, args.pred_ratio,
                         args.pred_ratio_var, args.pred_shape, args.pred_start_epoch)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size_per_gpu,
                                         num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                                         drop_last=True)

    args.window_size = 7
    student, teacher = torch_step.Net(args, True), torch_step.Net(args, False)
    teacher.load_state_dict(student.state_dict(), strict=False)
    for p in teacher.parameters():
        p.requires_grad = False
    if args.norm_last_layer:  # iBOTHead(norm_last_layer=True): the weight-norm scale is fixed at 1
        student.head.last_layer.weight_g.requires_grad = False
    loss_fn = IbotLoss(args.out_dim, args.global_crops_number, args.local_crops_number, args.warmup_teacher_temp,
                       args.teacher_temp, args.warmup_teacher_patch_temp, args.teacher_patch_temp,
                       args.warmup_teacher_temp_epochs, args.epochs, args.pred_start_epoch)
    opt = torch.optim.AdamW(params_groups(student))
    bs = args.batch_size_per_gpu
    lr_s = cosine_scheduler(args.lr * bs / 256.0, args.min_lr, args.epochs, len(loader), warmup_epochs=args.warmup_epochs)
    wd_s = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, len(loader))
    mom_s = cosine_scheduler(args.momentum_teacher, 1, args.epochs, len(loader))
    print(f"pytorch {torch.__version__}, {torch.get_num_threads()} threads, {args.num_workers} workers, gemm {args.gemm}: "
          f"{n} images, {len(loader)} iterations per epoch, batch {bs}, "
          f"{args.global_crops_number}x{args.global_crops_size} + {args.local_crops_number}x{args.local_crops_size}", flush=True)

    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        te = time.perf_counter()
        train_one_epoch(student, teacher, loss_fn, loader, opt, lr_s, wd_s, mom_s, epoch, args)
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "optimizer": opt.state_dict(),
                        "epoch": epoch + 1, "ibot_loss": loss_fn.state_dict()}, os.path.join(args.output_dir, "checkpoint.pth"))
        print(f"epoch {epoch}: {time.perf_counter() - te:.1f} s wall", flush=True)
    wall = time.perf_counter() - t0
    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime
    print(f"training: {wall:.1f} s wall for {args.epochs} epochs ({wall / args.epochs / len(loader) * 1000:.0f} ms/iter); "
          f"process total {time.perf_counter() - t_start:.1f} s wall, CPU {cpu:.1f} s (main process and reaped workers)")


if __name__ == "__main__":
    main()
