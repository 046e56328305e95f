"""python -m vkern demo: build a random-weight Wan pipeline, patch it, and compare with unpatched."""
import time

import torch

from . import models, patch
from .ops import _backend


def _timed(fn, device, repeats):
    out = fn()  # warm-up (kernel compilation, autotuning, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return out, sorted(times)[len(times) // 2], peak


def _max_rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def run(size="tiny", res=None, device=None, repeats=None):
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise SystemExit(f"--device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch here has no CUDA device (torch {torch.__version__})")
    res = res or ("tiny" if size == "tiny" else "480p")
    if (size != "tiny" or res != "tiny") and device.type != "cuda":
        raise SystemExit(f"--size {size} --res {res} needs a CUDA GPU (a real resolution or model size takes minutes to "
                         "hours on a CPU); on the CPU use --size tiny --res tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = repeats or (3 if size == "tiny" else 2)
    pipe = models.build_wan_pipeline(size, dtype=dtype, device=device)
    inputs = models.transformer_inputs(pipe.transformer, res, dtype, device)
    latents = inputs["hidden_states"]

    def step():
        with torch.inference_mode():
            return pipe.transformer(**inputs).sample

    def decode():
        with torch.inference_mode():
            return pipe.vae.decode(latents).sample

    print(f"vkern demo: Wan {size} at {res}, latents {tuple(latents.shape)}, {str(dtype)[6:]} on {device}")
    rows = []
    for name, fn in (("transformer step", step), ("vae decode", decode)):
        ref, t_ref, peak_ref = _timed(fn, device, repeats)
        handle = patch(pipe)
        _backend.last_choice.clear()
        out, t_vk, peak_vk = _timed(fn, device, repeats)
        used = ", ".join(f"{op}={b}" for op, b in _backend.last_choice.items()) or "-"
        handle.undo()
        rows.append((name, used, _max_rel(ref, out), t_ref, t_vk, peak_ref, peak_vk))

    header = f"{'':<17} {'max rel err':>11} {'unpatched s':>11} {'vkern s':>8}"
    if device.type == "cuda":
        header += f" {'peak GiB':>9} {'vkern GiB':>9}"
    print(header)
    for name, used, err, t_ref, t_vk, p_ref, p_vk in rows:
        line = f"{name:<17} {err:>11.2e} {t_ref:>11.4f} {t_vk:>8.4f}"
        if device.type == "cuda":
            line += f" {p_ref:>9.2f} {p_vk:>9.2f}"
        print(line)
        print(f"{'':<17} backends: {used}")
    return rows
