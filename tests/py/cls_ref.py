"""Reference outputs of timm / torchvision / Pillow for tests/cls_data.rs (fine-tuning data).

Usage: cls_ref.py MODE DIR. Reads DIR/req.json and DIR/in.npz, writes DIR/out.npz and
DIR/out.json. Random draws of timm / torchvision / numpy are served by private seeded
generators through recording wrappers (`random.random`, `random.uniform`, ...,
`np.random.choice/rand/beta/randint`, `torch.rand/randint`, ColorJitter.get_params, timm's
_get_pixels), so the Rust side can replay exactly the draws each transform made.
"""
import json
import random
import sys

import numpy as np
import torch
from PIL import Image, ImageFilter

LOG = []


def rec(kind, args, value):
    LOG.append([kind, list(args), value])
    return value


def install_recorders(seed):
    r = random.Random(seed)
    g = np.random.RandomState(seed)
    tg = torch.Generator().manual_seed(seed)

    random.random = lambda: rec("random", [], r.random())
    random.uniform = lambda a, b: rec("uniform", [a, b], r.uniform(a, b))
    random.randint = lambda a, b: rec("randint", [a, b], r.randint(a, b))
    random.gauss = lambda mu=0.0, sigma=1.0: rec("gauss", [mu, sigma], r.gauss(mu, sigma))

    def choice(seq):
        i = r.randrange(len(seq))
        rec("choice", [len(seq)], i)
        return seq[i]

    random.choice = choice

    def np_choice(a, size=None, replace=True, p=None):
        assert p is None and replace
        n = len(a)
        idx = g.randint(0, n, size=size)
        for i in np.atleast_1d(idx):
            rec("choice", [n], int(i))
        if size is None:
            return a[int(idx)]
        return [a[int(i)] for i in idx]

    def np_rand(*shape):
        v = g.rand(*shape)
        for x in np.atleast_1d(v):
            rec("random", [], float(x))
        return v

    def np_beta(a, b, size=None):
        v = g.beta(a, b, size=size)
        for x in np.atleast_1d(v):
            rec("beta", [a, b], float(x))
        return v

    def np_randint(low, high=None, size=None):
        v = g.randint(low, high, size=size)
        for x in np.atleast_1d(v):
            rec("randint", [int(low), int(high) - 1], int(x))
        return v

    np.random.choice = np_choice
    np.random.rand = np_rand
    np.random.beta = np_beta
    np.random.randint = np_randint

    orig_rand = torch.rand

    def t_rand(*size, **kw):
        v = orig_rand(*size, generator=tg)
        assert v.numel() == 1
        rec("random", [], float(v))
        return v

    def t_randint(low, high, size, **kw):
        x = int(r.randint(low, high - 1))
        rec("randint", [low, high - 1], x)
        return torch.tensor([x])

    torch.rand = t_rand
    torch.randint = t_randint

    import torchvision.transforms as T

    orig_gp = T.ColorJitter.get_params

    def gp(brightness, contrast, saturation, hue):
        fn_idx, b, c, s, h = orig_gp(brightness, contrast, saturation, hue)
        rec("perm", [4], [int(i) for i in fn_idx])
        for rng_, v in ((brightness, b), (contrast, c), (saturation, s), (hue, h)):
            if v is not None:
                rec("uniform", [float(rng_[0]), float(rng_[1])], v)
        return fn_idx, b, c, s, h

    T.ColorJitter.get_params = staticmethod(gp)

    import timm.data.random_erasing as RE

    orig_pixels = RE._get_pixels

    def pixels(per_pixel, rand_color, patch_size, dtype=torch.float32, device="cpu"):
        t = orig_pixels(per_pixel, rand_color, patch_size, dtype=dtype, device="cpu")
        if per_pixel or rand_color:
            rec("normal", [t.numel()], t.flatten().tolist())
        return t

    RE._get_pixels = pixels


def pil(a):
    return Image.fromarray(np.ascontiguousarray(a.astype(np.uint8)), "RGB")


FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def mode_ops(req, inp, out):
    """Each RandAugment op through timm's AugmentOp (prob 1, no noise), its sign forced."""
    from timm.data.auto_augment import AugmentOp

    for i, c in enumerate(req["cases"]):
        img = pil(inp[c["img"]])
        flag = 0.9 if c["negate"] else 0.1
        random.random = lambda: flag
        hp = dict(img_mean=tuple(c["fill"]), interpolation=FILTERS[c["filter"]])
        op = AugmentOp(c["op"], prob=1.0, magnitude=c["magnitude"], hparams=hp)
        out[f"case{i}"] = np.asarray(op(img))


