"""vkern.info(): versions, the build of vkern._C, the GPU, and the backend each op would use here."""
import platform

import torch

from . import __version__
from ._ext import LOAD_ERROR, cuda_ext
from .ops import _backend


def info(print_=True):
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
    backends = {op: _backend.would_choose(op, device, torch.bfloat16)[0] for op in _backend.registered_ops()}
    if print_:
        width = max(map(len, lines))
        for k, v in lines.items():
            print(f"{k:<{width}}  {v}")
        print(f"backends on {device} (bf16; force with VKERN_<OP>_BACKEND):")
        for op, b in backends.items():
            print(f"  {op:<20} {b}")
    return {**lines, "device": str(device), "backends": backends}


def _version(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return "not installed"
