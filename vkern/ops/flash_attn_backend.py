"""flash-attn (Dao-AILab's package) as a vkern.ops.attention backend, when it is installed: FlashAttention-3's
`flash_attn_interface` (its Hopper build) on sm_90, else FlashAttention-2's `flash_attn` on sm_80 and newer.

An anchor and a fallback, not vkern's product (DESIGN.md): auto ranks it after the backends measured on the H200
(vkern's kernels and cuDNN); `backend="flash_attn"` or VKERN_ATTENTION_BACKEND=flash_attn prefers it, and
`python -m bench.bench --op attention --providers flash-attn` measures it. vkern hands it unmasked calls only (a
key-padding mask would need its varlen form's packed keys). Both versions take [B, S, H, D] tensors, vkern's layout,
and return the natural-log lse as [B, H, Sq] fp32 with `return_attn_probs=True`.
"""
import functools
import importlib
import inspect

import torch

# (module, the compute capabilities its kernels run on)
IMPLEMENTATIONS = (("flash_attn_interface", lambda cc: cc == (9, 0)), ("flash_attn", lambda cc: cc >= (8, 0)))
MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=None)
def _load(module):
    """flash_attn_func of `module`, or why it cannot be used."""
    try:
        fn = getattr(importlib.import_module(module), "flash_attn_func", None)
    except Exception as e:  # not installed, or a build whose CUDA library does not load
        return f"{module}: {type(e).__name__}: {e}"
    return fn if callable(fn) else f"{module} has no flash_attn_func"


def implementation(device):
    """(module name, flash_attn_func) for a CUDA `device`, or (None, why none can run there)."""
    loaded = {module: _load(module) for module, _ in IMPLEMENTATIONS}
    why = [fn for fn in loaded.values() if isinstance(fn, str) and "ModuleNotFoundError" not in fn]
    if all(isinstance(fn, str) for fn in loaded.values()):
        return None, "; ".join(why) or "flash-attn is not installed"
    if not torch.cuda.is_available():
        return None, "CUDA is not available"
    cc = torch.cuda.get_device_capability(device)
    for module, runs_on in IMPLEMENTATIONS:
        if isinstance(loaded[module], str):
            continue
        if runs_on(cc):
            return module, loaded[module]
        why.append(f"{module} does not run on sm_{cc[0]}{cc[1]}")
    return None, "; ".join(why)


def reason(device, dtype, head_dim, v_head_dim, masked, kv_len=None):
    """None if flash-attn can take an attention call, else why not."""
    if device.type != "cuda":
        return f"needs a CUDA tensor (got {device.type})"
    module, fn = implementation(device)
    if module is None:
        return fn
    if dtype not in (torch.float16, torch.bfloat16):
        return f"no {dtype} kernel in flash-attn"
    if v_head_dim != head_dim or head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return f"head dims {head_dim}/{v_head_dim} (flash-attn here: equal, a multiple of 8, at most {MAX_HEAD_DIM})"
    if masked:
        return "a mask (vkern passes flash-attn unmasked calls only)"
    return "no keys" if kv_len == 0 else None


def attention(q, k, v, scale, return_lse):
    """out [B, Sq, H, D] in q's dtype and lse fp32 [B, H, Sq] (None without return_lse); scale > 0 or None."""
    module, fn = implementation(q.device)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kwargs = {"return_attn_probs": return_lse} if _takes_return_flag(fn) else {}  # (FA3's first release: no flag)
    result = fn(q, k, v, softmax_scale=scale, causal=False, **kwargs)
    tuple_ = isinstance(result, (tuple, list))  # versions differ: out, (out, lse) or (out, lse, S_dmask)
    out = result[0] if tuple_ else result
    if return_lse and not (tuple_ and len(result) > 1):
        raise RuntimeError(f"{module}.flash_attn_func returned no lse (an untested flash-attn version?)")
    lse = result[1] if return_lse else None
    B, Sq, H, _ = q.shape
    if lse is not None and (lse.shape != (B, H, Sq) or lse.dtype != torch.float32):
        raise RuntimeError(f"{module}.flash_attn_func returned lse {tuple(lse.shape)} {lse.dtype}; vkern expects "
                           f"{(B, H, Sq)} float32 (an untested flash-attn version?)")
    return out, lse


@functools.lru_cache(maxsize=None)
def _takes_return_flag(fn):
    try:
        return "return_attn_probs" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a compiled function): the documented API has the flag
        return True
