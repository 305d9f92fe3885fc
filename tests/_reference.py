"""The float64 oracles the op tests compare with (test_ops.py, test_properties.py, test_numpy.py): written
here once, independently of the kernels, from the facts they implement (README, csrc/kernels/*.h)."""

import math

import numpy as np
import torch


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers around the float64 values `v`."""
    fi = torch.finfo(dtype)
    mant = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    e = torch.floor(torch.log2(v.abs().clamp_min(fi.tiny)))
    return torch.exp2(e - mant)


def reference_merge(W, A, B, scale):
    """Exact W + scale * B @ A, in float64."""
    return W.double() + scale * (B.double() @ A.double())


def reference_keep_count(n: int, ratio: float) -> int:
    """How many entries magnitude pruning keeps: n - floor(ratio n) (README, "Magnitude pruning")."""
    return n - math.floor(ratio * n)


def reference_prune(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the n - floor(ratio n) largest |x| (NaN largest, ties to the lower index), in float64."""
    flat = x.double().flatten()
    n = flat.numel()
    k = reference_keep_count(n, ratio)
    mag = flat.abs()  # NaN stays NaN, which a descending sort puts first
    order = torch.sort(mag, descending=True, stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view(x.shape)


def philox_words(seed: int, offset: int, n: int):
    """Words 0 .. n-1 of Philox stream (seed, offset) (csrc/kernels/philox.h), with NumPy uint64."""
    m = np.uint64(0xFFFFFFFF)
    blocks = np.arange((n + 3) // 4, dtype=np.uint64)
    c = [blocks & m, blocks >> np.uint64(32), np.full_like(blocks, offset & 0xFFFFFFFF),
         np.full_like(blocks, offset >> 32)]
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0), p1 & m,
             (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1), p0 & m]
    return np.stack(c, axis=1).reshape(-1)[:n]


def reference_normals(seed: int, offset: int, n: int) -> torch.Tensor:
    """The normals of reset_ (Box-Muller on Philox words), in float64."""
    w = torch.from_numpy(philox_words(seed, offset, n + 4).astype("int64"))
    u = ((w >> 8) + 1).double() * 2.0 ** -24
    pairs = u[: (n + 1) // 2 * 2 + 2].view(-1, 2)
    r = torch.sqrt(-2 * torch.log(pairs[:, 0]))
    t = 2 * math.pi * pairs[:, 1]
    return torch.stack([r * torch.cos(t), r * torch.sin(t)], dim=1).reshape(-1)[:n]
