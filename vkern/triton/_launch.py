"""Triton launches with less host work: for the small elementwise kernels a launch-bound step calls thousands of
times (the block glue), the host time of JITFunction.run is longer than the kernel.

JITFunction.run, on every launch (triton 3.6): reads the knobs, binds every argument into a dict, specializes each
one, builds the cache key (a tuple of the specialization and str() of the options), checks the kernel's globals and
builds launch metadata for the (empty) hook chains; then the compiled kernel's C launcher runs. FastLaunch keeps the
compiled kernel per key and calls that launcher directly. The key is finer than Triton's own: the current device,
the two knobs Triton adds to the options, the caller's constexprs and options, each tensor argument's dtype and
16-byte alignment (all Triton specializes a pointer on), and every other argument's type and value (Triton keeps only
an integer's width, == 1 and divisibility by 16). So one key never spans two of Triton's specializations: a launch
never runs a kernel compiled for other arguments. A key seen for the first time goes through JITFunction.run (which
compiles or finds the kernel, and launches it).

JITFunction.run runs instead: in the interpreter, under a Triton other than the one this was written against, for a
kernel whose runtime parameters do not all come before its constexprs, and while a launch hook is installed (the
profilers' hooks see every launch as before).
"""
import torch
import triton

_SUPPORTED = triton.__version__.startswith("3.6.")  # the internals used below (the CompiledKernel.run signature,
# the knobs JITFunction.run adds to its key, the hook chains) as of triton 3.6
_MAX_KEYS = 4096  # per kernel; past it the cache starts over (a key per distinct shape and stride set)


class FastLaunch:
    """FastLaunch(kernel)(grid, *runtime_args, **constexprs_and_options): kernel[grid](*runtime_args,
    **constexprs_and_options), the same kernel launched the same way."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled = {}
        self._plan = _plan(kernel) if _SUPPORTED else None  # None for the interpreter's kernels too

    def __call__(self, grid, *args, **kwargs):
        plan = self._plan
        if plan is None or len(args) != plan.runtime or _hooked(knobs.runtime.launch_enter_hook) \
                or _hooked(knobs.runtime.launch_exit_hook):
            return self.kernel[grid](*args, **kwargs)
        constexprs = [kwargs.get(n, _MISSING) for n in plan.constexprs]
        if _MISSING in constexprs:  # one left to its default: let JITFunction.run bind it
            return self.kernel[grid](*args, **kwargs)
        device = driver.active.get_current_device()
        # (an int as itself; any other scalar with its type: 1 == 1.0 == True, but Triton types them apart)
        key = (device, knobs.runtime.debug, knobs.compilation.instrumentation_mode, *kwargs.items(),
               *[(a.dtype, not a.data_ptr() & 15) if isinstance(a, torch.Tensor) else a if type(a) is int
                 else (type(a), a) for a in args])
        try:
            compiled = self._compiled.get(key)
        except TypeError:  # an unhashable argument (none of vkern's kernels takes one)
            return self.kernel[grid](*args, **kwargs)
        if compiled is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if compiled is not None:
                if len(self._compiled) >= _MAX_KEYS:
                    self._compiled.clear()
                self._compiled[key] = compiled.result() if hasattr(compiled, "result") else compiled
            return compiled
        grid = (*grid, 1, 1)
        compiled.run(grid[0], grid[1], grid[2], driver.active.get_current_stream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *constexprs)
        return compiled


_MISSING = object()


class fast_launchers(dict):
    """kernel -> FastLaunch(kernel), made on first use: `launchers[kernel](grid, *args, **kwargs)`."""

    def __missing__(self, kernel):
        launch = self[kernel] = FastLaunch(kernel)
        return launch


class _Plan:
    def __init__(self, runtime, constexprs):
        self.runtime, self.constexprs = runtime, constexprs


def _plan(kernel):
    """The number of runtime parameters and the constexprs' names in order; None if a constexpr comes before a
    runtime parameter (the bound arguments could not be passed as args + constexprs)."""
    params = getattr(kernel, "params", None)  # (the interpreter's kernels have none)
    if params is None:
        return None
    runtime = sum(not p.is_constexpr for p in params)
    if any(p.is_constexpr for p in params[:runtime]):
        return None
    return _Plan(runtime, [p.name for p in params[runtime:]])


def _hooked(hook):
    # triton 3.6 keeps the hooks in a HookChain (never None; hooked when its list of calls is not empty)
    return getattr(hook, "calls", hook)


if _SUPPORTED:
    from triton import knobs
    from triton.runtime import driver
