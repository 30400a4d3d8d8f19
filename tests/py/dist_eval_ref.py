"""Reference for `ibot finetune --dist_eval`: the official evaluation's numbers from per-sample
predictions, with torch's own samplers and DataLoader doing the sharding and batching.

The official `evaluate` (engine_for_finetuning.py / eval_cls.py) updates a MetricLogger once per
batch: `loss` with the batch's mean cross-entropy (n=1), `acc1`/`acc5` with timm's accuracy
(float32 percent of the batch) and n=batch size; `synchronize_between_processes` then sums every
meter's (count, total) over the ranks and reports total / count. The validation loader is
DataLoader(sampler, batch_size=int(1.5 * batch_size), drop_last=False) with
DistributedSampler(shuffle=False) under --dist_eval and SequentialSampler otherwise.

Usage: dist_eval_ref.py IN.json; IN = {"samples": [[loss, top1, top5], ...], "batch_size": B,
"world_size": W}. Prints {"single", "dist_eval", "no_dist_eval"}: {"loss", "acc1", "acc5"}.
"""
import json
import sys

import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler


class Meter:
    """SmoothedValue's count and total."""

    def __init__(self):
        self.count, self.total = 0, 0.0

    def update(self, value, n=1):
        self.count += n
        self.total += value * n


def rank_meters(samples, sampler, eval_bs):
    loader = DataLoader(list(range(len(samples))), sampler=sampler, batch_size=eval_bs,
                        drop_last=False)
    m = {"loss": Meter(), "acc1": Meter(), "acc5": Meter()}
    for idx in loader:
        idx = idx.tolist()
        b = len(idx)
        loss = sum(samples[i][0] for i in idx) / b  # CrossEntropyLoss(reduction='mean')
        hits1 = torch.tensor([samples[i][1] for i in idx], dtype=torch.float32)
        hits5 = torch.tensor([samples[i][2] for i in idx], dtype=torch.float32)
        acc1 = (hits1.sum(0) * 100.0 / b).item()  # timm.utils.accuracy, float32
        acc5 = (hits5.sum(0) * 100.0 / b).item()
        m["loss"].update(loss)
        m["acc1"].update(acc1, n=b)
        m["acc5"].update(acc5, n=b)
    return m


def synchronized(per_rank):
    """synchronize_between_processes: counts and totals all-reduced (summed), then global_avg."""
    out = {}
    for k in ("loss", "acc1", "acc5"):
        count = sum(m[k].count for m in per_rank)
        total = sum(m[k].total for m in per_rank)
        out[k] = total / count
    return out


def main():
    inp = json.load(open(sys.argv[1]))
    samples, bs, world = inp["samples"], inp["batch_size"], inp["world_size"]
    eval_bs = int(1.5 * bs)
    data = list(range(len(samples)))
    single = synchronized([rank_meters(samples, SequentialSampler(data), eval_bs)])
    dist = synchronized([
        rank_meters(samples, DistributedSampler(data, num_replicas=world, rank=r, shuffle=False),
                    eval_bs)
        for r in range(world)
    ])
    no_dist = synchronized([rank_meters(samples, SequentialSampler(data), eval_bs)
                            for _ in range(world)])
    print(json.dumps({"single": single, "dist_eval": dist, "no_dist_eval": no_dist}))


if __name__ == "__main__":
    main()
