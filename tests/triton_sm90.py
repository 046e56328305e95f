"""Compile for sm_90, without a GPU, every Triton launch the CPU tests make.

The CPU tests run vkern's Triton kernels in Triton's interpreter, which accepts code the compiler rejects (and
skips the constexpr branches a GPU takes). `record()` notes each interpreted launch as the GPU runtime would
specialize it (argument types, 16-byte divisibility, constexprs, num_warps / num_stages); `compile_all()`
compiles each distinct one for sm_90 in a fresh process (no interpreter there), through ptxas, as a GPU launch
would. Interpreter-only switches (EMULATE_RNE, UPCAST, INTERPRET) are compiled as the GPU sets them (off), and
an autotuned kernel's launches in its GPU configs, in turn.
"""
import collections
import importlib
import inspect
import json
import os
import subprocess
import sys

# The constexprs vkern sets from interpreting(): a GPU launch has them off.
INTERPRETER_SWITCHES = ("EMULATE_RNE", "UPCAST", "INTERPRET")
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

_recorded = {}  # key -> spec, in launch order


def _is_constexpr(param):
    annotation = param.annotation
    return annotation is not inspect.Parameter.empty and "constexpr" in str(annotation)


def spec_of(fn, args, kwargs):
    """The launch's specialization as Triton's JIT computes it: {module, name, signature, constexprs, attrs,
    options}, JSON-able."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args))
    bound.update((k, v) for k, v in kwargs.items() if k in params)
    for name, param in params.items():
        if name not in bound and param.default is not inspect.Parameter.empty:
            bound[name] = param.default
    signature, constexprs, attrs = {}, {}, {}
    for name, param in params.items():
        value = bound[name]
        if _is_constexpr(param):
            kind, spec = "constexpr", value
        else:
            kind, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = False if name in INTERPRETER_SWITCHES else _jsonable(spec)
        elif isinstance(spec, str) and spec:
            attrs[name] = spec
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    return dict(module=fn.__module__, name=fn.__name__, signature=signature, constexprs=constexprs, attrs=attrs,
                options=options)


def _jsonable(value):
    """A constexpr as JSON can carry it: a Triton dtype (a rounding target) as {"dtype": its name}, restored by
    _constexpr (json's default=str would hand the compiler the string "bf16")."""
    import triton.language as tl

    return {"dtype": value.name} if isinstance(value, tl.dtype) else value


def _constexpr(value):
    import triton.language as tl

    return tl.dtype(value["dtype"]) if isinstance(value, dict) and set(value) == {"dtype"} else value


def record():
    """From now on, note every launch of a vkern Triton kernel in the interpreter (idempotent)."""
    from triton.runtime.interpreter import InterpretedFunction

    if getattr(InterpretedFunction.run, "_vkern_recording", False):
        return
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__.startswith("vkern."):
            spec = spec_of(self.fn, args, kwargs)
            # one compile per kernel, types, constexprs and options; of the launches that differ only in 16-byte
            # divisibility, the most divisible (what large real shapes see, the vectorized code)
            key = json.dumps({k: v for k, v in spec.items() if k != "attrs"}, sort_keys=True, default=str)
            if key not in _recorded or len(spec["attrs"]) > len(_recorded[key]["attrs"]):
                _recorded[key] = spec
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    run._vkern_recording = True
    InterpretedFunction.run = run


def recorded():
    return list(_recorded.values())


def _gpu_variant(spec):
    """spec, or, when a module-level triton.autotune wraps the kernel, spec in one of its GPU configs: the
    spec["turn"]-th, so that the launches of a kernel go through its configs in turn (each config compiled, without
    compiling every launch in every config)."""
    import triton

    module = importlib.import_module(spec["module"])
    for value in vars(module).values():
        if isinstance(value, triton.runtime.Autotuner) and value.fn.__name__ == spec["name"]:
            config = value.configs[spec["turn"] % len(value.configs)]
            return dict(spec, constexprs={**spec["constexprs"], **config.kwargs},
                        options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return spec


def _compile(spec):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["name"])  # (a module-level triton.jit function)
    names = list(spec["signature"])
    attrs = {(names.index(n),): CUDABackend.parse_attr(s) for n, s in spec["attrs"].items()}
    constexprs = {k: _constexpr(v) for k, v in spec["constexprs"].items()}
    source = ASTSource(fn=fn, signature=spec["signature"], constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=spec["options"])
    assert compiled.asm.get("cubin"), "no cubin"
    return compiled.metadata.shared


def _worker(specs_path):
    """In a process without the interpreter: compile each spec's GPU variants; print one JSON line each."""
    with open(specs_path) as f:
        specs = json.load(f)
    for spec in specs:
        variant = _gpu_variant(spec)
        try:
            shared = _compile(variant)
            result = dict(ok=True, shared=shared)
        except Exception as err:  # reported per launch, with the compiler's message
            result = dict(ok=False, error=f"{type(err).__name__}: {str(err)[-2000:]}")
        print(json.dumps(dict(variant, **result), default=str), flush=True)


def compile_all(specs, tmp_path, timeout=3600):
    """Compile specs for sm_90 in fresh processes, one per CPU core; returns one result dict per spec."""
    turns, numbered = collections.Counter(), []
    for spec in specs:  # the n-th launch of a kernel takes its n-th autotune config (_gpu_variant)
        numbered.append(dict(spec, turn=turns[spec["name"]]))
        turns[spec["name"]] += 1
    specs = numbered
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workers = max(1, min(len(specs), os.cpu_count() or 1))
    running = []
    for i in range(workers):
        path = os.path.join(tmp_path, f"triton_specs_{i}.json")
        with open(path, "w") as f:
            json.dump(specs[i::workers], f, default=str)
        running.append(subprocess.Popen(
            [sys.executable, "-c", f"from tests.triton_sm90 import _worker; _worker({path!r})"], cwd=root, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for process in running:
        out, err = process.communicate(timeout=timeout)
        if process.returncode != 0:
            raise RuntimeError(f"an sm_90 compile process failed:\n{err[-4000:]}")
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results
