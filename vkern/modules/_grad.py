"""One test for "this call builds an autograd graph", shared by every fused path that has no backward and so hands
the call to diffusers' own forward (or refuses it) when it does."""
import torch


def records_autograd(module, *tensors):
    """Grad mode is on and a parameter of `module` or one of `tensors` (None skipped) requires grad."""
    return torch.is_grad_enabled() and (any(t is not None and t.requires_grad for t in tensors) or
                                        any(p.requires_grad for p in module.parameters()))
