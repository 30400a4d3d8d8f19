"""Images per second of the official iBOT data pipeline (torchvision on PIL images), for
comparison with `ibot bench data`. The transforms are the official recipe (RandomResizedCrop
bicubic, flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, PIL Gaussian blur with
p 1.0 / 0.1 / 0.5, solarisation p=0.2 on the second global crop, ToTensor + Normalize) and a
block mask per crop (the BEiT-style algorithm of the official ImageFolderMask), written here
in our own code; the DataLoader collates view-major batches as the official code does.

Needs torchvision and Pillow in the venv (not installed by bootstrap):
  .venv/bin/pip install --no-deps torchvision==0.28.0 pillow
  .venv/bin/python bench/torchvision_pipeline.py --data_path ../shared/bench/photos --num_workers 2
"""
import argparse
import math
import random
import time

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import datasets, transforms


class Blur:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if random.random() <= self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return img


class Solarize:
    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < 0.2 else img


def block_mask(h, w, ratio):
    mask = np.zeros((h, w), dtype=bool)
    target = ratio * h * w
    count = 0
    low = (min(h, w) // 3) ** 2
    la, lb = math.log(0.3), math.log(1 / 0.3)
    while count < target:
        room = target - count
        added = 0
        for _ in range(10):
            area = random.uniform(low, room)
            ar = math.exp(random.uniform(la, lb))
            bh, bw = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if bw < w and bh < h:
                t, l = random.randint(0, h - bh), random.randint(0, w - bw)
                new = bh * bw - mask[t:t + bh, l:l + bw].sum()
                if 0 < new <= room:
                    added = int(new)
                    mask[t:t + bh, l:l + bw] = True
            if added:
                break
        if not added:
            break
        count += added
    return mask


class MultiCrop(datasets.ImageFolder):
    def __init__(self, root, nlocal, patch):
        super().__init__(root)
        jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(0.2),
        ])
        norm = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        bic = Image.BICUBIC
        self.g1 = transforms.Compose([transforms.RandomResizedCrop(224, (0.14, 1.0), interpolation=bic), jitter, Blur(1.0), norm])
        self.g2 = transforms.Compose([transforms.RandomResizedCrop(224, (0.14, 1.0), interpolation=bic), jitter, Blur(0.1), Solarize(), norm])
        self.loc = transforms.Compose([transforms.RandomResizedCrop(96, (0.05, 0.4), interpolation=bic), jitter, Blur(0.5), norm])
        self.nlocal, self.patch = nlocal, patch

    def __getitem__(self, i):
        img, label = super().__getitem__(i)
        crops = [self.g1(img), self.g2(img)] + [self.loc(img) for _ in range(self.nlocal)]
        masks = [torch.from_numpy(block_mask(c.shape[1] // self.patch, c.shape[2] // self.patch, 0.3)) for c in crops]
        return crops, label, masks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_path", default="../shared/bench/photos")
    ap.add_argument("--num_workers", type=int, default=1)
    ap.add_argument("--local_crops_number", type=int, default=10)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = MultiCrop(args.data_path, args.local_crops_number, 16)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers, drop_last=True)
    n = 0
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        for crops, labels, masks in dl:
            n += labels.shape[0]
    dt = time.perf_counter() - t0
    print(f"torchvision (PIL) pipeline, {args.num_workers} worker(s), 2x224 + {args.local_crops_number}x96 + masks: "
          f"{n / dt:.1f} img/s ({n} images in {dt:.1f}s)")


if __name__ == "__main__":
    main()
