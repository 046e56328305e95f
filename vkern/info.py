"""vkern.info(): versions, the build of vkern._C, the GPU, and the backend each op would use here."""
import platform

import torch

from . import __version__
from ._ext import LOAD_ERROR, cuda_ext
from .ops import _backend


def info(print_=True):
    """Versions, the vkern._C build, the GPU, flash-attn, the backend each op would pick here for bf16, and
    attention's pick per shape class; printed (print_=True) and returned as a dict."""
    C = cuda_ext()
    lines = {
        "vkern": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch cuda": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "vkern._C": (f"built for sm_{C.cuda_archs} with CUDA runtime {C.cuda_version // 1000}."
                     f"{C.cuda_version % 1000 // 10}" if C else f"not built ({LOAD_ERROR})"),
    }
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        lines["gpu"] = f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB"
    else:
        lines["gpu"] = "none"
    lines["flash-attn"] = _flash_attn_line(device)
    from .patch import supported_models

    lines["vkern.patch"] = "; ".join(f"{family}: {', '.join(ms)}" for family, ms in supported_models().items())
    from .modules.wan_vae import decode_defaults

    lines["wan vae decode"] = decode_defaults()
    backends = {op: _backend.would_choose(op, device, torch.bfloat16)[0] for op in _backend.registered_ops()}
    attention = attention_by_shape_class(device)
    if print_:
        width = max(map(len, lines))
        for k, v in lines.items():
            print(f"{k:<{width}}  {v}")
        print(f"backends on {device} (bf16; force with VKERN_<OP>_BACKEND):")
        for op, b in backends.items():
            print(f"  {op:<20} {b}")
        print("attention (bf16, no mask) by shape class:")
        for shape_class, b in attention.items():
            print(f"  {shape_class:<32} {b}")
    return {**lines, "device": str(device), "backends": backends, "attention": attention}


def attention_by_shape_class(device, dtype=torch.bfloat16):
    """{shape class: the backend vkern.ops.attention's auto would run} on `device`: per head dim, below and from the
    key count where the measured order changes (vkern.ops.fused_attention.CUDA_MIN_KEYS), and for other head dims.
    The CUDA kernel's entries name its key tile (128, or the head dim's wide one: fused_attention._flash_keys)."""
    from .ops.fused_attention import CUDA_MIN_KEYS, _attention_candidates, _flash_keys

    def pick(head_dim, kv_len, return_lse=False):
        cands = _attention_candidates(device, dtype, head_dim, return_lse=return_lse, kv_len=kv_len)
        chosen = _backend.would_choose_from("attention", cands)
        if chosen == "cuda" and kv_len is not None:
            chosen += f" (128x{_flash_keys(head_dim, kv_len)} tiles)"
        return chosen

    classes = {}
    for head_dim, keys in CUDA_MIN_KEYS.items():
        classes[f"D {head_dim}, < {keys} keys"] = pick(head_dim, keys - 1)
        classes[f"D {head_dim}, >= {keys} keys"] = pick(head_dim, keys)
        classes[f"D {head_dim}, with lse"] = pick(head_dim, keys, return_lse=True)
    classes["D 96 (other head dims)"] = pick(96, None)
    classes["D 96, with lse"] = pick(96, None, return_lse=True)
    return classes


def _flash_attn_line(device):
    from .ops import flash_attn_backend

    if device.type != "cuda":
        installed = [m for m, _ in flash_attn_backend.IMPLEMENTATIONS
                     if not isinstance(flash_attn_backend._load(m), str)]
        return ", ".join(installed) + " (installed; runs on CUDA)" if installed else "not installed"
    module, fn = flash_attn_backend.implementation(device)
    return f"{module} ({_version(module)}; an opt-in backend: backend='flash_attn')" if module else fn


def _version(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return "not installed"
