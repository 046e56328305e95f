"""Whether a module carries hooks that a fused vkern path would bypass: torch's per-module forward
(pre-)hooks (kept in the module's _forward_hooks / _forward_pre_hooks dicts; torch has no public
accessor) and diffusers' hook registry (the _diffusers_hook attribute: offloading, caches)."""


def hooked(m):
    return bool(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_diffusers_hook"))
