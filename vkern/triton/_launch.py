"""Triton launches with less host work: for the small elementwise kernels a launch-bound step calls thousands of
times (the block glue), the host time of JITFunction.run is longer than the kernel.

JITFunction.run, on every launch (triton 3.6): reads the knobs, binds every argument into a dict, specializes each
one, builds the cache key (a tuple of the specialization and str() of the options), checks the kernel's globals and
asks for launch metadata; then the compiled kernel's C launcher runs. FastLaunch keeps the compiled kernel per key
and calls that launcher directly. The key is the current device, the caller's constexprs and options, and Triton's
own specialization of each runtime argument (triton's native_specialize_impl with each parameter's flags: a
pointer's dtype and 16-byte alignment, an integer's width, == 1, divisibility by 16), so a launch never runs a
kernel compiled for other arguments. A key seen for the first time goes through JITFunction.run (which compiles or
finds the kernel, and launches it).

JITFunction.run runs instead: in the interpreter, under a Triton other than the one this was written against, for a
kernel whose runtime parameters do not all come before its constexprs, and while a launch hook is installed (the
profilers' hooks see every launch as before).
"""
import triton

_SUPPORTED = triton.__version__.startswith("3.6.")  # the internals used below (JITFunction.device_caches, the
# CompiledKernel.run signature, native_specialize_impl) as of triton 3.6


class FastLaunch:
    """FastLaunch(kernel)(grid, *runtime_args, **constexprs_and_options): kernel[grid](*runtime_args,
    **constexprs_and_options), the same kernel launched the same way."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled = {}
        self._plan = _plan(kernel) if _SUPPORTED else None

    def __call__(self, grid, *args, **kwargs):
        plan = self._plan
        if plan is None or _interpreting() or _hooked(knobs.runtime.launch_enter_hook) \
                or _hooked(knobs.runtime.launch_exit_hook) or len(args) != len(plan.flags):
            return self.kernel[grid](*args, **kwargs)
        constexprs = [kwargs.get(n, _MISSING) for n in plan.constexprs]
        if _MISSING in constexprs:  # one left to its default: let JITFunction.run bind it
            return self.kernel[grid](*args, **kwargs)
        device = driver.active.get_current_device()
        backend = self.kernel.device_caches[device][3]
        # JITFunction.run's key: these, and the two knobs it adds to the options
        key = (device, knobs.runtime.debug, knobs.compilation.instrumentation_mode, *kwargs.items(),
               *[specialize(backend, a, *f) for a, f in zip(args, plan.flags)])
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if compiled is not None:
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
    def __init__(self, flags, constexprs):
        self.flags, self.constexprs = flags, constexprs


def _plan(kernel):
    """(is_const, specialize, align) of each runtime parameter, and the constexprs' names in order; None if a
    constexpr comes before a runtime parameter (the bound arguments could not be passed as args + constexprs)."""
    params = getattr(kernel, "params", None)  # (the interpreter's kernels have none)
    if params is None:
        return None
    runtime = [p for p in params if not p.is_constexpr]
    if any(p.is_constexpr for p in params[:len(runtime)]):
        return None
    return _Plan([(p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment) for p in runtime],
                 [p.name for p in params[len(runtime):]])


def _hooked(hook):
    # triton 3.6 keeps the hooks in a HookChain (never None; hooked when its list of calls is not empty)
    return getattr(hook, "calls", hook)


def _interpreting():
    from ..ops._backend import interpreting

    return interpreting()


if _SUPPORTED:
    from triton import knobs
    from triton._C.libtriton import native_specialize_impl as specialize
    from triton.runtime import driver
