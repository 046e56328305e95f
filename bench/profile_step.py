"""Where one transformer step's time goes (Wan's, or another family's: --family): torch.profiler over one step per
provider, kernel time by class (attention / GEMM / elementwise+norm+copy / other), JSON rows (op "profile") and a
markdown table.

    python -m bench.profile_step --size 14b --res 480p --out rows.jsonl
    python -m bench.profile_step --family ltx --size 2b --res 512p --providers diffusers,vkern
    python -m bench.profile_step --size tiny --device cpu          # CI: CPU ops instead of CUDA kernels

On a GPU the classes sum CUDA kernel (and memcpy/memset) time; on the CPU they sum the self CPU time
of the profiled ops (vkern's Triton kernels run interpreted inside their custom ops there), so CPU
numbers only show that the classification and the rows work. Models are built as bench.bench's step
benchmark builds them (same seed, same PatchConfig per provider).
"""
import argparse
import collections
import datetime
import gc
import json
import re
import time

import torch

from .timing import param_bytes

CLASSES = ("attention", "gemm", "elementwise", "other")
# First match wins. Names seen: cuDNN "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_...",
# FA2 "flash_fwd_kernel<...>", mem-efficient "fmha_cutlassF_...", cuBLAS "nvjet_tst_...",
# "sm90_xmma_gemm_...", cuBLASLt fp8 "sm90_xmma_gemm_e4m3...", "cutlass3x_sm90_..."; torch
# "vectorized_elementwise_kernel<...>", "reduce_kernel", "Memcpy DtoD"; vkern's Triton kernels
# ("_layernorm_modulate_kernel", "_qk_norm_rope_kernel", ...) and CUDA kernels ("fp8_quantize_rowwise...");
# on the CPU, op names such as "aten::addmm", "vkern::attention", "vkern::layernorm_modulate".
PATTERNS = (
    ("attention", r"attention|sdpa|flash|fmha|attn_fwd"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|wgmma|scaled_mm|matmul|linear|convolution|conv\d|(^|::|_)(add|b)?mm($|_|\b)"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|norm|copy|memcpy|memset|cat|fill|gelu|silu|"
                    r"add|mul|sub|div|quant|cast|rowwise|fp8|transpose|permute|rope|modulate|gate_residual|triton|where|index|clone|_to|"
                    r"contiguous|convert|exp|pow|rsqrt|sqrt|cos|sin|neg|clamp|amax|abs|view_as|float"),
)


def classify(name):
    lower = name.lower()
    for cls, pattern in PATTERNS:
        if re.search(pattern, lower):
            return cls
    return "other"


def shape_name(size, res, family="wan"):
    return f"{family}-tiny" if size == "tiny" else f"{family}{size}-{res}"


def build(size, provider, device, dtype, family="wan"):
    """bench.bench's step models (family: a key of its _step_models()), on any device: a fresh seeded model, patched
    as `provider` says."""
    import vkern

    from .bench import _step_models, vkern_config

    torch.manual_seed(0)
    model = _step_models()[family][0](size, dtype, device)
    if provider == "diffusers-fp8-layerwise":
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    elif provider.startswith("vkern"):
        # vkern-fp8-compute-unfused: fp8 compute with every Linear quantizing its own input, the path
        # before the LayerNorm/GELU kernels emitted e4m3 (A/B of that fusion in one run)
        config, suffixes = vkern_config(provider, ("-unfused",))
        vkern.patch(model, config)
        if suffixes:
            from vkern.modules.fp8_linear import Fp8Linear

            for m in model.modules():
                if isinstance(m, Fp8Linear):
                    m.accept_prequantized = False
    elif provider != "diffusers":
        raise SystemExit(f"--providers: unknown {provider!r}")
    return model


def device_items(prof, cuda):
    """What a profile spent, as (name, us, launcher) items. On a GPU: every kernel, memcpy and memset,
    with the CPU op that launched it (the innermost profiled op; None when none was open, e.g. a Triton
    kernel launched straight from Python); its `cpu_parent` chain holds the enclosing ops and
    record_function ranges. On the CPU: every op's self CPU time, the op being its own launcher."""
    events = list(prof.events())
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    if not cuda:
        for e in cpu:
            if e.self_cpu_time_total > 0:
                yield e.key, e.self_cpu_time_total, e
        return
    # Kernels hang off their launching op (FunctionEvent.kernels); device events carry name and time.
    # Pair them by (name, duration): a kernel no op claims keeps launcher None.
    launchers = {}
    for e in sorted(cpu, key=lambda e: e.time_range.start):  # both in launch order: pair first to first
        for k in e.kernels:
            launchers.setdefault((k.name, k.duration), collections.deque()).append(e)
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in sorted(device, key=lambda e: e.time_range.start):
        us = e.time_range.elapsed_us()
        if us <= 0:
            continue
        owners = launchers.get((e.key, us))
        yield e.key, us, owners.popleft() if owners else None


