"""Host (CPU) time per call: what a launch-bound step pays for each op, kernels being too small to hide it.

Per op at a tiny shape (the GPU finishes each kernel long before the host enqueues the next): vkern's block glue
through vkern.ops (custom op + checks + Triton launch), the same Triton wrapper called directly (no custom-op
dispatch), and diffusers' eager expressions for the same math. Then a tiny model's step per provider (host enqueue
time, kernels negligible), and optionally a cProfile of the fused step (--profile).

    python -m bench.host_overhead --out rows.jsonl [--family ltx2] [--profile]
"""
import argparse
import cProfile
import json
import pstats
import time

import torch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(fn, calls=500):
    """Median over 5 rounds of the host time per call (no synchronization inside a round)."""
    for _ in range(3):
        fn()
    rounds = []
    for _ in range(5):
        _sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append(1e6 * (time.perf_counter() - start) / calls)
    _sync()
    return sorted(rounds)[2]


def op_rows(device, calls, tokens=128, dim=2048):
    from vkern import ops
    from vkern.ops import block_glue
    from vkern.triton import block_glue as tri

    bf16 = dict(dtype=torch.bfloat16, device=device)
    x, y = torch.randn(1, tokens, dim, **bf16), torch.randn(1, tokens, dim, **bf16)
    temb = torch.randn(1, 1, 6, dim, **bf16)
    table = torch.randn(6, dim, **bf16)
    shift, scale, gate = temb[:, :, 0], temb[:, :, 1], temb[:, :, 2]
    eps = 1e-6
    rounding = block_glue.norm_rounding(x, scale, table[1], True)
    out = torch.empty_like(x)
    grounding = block_glue.gate_rounding(x, y, gate, table[2], True)
    cases = {
        "vkern.ops.layernorm_modulate(rms, tables)": lambda: ops.layernorm_modulate(
            x, shift, scale, eps, shift_table=table[0], scale_table=table[1], rms=True, native_dtypes=True),
        "triton wrapper layernorm_modulate": lambda: tri.layernorm_modulate(
            x, shift, scale, eps, None, None, table[0], table[1], out, rounding, True),
        "diffusers rms_norm(x) * (1 + (table + scale)) + (table + shift)": lambda: (
            torch.nn.functional.rms_norm(x, (dim,), eps=eps) * (1 + (table[1] + scale)) + (table[0] + shift)),
        "vkern.ops.gate_residual_(tables)": lambda: ops.gate_residual_(x, y, gate, table[2], native_dtypes=True),
        "triton wrapper gate_residual": lambda: tri.gate_residual(x, y, gate, table[2], x, grounding),
        "diffusers x + y * (table + gate)": lambda: x + y * (table[2] + gate),
        "aten add (one launch)": lambda: x + y,
    }
    return [dict(op="host-overhead", case=name, host_us=round(host_us(fn, calls), 2)) for name, fn in cases.items()]


