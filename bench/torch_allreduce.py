"""torch.distributed Gloo all-reduce of a flat float32 tensor, the reference for
`ibot bench allreduce`. Run under torchrun, e.g.
    .venv/bin/torchrun --nproc_per_node 2 bench/torch_allreduce.py --numel 22000000
Prints the median milliseconds per all-reduce and the bandwidths (nccl-tests' definitions)."""
import argparse
import time

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--numel", type=int, default=22_000_000)
p.add_argument("--iters", type=int, default=10)
p.add_argument("--warmup", type=int, default=2)
a = p.parse_args()
dist.init_process_group("gloo")
ws, rank = dist.get_world_size(), dist.get_rank()
t = torch.ones(a.numel)
times = []
for i in range(a.warmup + a.iters):
    dist.barrier()
    t0 = time.perf_counter()
    dist.all_reduce(t)
    if i >= a.warmup:
        times.append((time.perf_counter() - t0) * 1e3)
times.sort()
ms = times[len(times) // 2]
if rank == 0:
    gb = a.numel * 4 / 1e9
    alg = gb / (ms / 1e3)
    print(f"torch.distributed all_reduce (Gloo, {ws} ranks): {a.numel} float32 in {ms:.1f} ms "
          f"(median of {a.iters}): algbw {alg:.2f} GB/s, busbw {alg * 2 * (ws - 1) / ws:.2f} GB/s")
dist.destroy_process_group()