def summarize(items, classify_item, classes, top_n=10):
    """({class: ms}, the top_n names by time as [{ms, count, cls, name}]) of device_items' items;
    classify_item(name, launcher) -> one of classes."""
    per_class = dict.fromkeys(classes, 0.0)
    by_name = {}
    for name, us, launcher in items:
        cls = classify_item(name, launcher)
        per_class[cls] += us / 1e3
        ms, count, _ = by_name.get(name, (0.0, 0, cls))
        by_name[name] = (ms + us / 1e3, count + 1, cls)
    top = sorted(((ms, n, c, name) for name, (ms, n, c) in by_name.items()), reverse=True)[:top_n]
    return per_class, [dict(ms=round(ms, 3), count=n, cls=c, name=name[:120]) for ms, n, c, name in top]


def profile_step(model, inputs, device):
    """One warm step, three timed (median host enqueue and wall ms), then one profiled step: {class: ms}, the biggest
    kernels/ops, and the times."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"

    def step():
        with torch.inference_mode():
            model(**inputs)
        if cuda:
            torch.cuda.synchronize()

    step()  # Triton compilation, cuBLAS heuristics, allocator warm-up
    # Host time to enqueue one step vs its wall time: equal means the GPU waited on Python (launch-bound).
    host_ms, wall_ms = [], []
    for _ in range(3):
        start = time.perf_counter()
        with torch.inference_mode():
            model(**inputs)
        host_ms.append(1e3 * (time.perf_counter() - start))
        if cuda:
            torch.cuda.synchronize()
        wall_ms.append(1e3 * (time.perf_counter() - start))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
    per_class, top = summarize(device_items(prof, cuda), lambda name, _: classify(name), CLASSES)
    return per_class, top, dict(host_ms=sorted(host_ms)[1], wall_ms=sorted(wall_ms)[1])


def run(size, res, providers, device, dtype=torch.bfloat16, family="wan"):
    from .bench import _step_models

    rows = []
    for provider in providers:
        model = build(size, provider, device, dtype, family)
        inputs = _step_models()[family][1](model, res if size != "tiny" else "tiny", dtype, device)
        per_class, top, times = profile_step(model, inputs, device)
        total = sum(per_class.values())
        rows.append(dict(op="profile", shape=shape_name(size, res, family), provider=provider, world=1,
                         **{f"{c}_ms": per_class[c] for c in CLASSES}, total_ms=total,
                         param_gib=param_bytes(model) / 2**30, **times,
                         timer="cuda-kernels" if device.type == "cuda" else "cpu-self", top=top))
        del model, inputs
        gc.collect()  # the patch handle and the model refer to each other
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(header, lines):
    """A markdown table from a header row and rows of cells."""
    return "\n".join("| " + " | ".join(map(str, cells)) + " |"
                     for cells in [header, ["---"] * len(header), *lines])


def table(rows):
    """Markdown: ms per class, and each provider's elementwise time against the first provider's."""
    base = rows[0]["elementwise_ms"] if rows else 0.0
    header = [rows[0]["shape"] if rows else "", "attention", "GEMM", "elementwise+norm+copy", "other", "total",
              f"elementwise vs {rows[0]['provider'] if rows else ''}", "weights GiB (param_gib)"]
    lines = []
    for r in rows:
        cut = f"{r['elementwise_ms'] / base:.2f}x ({100 * (1 - r['elementwise_ms'] / base):.0f}% less)" if base > 0 else "-"
        lines.append([r["provider"], *(f"{r[f'{c}_ms']:.1f} ms" for c in CLASSES), f"{r['total_ms']:.1f} ms", cut,
                      f"{r['param_gib']:.3f}"])
    return markdown(header, lines)


def save_rows(rows, device, out=None):
    """rows with the run's GPU, torch version, commit and date added; appended to `out` as JSON lines."""
    from .bench import _commit

    meta = dict(gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
                commit=_commit(), date=datetime.date.today().isoformat())
    rows = [{**r, **meta} for r in rows]
    if out:
        with open(out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return rows


def cli_device(requested, option, value):
    """The device a profiling CLI runs on: --device, else CUDA when there is one; the CPU only for the
    tiny config (`option` names the CLI's size option, `value` its value)."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and value != "tiny":
        raise SystemExit(f"{option} {value} needs a CUDA GPU (on the CPU: {option} tiny)")
    return device


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="wan", choices=["wan", "hunyuan", "hunyuan15", "cogvideox", "ltx", "ltx2",
                                                            "mochi"])
    parser.add_argument("--size", default="14b", help="tiny, or the family's (bench/shapes.py STEPS): Wan 1.3b, 14b")
    parser.add_argument("--res", default="480p", help="480p, 720p (Wan); the family's (bench/shapes.py STEPS)")
    parser.add_argument("--providers", default="diffusers,vkern,vkern-fp8-compute-unfused,vkern-fp8-compute",
                        help="comma-separated: diffusers, diffusers-fp8-layerwise, vkern, vkern-chunked, "
                             "vkern-fp8-storage, vkern-fp8-compute, vkern-fp8-compute-unfused")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (tiny only)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    device = cli_device(args.device, "--size", args.size)
    rows = save_rows(run(args.size, args.res, args.providers.split(","), device, family=args.family), device,
                     args.out)
    for r in rows:
        print(f"{r['provider']}: step wall {r['wall_ms']:.1f} ms, host enqueue {r['host_ms']:.1f} ms, kernels "
              f"{r['total_ms']:.1f} ms")
        print(f"{r['provider']}: top kernels " + "; ".join(f"{t['ms']} ms {t['cls']} {t['name'][:60]}" for t in r["top"][:5]))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