def triton_rows(device, calls, tokens=128, dim=2048):
    """Where a Triton launch's host time goes (triton 3.6's JITFunction.run), for the gate + residual kernel: the
    whole launch, then its parts timed alone (the binder that specializes the arguments, the cache key, the current
    device and stream, the knobs it reads), and the compiled kernel launched directly with its bound arguments."""
    import triton
    from triton import knobs
    from triton.runtime import driver, jit

    from vkern.ops import block_glue
    from vkern.triton import block_glue as tri

    bf16 = dict(dtype=torch.bfloat16, device=device)
    x, y = torch.randn(1, tokens, dim, **bf16), torch.randn(1, tokens, dim, **bf16)
    gate, table = torch.randn(1, 1, dim, **bf16), torch.randn(dim, **bf16)
    rounding = block_glue.gate_rounding(x, y, gate, table, True)
    block, warps = tri._launch_config(dim)
    mod_dt, prod_dt, out_dt = (tri._TL[d] for d in rounding)
    args = (x, y, gate, table, x, tokens, x.stride(0), x.stride(1), y.stride(0), y.stride(1), 0, 0, x.stride(0),
            x.stride(1), 0.0)
    kw = dict(D=dim, BLOCK=block, HAS_TABLE=True, EMULATE_RNE=False, RMS_Y=False, MOD_DT=mod_dt, PROD_DT=prod_dt,
              OUT_DT=out_dt, num_warps=warps, enable_fp_fusion=False)
    kernel = tri._gate_residual_kernel
    compiled = kernel[(tokens,)](*args, **kw)
    dev = driver.active.get_current_device()
    binder = kernel.device_caches[dev][4]
    bkw = dict(kw, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, spec, opts = binder(*args, **bkw)
    key_cache = {}
    stream = driver.active.get_current_stream(dev)
    direct = compiled[(tokens, 1, 1)]
    values = list(bound.values())
    try:
        from vkern.triton._launch import FastLaunch
    except ImportError:  # a tree from before it (bench/tree_ab.sh's "old")
        FastLaunch = None
    cases = {
        "triton: wrapper (vkern.triton.block_glue.gate_residual)": lambda: tri.gate_residual(x, y, gate, table, x,
                                                                                             rounding),
        "triton: kernel[grid](...)": lambda: kernel[(tokens,)](*args, **kw),
        "triton: binder (argument specialization)": lambda: binder(*args, **bkw),
        "triton: compute_cache_key": lambda: jit.compute_cache_key(key_cache, spec, opts),
        "triton: current device + stream": lambda: driver.active.get_current_stream(driver.active.get_current_device()),
        "triton: knobs read (debug, instrumentation, 2 hooks)": lambda: (
            knobs.runtime.debug, knobs.compilation.instrumentation_mode, knobs.runtime.launch_enter_hook,
            knobs.runtime.launch_exit_hook),
        "triton: compiled[grid](*bound, stream=...)": lambda: direct(*values, stream=stream),
        "triton: compiled.run(...) alone": lambda: compiled.run(tokens, 1, 1, stream, compiled.function,
                                                               compiled.packed_metadata, None, None, None, *values),
    }
    if FastLaunch is not None:
        fast = FastLaunch(kernel)
        cases["triton: vkern.triton._launch.FastLaunch"] = lambda: fast((tokens,), *args, **kw)
    return [dict(op="host-overhead", case=name, host_us=round(host_us(fn, calls), 2), triton=triton.__version__)
            for name, fn in cases.items()]


def step_rows(family, device, profile, calls):
    import vkern

    from .bench import _step_models, vkern_config

    rows = []
    build, inputs_for = _step_models()[family]
    for provider in ("diffusers", "vkern-diffusers-blocks", "vkern-fused-blocks"):
        torch.manual_seed(0)
        model = build("tiny", torch.bfloat16, device)
        if provider != "diffusers":
            vkern.patch(model, vkern_config(provider)[0])
        inputs = inputs_for(model, "tiny", torch.bfloat16, device)

        def step():
            with torch.inference_mode():
                model(**inputs)

        ms = host_us(step, calls) / 1e3
        rows.append(dict(op="host-overhead", case=f"{family}-tiny step", provider=provider, host_ms=round(ms, 3),
                         blocks=len(model.transformer_blocks)))
        if profile and provider == "vkern-fused-blocks":
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(10):
                step()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="ltx2")
    parser.add_argument("--profile", action="store_true", help="cProfile the fused tiny step (top 30 by own time)")
    parser.add_argument("--calls", type=int, default=500, help="calls per timed round of each op")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only checks that the script runs")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    from .bench import _commit

    device = torch.device(args.device)
    rows = op_rows(device, args.calls) + (triton_rows(device, args.calls) if device.type == "cuda" else [])
    rows += step_rows(args.family, device, args.profile, max(2, args.calls // 25))
    meta = dict(gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
                commit=_commit())
    for r in rows:
        print(r)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, **meta}) + "\n")


if __name__ == "__main__":
    main()
