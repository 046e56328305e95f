"""torch.library custom ops whose plain eager calls skip the dispatcher.

A call through torch.ops.vkern.* re-enters Python through the dispatcher and torch's custom-op checks: ~120 us of
host time per call on an H100 host (bench/host_overhead.py, run 147), more than the Triton launch itself and more
than the kernel at a small shape. A launch-bound step (LTX-2's audio stream: ~24 glue calls a block on tensors of a
few hundred tokens) pays it on every call. So a plain eager call (real tensors, no grad to record, no compile, no
Python dispatch or torch-function mode, no profiler) runs the function itself; anything else (torch.compile and
export, fake or functional tensors, FlopCounterMode and the like, autograd recording, torch.profiler) goes through the
registered op as before, so tracing, fake kernels, profiles and the "no autograd formula" behaviour are unchanged.
(This generalizes what the VAE's in-place norm and residual ops did on their own before: every vkern op gets it.)
"""
import inspect

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def custom_op(name, mutates_args):
    """torch.library.custom_op(name, mutates_args=...) as a decorator, returning an EagerFastOp."""
    def wrap(fn):
        return EagerFastOp(name, fn, mutates_args)
    return wrap


class EagerFastOp:
    """Call it like the op; register_fake as on torch's CustomOpDef."""

    def __init__(self, name, fn, mutates_args):
        self._fn = fn
        self._def = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        namespace, op = name.split("::")
        self._op = getattr(getattr(torch.ops, namespace), op)
        params = list(inspect.signature(fn).parameters)
        self._mutated = [(params.index(a), a) for a in mutates_args]  # (position, name) of each written tensor

    def register_fake(self, fake):
        return self._def.register_fake(fake)

    def __call__(self, *args, **kwargs):
        if not _plain_eager(args, kwargs):
            return self._op(*args, **kwargs)
        result = self._fn(*args, **kwargs)
        if self._mutated and not torch.is_inference_mode_enabled():  # as the dispatcher's ADInplaceOrView kernel
            for position, name in self._mutated:
                t = args[position] if position < len(args) else kwargs.get(name)
                if t is not None and not t.is_inference():
                    torch.autograd.graph.increment_version(t)
        return result


def _plain_eager(args, kwargs):
    # (under torch.profiler too: the op keeps its name, e.g. vkern::layernorm_modulate, in traces)
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None \
            or torch._C._is_torch_function_mode_enabled() or torch.autograd._profiler_enabled():
        return False
    grad = torch.is_grad_enabled()
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or (grad and a.requires_grad)):
            return False
    return True
