"""Principled tolerances (DESIGN.md): a low-precision kernel's error against a float64 oracle may be
at most 2x the error PyTorch itself makes doing the same op in the same low precision."""
import torch


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_within_torch_error(out, oracle, torch_out, factor=2.0, floor=1e-6, what="output"):
    """out: the kernel's result; oracle: float64 ground truth; torch_out: PyTorch's result in the
    same low precision. Checks NaN-freedom and max-abs and relative-L2 errors against 2x PyTorch's."""
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err_max = (out.double() - oracle).abs().max().item()
    torch_max = (torch_out.double() - oracle).abs().max().item()
    err_l2, torch_l2 = rel_l2(out, oracle), rel_l2(torch_out, oracle)
    assert err_max <= factor * torch_max + floor, f"{what}: max error {err_max:.3g} > {factor} x torch's {torch_max:.3g}"
    assert err_l2 <= factor * torch_l2 + floor, f"{what}: rel L2 {err_l2:.3g} > {factor} x torch's {torch_l2:.3g}"


def poison(t):
    """Fill an output buffer with NaN so an unwritten element cannot pass."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)
