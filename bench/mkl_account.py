"""Where the matrix products of a training step go: sums MKL_VERBOSE and ONEDNN_VERBOSE lines.

Run a step benchmark with MKL_VERBOSE=1 ONEDNN_VERBOSE=1 (both libraries then log every call
with its shape and its own duration), save its output, and pass the file and the number of
steps it ran (warm-up + timed) to divide by:

    python bench/mkl_account.py LOG STEPS [--step_ms MS]

Prints per step: MKL's sgemm calls split into large ones (M*N*K >= 1e7, the linears) and small
ones (attention blocks, head and loss remnants), MKL's batched sgemm (its log gives no shapes,
so no FLOPs), and oneDNN's primitives by kind (inner products, convolutions, matmuls with
their FLOPs; element-wise and other primitives by time only). With --step_ms (the step's CPU
time measured WITHOUT the verbose logs, which slow the step down), also what is left outside
the products, and the time the step's products would take at the speed of its large sgemm
calls: a floor for any implementation doing the same arithmetic with the same kernels.
`bash bench/compare.sh gemm-account` runs both sides and this script.
"""
import argparse
import collections
import re

UNIT_MS = {"s": 1e3, "ms": 1.0, "us": 1e-3, "ns": 1e-6}
MKL = re.compile(r"MKL_VERBOSE (\w+)\((.*)\) ([\d.]+)(s|ms|us|ns) ")


def onednn_flop(kind, problem):
    """FLOPs of one oneDNN primitive call from its problem descriptor, 0 if not a product."""
    dims = dict(re.findall(r"([a-z]+)(\d+)", problem))
    g = lambda k, d=1: int(dims.get(k, d))
    if kind == "inner_product":
        return 2 * g("mb") * g("ic") * g("oc")
    if kind == "convolution":
        spatial = g("oh") * g("ow") * g("od") * g("kh") * g("kw") * g("kd")
        return 2 * g("mb") * g("ic") * g("oc") * spatial // g("g")
    if kind == "matmul":
        # "BxMxK:BxKxN" (batch dims optional)
        parts = problem.split(":")
        if len(parts) >= 2:
            a = [int(x) for x in parts[0].split("x")]
            b = [int(x) for x in parts[1].split("x")]
            batch = 1
            for x in a[:-2]:
                batch *= x
            return 2 * batch * a[-2] * a[-1] * b[-1]
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("steps", type=float, help="steps the log covers (warm-up + timed)")
    ap.add_argument("--step_ms", type=float, help="CPU ms per step measured without verbose logs")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    rows = collections.OrderedDict()

    def add(name, ms, flop, is_product=True):
        r = rows.setdefault(name, [0, 0.0, 0, is_product])
        r[0] += 1
        r[1] += ms
        r[2] += flop

    for name in ("MKL sgemm, large (M*N*K >= 1e7)", "MKL sgemm, small", "MKL sgemm_batch (no shapes logged)"):
        rows[name] = [0, 0.0, 0, True]
    with open(args.log, errors="replace") as f:
        for line in f:
            if line.startswith("MKL_VERBOSE"):
                m = MKL.match(line)
                if not m:
                    continue
                fn, a, t, u = m.groups()
                ms = float(t) * UNIT_MS[u]
                a = a.split(",")
                if fn == "SGEMM":
                    mm, nn, kk = int(a[2]), int(a[3]), int(a[4])
                    big = mm * nn * kk >= 10_000_000
                    add("MKL sgemm, large (M*N*K >= 1e7)" if big else "MKL sgemm, small", ms, 2 * mm * nn * kk)
                elif fn == "SGEMM_BATCH":
                    add("MKL sgemm_batch (no shapes logged)", ms, 0)
                else:
                    add(f"MKL {fn}", ms, 0)
            elif line.startswith("onednn_verbose") and ",exec," in line:
                f_ = line.rstrip().split(",")
                try:
                    ms = float(f_[-1])
                except ValueError:
                    continue
                kind = f_[5]
                flop = onednn_flop(kind, f_[-2])
                product = kind in ("inner_product", "convolution", "matmul")
                add(f"oneDNN {kind}", ms, flop, product)
    s = args.steps
    print(f"{args.label} per step (averaged over {s:g} steps):")
    print(f"  {'':38s} {'calls':>7s} {'ms':>8s} {'GFLOP':>7s} {'GFLOPS':>7s}")
    prod_ms = prod_flop = 0.0
    other_ms = 0.0
    for name, (n, ms, flop, is_product) in rows.items():
        if n == 0:
            continue
        rate = f"{flop / ms / 1e6:7.1f}" if flop and ms else "      -"
        gf = f"{flop / s / 1e9:7.1f}" if flop else "      -"
        print(f"  {name:38s} {n / s:7.0f} {ms / s:8.1f} {gf} {rate}")
        if is_product:
            prod_ms += ms
            prod_flop += flop
        else:
            other_ms += ms
    print(f"  {'matrix products, total':38s} {'':7s} {prod_ms / s:8.1f} {prod_flop / s / 1e9:7.1f}")
    big = rows["MKL sgemm, large (M*N*K >= 1e7)"]
    if big[1] > 0:
        peak = big[2] / big[1] / 1e6  # GFLOP/s of the large calls
        print(f"  the same FLOPs at the large calls' {peak:.0f} GFLOPS: {prod_flop / s / peak / 1e6:.1f} ms "
              "(batched calls not included)")
    if args.step_ms:
        print(f"  step (CPU, without logs) {args.step_ms:.1f} ms; outside the products: "
              f"{args.step_ms - prod_ms / s:.1f} ms (of which oneDNN element-wise/other primitives {other_ms / s:.1f})")


if __name__ == "__main__":
    main()
