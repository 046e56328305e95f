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
    if _op_env(op):  # choose() raises for it
        return f"{forced} (forced, unknown: expected one of {list(cands)})"
    return next((n for n, r in cands.items() if r is None), "none")


def registered_ops():
    return list(_candidates)


class BackendError(RuntimeError):
    pass


def _env_reader():
    """os.environ.get, read live on every call but cheaper: each op call reads these variables, and the public
    mapping encodes and decodes its key and value each time (~1.3 us a read, more than some kernels take to run)."""
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or not isinstance(data, dict):
        return os.environ.get
    encoded = {}

    def get(name):
        key = encoded.get(name)
        if key is None:
            key = encoded[name] = os.fsencode(name)
        value = data.get(key)
        return None if value is None else os.fsdecode(value)
    return get


_getenv = _env_reader()
_op_variable = {}  # op -> "VKERN_<OP>_BACKEND"


def _op_env(op):
    name = _op_variable.get(op)
    if name is None:
        name = _op_variable[op] = f"VKERN_{op.upper()}_BACKEND"
    return _getenv(name)


def forced_backend(op):
    return _op_env(op) or _getenv("VKERN_BACKEND")


_backend_names = {}  # tuple of the registered ops -> every backend name they offer


def _all_backend_names():
    import torch

    key = tuple(_candidates)
    if key not in _backend_names:
        _backend_names[key] = {name for fn in _candidates.values() for name in fn(torch.device("cpu"), torch.bfloat16)}
    return _backend_names[key]


def choose(op, candidates):
    """candidates: ordered dict name -> None (usable) or a reason string. Returns a name."""
    own, every = _op_env(op), _getenv("VKERN_BACKEND")
    forced = own or every
    if every and not own and every not in _all_backend_names():  # a typo would otherwise be ignored
        raise BackendError(f"VKERN_BACKEND={every!r}: no op has that backend; expected one of "
                           f"{sorted(_all_backend_names())}")
    if forced:
        if forced in candidates:
            if candidates[forced] is not None:
                raise BackendError(f"vkern.ops.{op}: backend {forced!r} forced by the environment cannot run "
                                   f"this call: {candidates[forced]}")
            last_choice[op] = forced
            return forced
        if own:
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


_triton_missing = []  # [why not] once the import was tried: an import per call costs more than a small kernel


def cudnn_conv_tf32():
    """Whether torch runs cuDNN's fp32 convs in TF32 (its default, and what diffusers' fp32 VAE convs compute): the
    first setting of torch.backends.cudnn.conv.fp32_precision, cudnn.fp32_precision, backends.fp32_precision that is
    not "none" ("none" at every level: IEEE), or cudnn.allow_tf32 on a torch without them."""
    import torch

    cudnn = torch.backends.cudnn
    if not hasattr(cudnn, "conv"):
        return bool(cudnn.allow_tf32)
    levels = (cudnn.conv.fp32_precision, getattr(cudnn, "fp32_precision", "none"),
              getattr(torch.backends, "fp32_precision", "none"))
    return next((p for p in levels if p != "none"), "ieee") == "tf32"


def triton_usable(device):
    """None if Triton kernels can run on tensors on `device`, else why not."""
    if not _triton_missing:
        try:
            import triton  # noqa: F401
            _triton_missing.append(None)
        except ImportError:
            _triton_missing.append("triton is not installed")
    if _triton_missing[0] is not None:
        return _triton_missing[0]
    if device.type == "cuda":
        return None
    if _getenv("TRITON_INTERPRET") == "1":
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
    return _getenv("TRITON_INTERPRET") == "1"
