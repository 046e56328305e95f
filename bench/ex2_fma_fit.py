"""The cubic of csrc/sm90.cuh's ex2_fma (2^x on the FMA pipe), fitted and checked offline (bench/NOTES.md session 22):
a minimax fit of 2^f on [-0.5, 0.5] in relative error, p(f) = 1 + c1 f + c2 f^2 + c3 f^3 (Lawson's iteratively
reweighted least squares on 20001 points), then a float32 emulation of the kernel's arithmetic over the int8 P/V
kernel's exponent range (x in [-30, log2(255) - 24]): the largest relative error and how often the u8 code
round(2^(x + 24)) differs from the exact one.
    python -m bench.ex2_fma_fit"""
import numpy as np


def fit(points=20001, iterations=200):
    f = np.linspace(-0.5, 0.5, points)
    y = 2.0 ** f
    a = np.stack([f, f ** 2, f ** 3], 1) / y[:, None]
    b = (y - 1) / y
    w = np.ones_like(f)
    for _ in range(iterations):
        sw = np.sqrt(w)
        c, *_ = np.linalg.lstsq(a * sw[:, None], b * sw, rcond=None)
        w = w * np.abs(a @ c - b)
        w /= w.sum()
    return c.astype(np.float32)


def ex2_fma(x, c):
    """The kernel's steps in float32: clamp, round by 1.5 * 2^23, the cubic, the integer into the exponent field."""
    x = np.maximum(x.astype(np.float32), np.float32(-30))
    magic = np.float32(12582912)
    rounded = (x + magic).astype(np.float32)
    f = (x - (rounded - magic)).astype(np.float32)
    p = (np.float32(1) + f * (c[0] + f * (c[1] + f * c[2]))).astype(np.float32)
    return (p.view(np.int32) + (rounded.view(np.int32) << 23)).view(np.float32)


def main():
    c = fit()
    x = np.linspace(-30, np.log2(255) - 24, 200001).astype(np.float32)
    got, exact = ex2_fma(x, c).astype(np.float64), 2.0 ** x.astype(np.float64)
    codes, exact_codes = np.round(got * 2 ** 24), np.round(exact * 2 ** 24)
    print(f"c1, c2, c3 = {[float(v) for v in c]}")
    print(f"largest relative error {np.abs(got / exact - 1).max():.3g}; codes moved {(codes != exact_codes).mean():.2%}"
          f" (by at most {np.abs(codes - exact_codes).max():.0f}); largest code {codes.max():.0f}")


if __name__ == "__main__":
    main()
