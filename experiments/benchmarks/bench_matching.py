"""Time and peak memory of the scorer's matching at aggregate scale (not a test).

Usage: ``PYTHONPATH=. python experiments/benchmarks/bench_matching.py [--n 1000] [--m 1000]
[--old-n 64]``.

Times what :meth:`fl_privsim.engine.scoring.Scorer.score` does per attacked update on N originals
and M reconstructions of 3x32x32: the MSE cost matrix, the Hungarian assignment, AVD of
every reconstruction against its closest original (``avd_matched``) and SSIM/PSNR of the
matched pairs. Data: random images (reconstructions = a permutation of the originals plus
noise), and real CIFAR-10 from ``/work/shared/data/cifar10/cifar10_exact_subset.npz`` (train
and test images together) when present. Each case runs in its own process so that its peak
resident memory (``ru_maxrss`` minus the RSS before the timed part) is its own.

It also times the former implementation (an (N, M, D) difference tensor for the cost, every
(original, reconstruction) pair through ``avd``, SSIM by a grouped 11x11 ``conv2d``; 24 GB at
N = M = 1000) at a size where it still fits, beside the current one on the same inputs, and
prints the ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fl_privsim.core import metrics

SHARED = Path(os.environ.get("FL_PRIVSIM_SHARED_DATA", "/work/shared/data"))
CIFAR = SHARED / "cifar10" / "cifar10_exact_subset.npz"


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _data(source: str, n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if source == "cifar":
        d = np.load(CIFAR)
        x = np.concatenate([d["x_train"], d["x_test"]])
        if x.shape[0] < n:
            raise SystemExit(f"{CIFAR} has {x.shape[0]} images, fewer than n = {n}")
        originals = torch.from_numpy(x[:n]).permute(0, 3, 1, 2).float() / 255
    else:
        originals = torch.rand(n, 3, 32, 32, generator=g)
    idx = torch.randint(0, n, (m,), generator=g)
    idx[: min(n, m)] = torch.randperm(n, generator=g)[: min(n, m)]
    recons = (originals[idx] + 0.05 * torch.randn(m, 3, 32, 32, generator=g)).clamp(0, 1)
    return originals, recons


def _old_match(originals: torch.Tensor, recons: torch.Tensor) -> np.ndarray:
    diff = originals.double().flatten(1)[:, None, :] - recons.double().flatten(1)[None, :, :]
    cost = (diff**2).mean(-1)
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = np.full(originals.shape[0], -1, dtype=np.int64)
    perm[rows] = cols
    return perm


def _old_avd_matched(originals: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    n, m = originals.shape[0], recons.shape[0]
    o = originals.repeat_interleave(m, dim=0)
    r = recons.repeat(n, 1, 1, 1)
    return metrics.avd(o, r).view(n, m).min(dim=0).values


def _old_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    a, b = a.double(), b.double()
    c = a.shape[1]
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    w = torch.outer(g, g).expand(c, 1, 11, 11).contiguous()
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a**2
    var_b = F.conv2d(b * b, w, groups=c) - mu_b**2
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    return (num / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))).flatten(1).mean(1)


def _case(source: str, n: int, m: int, impl: str, queue: mp.Queue) -> None:
    originals, recons = _data(source, n, m)
    match = _old_match if impl == "old" else metrics.match_reconstructions
    avd_matched = _old_avd_matched if impl == "old" else metrics.avd_matched
    ssim = _old_ssim if impl == "old" else metrics.ssim
    warm_o, warm_r = _data("random", 4, 4, seed=1)  # first-call set-up of torch/scipy, untimed
    (
        match(warm_o, warm_r),
        avd_matched(warm_o, warm_r),
        ssim(warm_o, warm_r),
        metrics.psnr(warm_o, warm_r),
    )
    before = _rss_mib()
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    perm = match(originals, recons)
    times["match"] = time.perf_counter() - t0
    ok = perm >= 0
    o = originals[torch.from_numpy(ok)]
    mt = recons[torch.from_numpy(perm[ok])]
    t = time.perf_counter()
    avd = avd_matched(originals, recons)
    times["avd"] = time.perf_counter() - t
    t = time.perf_counter()
    s = ssim(o, mt)
    p = metrics.psnr(o, mt)
    times["ssim+psnr"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    queue.put(
        {
            "times": times,
            "peak_mib": _peak_mib() - before,
            "perm": perm,
            "avd": avd.numpy(),
            "ssim": float(s.mean()),
            "psnr": float(p.mean()),
        }
    )


def run_case(source: str, n: int, m: int, impl: str) -> dict:
    """Run one case in a fresh process; returns its timings, peak memory and results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_case, args=(source, n, m, impl, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def _line(label: str, r: dict) -> str:
    t = r["times"]
    return (
        f"{label:<34} match {t['match']:7.3f} s  avd {t['avd']:7.3f} s  "
        f"ssim+psnr {t['ssim+psnr']:6.3f} s  "
        f"total {t['total']:7.3f} s  peak +{r['peak_mib']:7.0f} MiB  (psnr {r['psnr']:.1f} dB, "
        f"ssim {r['ssim']:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="originals (default 1000)")
    parser.add_argument("--m", type=int, default=1000, help="reconstructions (default 1000)")
    parser.add_argument(
        "--old-n",
        type=int,
        nargs="+",
        default=[64, 128],
        help="sizes N = M at which to compare with the former implementation",
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, images 3x32x32")
    sources = ["random"] + (["cifar"] if CIFAR.exists() else [])
    if "cifar" not in sources:
        print(f"({CIFAR} not found: random data only)")
    for source in sources:
        r = run_case(source, args.n, args.m, "new")
        print(_line(f"{source} N={args.n} M={args.m} new", r))
    print("\nformer vs current implementation (same inputs, random data):")
    for k in args.old_n:
        old = run_case("random", k, k, "old")
        new = run_case("random", k, k, "new")
        same = (
            np.array_equal(old["perm"], new["perm"])
            and np.allclose(old["avd"], new["avd"], atol=1e-12)
            and abs(old["ssim"] - new["ssim"]) < 1e-12
        )
        print(_line(f"random N=M={k} old", old))
        print(_line(f"random N=M={k} new", new))
        ratio = old["times"]["total"] / new["times"]["total"]
        print(
            f"{'':<34} old/new total time {ratio:.1f}x, peak memory {old['peak_mib']:.0f} / "
            f"{max(new['peak_mib'], 1):.0f} MiB, same matching, AVD and SSIM: {same}"
        )


if __name__ == "__main__":
    main()