def mode_pil(req, inp, out):
    """Pillow / torchvision primitives directly."""
    import torchvision.transforms.functional as F

    for i, c in enumerate(req["cases"]):
        img = pil(inp[c["img"]])
        kind = c["kind"]
        if kind == "rotate":
            r = img.rotate(c["angle"], resample=FILTERS[c["filter"]], fillcolor=tuple(c["fill"]))
        elif kind == "affine":
            r = img.transform(img.size, Image.Transform.AFFINE, tuple(c["matrix"]),
                              resample=FILTERS[c["filter"]], fillcolor=tuple(c["fill"]))
        elif kind == "smooth":
            r = img.filter(ImageFilter.SMOOTH)
        elif kind == "center_crop":
            r = F.center_crop(img, c["size"])
        elif kind == "resize_shorter":
            r = F.resize(img, c["size"], interpolation=F.InterpolationMode(c["filter"]))
        elif kind == "resized_crop":
            t, l, h, w = c["box"]
            r = F.resized_crop(img, t, l, h, w, [c["size"], c["size"]],
                               interpolation=F.InterpolationMode(c["filter"]))
        else:
            raise ValueError(kind)
        out[f"case{i}"] = np.asarray(r)


def train_transform(cfg):
    from timm.data import create_transform
    import torchvision.transforms as T

    t = create_transform(
        input_size=cfg["input_size"], is_training=True, color_jitter=cfg["color_jitter"],
        auto_augment=cfg["aa"], interpolation=cfg["train_interpolation"],
        re_prob=cfg["reprob"], re_mode=cfg["remode"], re_count=cfg["recount"],
        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    if cfg["input_size"] <= 32:
        t.transforms[0] = T.RandomCrop(cfg["input_size"], padding=4)
    return t


def mode_train(req, inp, out):
    install_recorders(req["seed"])
    draws = []
    for i, c in enumerate(req["cases"]):
        t = train_transform(c["cfg"])
        LOG.clear()
        x = t(pil(inp[c["img"]]))
        out[f"case{i}"] = x.numpy()
        draws.append(list(LOG))
    return {"draws": draws}


def mode_eval(req, inp, out):
    """build_transform(is_train=False) of run_class_finetuning.py (crop_pct) / eval_cls.py."""
    import torchvision.transforms as T

    for i, c in enumerate(req["cases"]):
        size = c["input_size"]
        t = []
        if size > 32:
            crop_pct = c["crop_pct"]
            if crop_pct is None:
                crop_pct = 224 / 256 if size < 384 else 1.0
            if c.get("deit"):
                rs = int((256 / 224) * size)
            else:
                rs = int(size / crop_pct)
            t.append(T.Resize(rs, interpolation=T.InterpolationMode(c["filter"])))
            t.append(T.CenterCrop(size))
        t += [T.ToTensor(), T.Normalize(c["mean"], c["std"])]
        out[f"case{i}"] = T.Compose(t)(pil(inp[c["img"]])).numpy()


def mode_erasing(req, inp, out):
    from timm.data.random_erasing import RandomErasing

    install_recorders(req["seed"])
    draws = []
    for i, c in enumerate(req["cases"]):
        x = torch.from_numpy(inp[c["img"]].copy())
        e = RandomErasing(c["prob"], mode=c["mode"], max_count=c["count"], device="cpu")
        LOG.clear()
        out[f"case{i}"] = e(x).numpy()
        draws.append(list(LOG))
    return {"draws": draws}


def mode_mixup(req, inp, out):
    from timm.data import Mixup

    install_recorders(req["seed"])
    draws = []
    for i, c in enumerate(req["cases"]):
        x = torch.from_numpy(inp["images"].copy())
        y = torch.from_numpy(inp["targets"].copy())
        mm = c["cutmix_minmax"]
        m = Mixup(mixup_alpha=c["mixup_alpha"], cutmix_alpha=c["cutmix_alpha"],
                  cutmix_minmax=list(mm) if mm is not None else None, prob=c["prob"],
                  switch_prob=c["switch_prob"], mode=c["mode"],
                  label_smoothing=c["label_smoothing"], num_classes=c["num_classes"])
        LOG.clear()
        xm, ym = m(x, y)
        out[f"x{i}"] = xm.numpy()
        out[f"y{i}"] = ym.numpy()
        draws.append(list(LOG))
    return {"draws": draws}


def mode_pickle(req, inp, out):
    """CIFAR python-version files (several jobs), written from the arrays given, and what
    torchvision reads from them."""
    classes = {}
    for j, job in enumerate(req["jobs"]):
        res = {}
        classes[str(j)] = pickle_job(job, inp, res)
        for key, v in res.items():
            out[f"{key}{j}"] = v
    return {"classes": classes}


def pickle_job(req, inp, out):
    import os
    import pickle

    d = req["dir"]
    data = inp["data"]
    k = req["kind"]
    fine = [int(v) for v in inp["fine100" if k == "cifar100-py" else "fine10"]]
    coarse = [int(v) for v in inp["coarse"]]
    if k == "cifar10-py":
        os.makedirs(d, exist_ok=True)
        n = len(fine)
        per = (n + 5) // 6
        names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch"]
        for j, name in enumerate(names):
            sl = slice(j * per, (j + 1) * per)
            obj = {"batch_label": "batch", "labels": fine[sl], "data": data[sl],
                   "filenames": ["f%d.png" % q for q in range(len(fine[sl]))]}
            with open(os.path.join(d, name), "wb") as f:
                pickle.dump(obj, f, protocol=req["protocol"])
        with open(os.path.join(d, "batches.meta"), "wb") as f:
            pickle.dump({"label_names": ["c%d" % q for q in range(10)], "num_vis": 3072},
                        f, protocol=req["protocol"])
    elif k == "cifar100-py":
        os.makedirs(d, exist_ok=True)
        n = len(fine)
        for name, sl in (("train", slice(0, n - n // 4)), ("test", slice(n - n // 4, n))):
            obj = {"filenames": ["f.png"] * len(fine[sl]), "batch_label": "b",
                   "fine_labels": fine[sl], "coarse_labels": coarse[sl], "data": data[sl]}
            with open(os.path.join(d, name), "wb") as f:
                pickle.dump(obj, f, protocol=req["protocol"])
        with open(os.path.join(d, "meta"), "wb") as f:
            pickle.dump({"fine_label_names": ["f%d" % q for q in range(100)],
                         "coarse_label_names": ["k%d" % q for q in range(20)]}, f,
                        protocol=req["protocol"])
    # torchvision's own reading of what was written, for the comparison (its md5 checks of
    # the real files switched off).
    import torchvision
    import torchvision.datasets.cifar as C

    C.check_integrity = lambda *a, **k: True
    C.CIFAR10._check_integrity = lambda self: True

    if k == "cifar10-py":
        import shutil
        root = d + "-tv"
        shutil.copytree(d, os.path.join(root, "cifar-10-batches-py"), dirs_exist_ok=True)
        tr = torchvision.datasets.CIFAR10(root, train=True, download=False)
    else:
        import shutil
        root = d + "-tv"
        shutil.copytree(d, os.path.join(root, "cifar-100-python"), dirs_exist_ok=True)
        tr = torchvision.datasets.CIFAR100(root, train=True, download=False)
    out["tv_data"] = np.ascontiguousarray(tr.data)
    out["tv_targets"] = np.asarray(tr.targets, dtype=np.int64)
    return list(tr.classes)


def resize_horizontal_first():
    """Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass of a resize first when the
    height shrinks much more than the width; the official code ran on the Pillow of its time,
    whose ImagingResampleInner always resamples horizontally first (and so do data::ops and
    data::cls). Two single-axis resizes reproduce that order with Pillow 13's own arithmetic
    (the vertical pass reads only rows the horizontal pass computed either way)."""
    orig = Image.Image.resize

    def resize(self, size, resample=None, box=None, reducing_gap=None):
        size = tuple(size)
        if (box is None and reducing_gap is None and size[0] != self.width
                and size[1] != self.height
                and resample in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)):
            return orig(orig(self, (size[0], self.height), resample), size, resample)
        return orig(self, size, resample, box, reducing_gap)

    Image.Image.resize = resize


def main():
    resize_horizontal_first()
    mode, d = sys.argv[1], sys.argv[2]
    with open(f"{d}/req.json") as f:
        req = json.load(f)
    inp = dict(np.load(f"{d}/in.npz"))
    out = {}
    extra = globals()[f"mode_{mode}"](req, inp, out) or {}
    np.savez(f"{d}/out.npz", **out)
    with open(f"{d}/out.json", "w") as f:
        json.dump(extra, f)


if __name__ == "__main__":
    main()
