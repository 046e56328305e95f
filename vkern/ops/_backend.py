"""Backend choice for every op: the first usable candidate in order of preference, unless an
environment variable forces one.

    VKERN_<OP>_BACKEND=cuda|triton|sdpa|reference   one op (e.g. VKERN_FP8_QUANTIZE_BACKEND)
    VKERN_BACKEND=reference                          every op that offers it

A candidate is usable when its check returns None; otherwise the check returns why not. Forcing
an unusable backend is an error; falling back from a preferred backend for a reason other than
the device warns once.
"""
import os
import warnings

_warned = set()
last_choice = {}  # op -> backend of the most recent call (shown by vkern.info())
_candidates = {}  # op -> fn(device, dtype) -> ordered {backend: None | reason}


def register(op):
    """Decorator: declare an op's candidates fn(device, dtype) so vkern.info() can say what would run."""
    def wrap(candidates_fn):
        _candidates[op] = candidates_fn
        return candidates_fn
    return wrap


def would_choose(op, device, dtype):
    """(backend, candidates) for a call on `device`/`dtype`, without warnings or side effects."""
    cands = _candidates[op](device, dtype)
    return would_choose_from(op, cands), cands


def would_choose_from(op, cands):
    """The backend choose() would pick among `cands`, without warnings, errors or side effects."""
    forced = forced_backend(op)
    if forced in cands:
        return forced if cands[forced] is None else f"{forced} (forced, unusable)"
    if os.environ.get(f"VKERN_{op.upper()}_BACKEND"):  # choose() raises for it
        return f"{forced} (forced, unknown: expected one of {list(cands)})"
    return next((n for n, r in cands.items() if r is None), "none")


def registered_ops():
    return list(_candidates)


class BackendError(RuntimeError):
    pass


def forced_backend(op):
    return os.environ.get(f"VKERN_{op.upper()}_BACKEND") or os.environ.get("VKERN_BACKEND")


_backend_names = {}  # tuple of the registered ops -> every backend name they offer


def _all_backend_names():
    import torch

    key = tuple(_candidates)
    if key not in _backend_names:
        _backend_names[key] = {name for fn in _candidates.values() for name in fn(torch.device("cpu"), torch.bfloat16)}
    return _backend_names[key]


def choose(op, candidates):
    """candidates: ordered dict name -> None (usable) or a reason string. Returns a name."""
    forced = forced_backend(op)
    every = os.environ.get("VKERN_BACKEND")
    if every and forced == every and every not in _all_backend_names():  # a typo would otherwise be ignored
        raise BackendError(f"VKERN_BACKEND={every!r}: no op has that backend; expected one of "
                           f"{sorted(_all_backend_names())}")
    if forced:
        if forced in candidates:
            if candidates[forced] is not None:
                raise BackendError(f"vkern.ops.{op}: backend {forced!r} forced by the environment cannot run "
                                   f"this call: {candidates[forced]}")
            last_choice[op] = forced
            return forced
        if os.environ.get(f"VKERN_{op.upper()}_BACKEND"):
            raise BackendError(f"VKERN_{op.upper()}_BACKEND={forced!r}: expected one of {list(candidates)}")
    skipped = []
    for name, reason in candidates.items():
        if reason is None:
            if skipped:
                _warn_once(op, skipped, name)
            last_choice[op] = name
            return name
        skipped.append((name, reason))
    raise BackendError(f"vkern.ops.{op}: no backend can run this call: {dict(candidates)}")


def _warn_once(op, skipped, chosen):
    # Only warn when a preferred backend was expected to run here (a CUDA tensor) but could not.
    reasons = [r for _, r in skipped if not r.startswith("needs a CUDA tensor")]
    key = (op, tuple(reasons), chosen)
    if reasons and key not in _warned:
        _warned.add(key)
        what = "the PyTorch reference" if chosen == "reference" else f"backend {chosen!r}"
        warnings.warn(f"vkern.ops.{op}: falling back to {what} ({'; '.join(reasons)})", stacklevel=4)


def triton_usable(device):
    """None if Triton kernels can run on tensors on `device`, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"needs a CUDA tensor (got {device.type}; TRITON_INTERPRET=1 runs Triton on the CPU)"


def cuda_ext_usable(device):
    from .._ext import LOAD_ERROR, cuda_ext

    if device.type != "cuda":
        return f"needs a CUDA tensor (got {device.type})"
    if cuda_ext() is None:
        return f"vkern._C is not built ({LOAD_ERROR})"
    return None


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"
