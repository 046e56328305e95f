"""Where a Wan VAE decode/encode spends its GPU time: torch.profiler over one call per provider
(diffusers' loop, vkern's), kernel time by class, JSON rows (op "profile-vae-decode" /
"profile-vae-encode") and a markdown table, plus the top kernels.

    python -m bench.profile_vae --res 480p --out rows.jsonl           # H100/H200: ~40 s
    python -m bench.profile_vae --res tiny --device cpu               # CI: CPU ops instead of kernels
    python -m bench.profile_vae --res 480p --ops decode --dtype fp32   # an fp32 VAE (diffusers' examples' dtype)

Classes (first rule that applies):
- other: anything under the mid block's attention (WanAttentionBlock: its norm, 1x1 convs, SDPA);
- conv: cuDNN/cuBLAS compute kernels, and any kernel launched by a convolution op except layout
  transforms (nchwToNhwc/nhwcToNchw, which cuDNN runs around NCDHW bf16 convs: counted as copy);
- norm+silu: vkern's fused kernel, and everything inside diffusers' WanRMS_norm and SiLU modules
  (F.normalize's reduction and division, the fp32 round trips, * scale, * gamma);
- copy+cat+pad: copies, dtype and layout conversions, cat, pad, fill/zero, nearest upsampling, memcpy/memset;
- other elementwise: the rest of the elementwise kernels (residual add, clamp, ...); other: the rest.
Module scopes come from record_function ranges opened by forward hooks on diffusers' modules
(vkern's loop calls WanAttentionBlock as a module too). On the CPU the classes sum the self CPU time
of the profiled ops (vkern's Triton kernel runs interpreted inside its custom op): the CPU run only
shows that the classification and the rows work.

Conv layers (row key conv_layers, one table per row): during the profiled call only, every conv the
loops launch (F.conv3d / F.conv2d, which nn.Conv3d/Conv2d call too, and vkern's conv3d_in_place) runs
inside a range named "vae:conv C->O kKTxKHxKW TxHxW backend" (output frames x H x W; a 2D conv's
first dimension is its images, batch x frames). Per label: the time of every kernel launched inside it
(the conv and whatever its backend adds: cuDNN's layout transforms, weight packing), the calls, and
TFLOP/s from 2 * output elements * C/groups * kernel taps. The mid block's 1x1 attention convs are
listed too (their time is class "other" above).
"""
import argparse
import contextlib
import gc
import math
import re
import time

import torch

from . import profile_step
from .profile_step import cli_device, markdown, save_rows, summarize
from .timing import param_bytes

CLASSES = ("conv", "norm_silu", "copy", "elementwise", "other")
LABELS = {"conv": "conv", "norm_silu": "norm+silu", "copy": "copy+cat+pad", "elementwise": "other elementwise",
          "other": "other"}
SCOPE = "vae:"  # profiler ranges: the hooks' "vae:norm", "vae:attention"; conv_ranges()' "vae:conv <label>"
CONV = SCOPE + "conv "
TOP = 15

# Names seen (cuDNN 9 on sm90): "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_...",
# "cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_...>",
# "cudnn_generated_fort_native_..._conv...", "implicit_convolve_sgemm<...>", "xmma_cudnn::...";
# layout transforms "nchwToNhwcKernel", "nhwcToNchwKernel"; torch "CatArrayBatchedCopy...",
# "direct_copy_kernel_cuda", "upsample_nearest_exact2d_out_frame", "Memcpy DtoD", "Memset (Device)".
LAYOUT = r"nchwtonhwc|nhwctonchw|nchw.*nhwc|nhwc.*nchw|transpose|permute"
CONV_KERNEL = r"fprop|implicit_gemm|implicit_convolve|convolve|conv2d|conv3d|winograd|cudnn|xmma|cutlass|nvjet|gemm"
CONV_OP = r"^aten::(_?convolution|cudnn_convolution.*|conv\dd|mkldnn_convolution|slow_conv.*|_nnpack.*|_slow_conv.*|" \
          r"miopen_convolution|thnn_conv.*)$"
NORM = r"rms_norm|normalize|silu|linalg_vector_norm"
COPY = r"copy|memcpy|memset|fill|zero|cat|pad|upsample|nearest|clone|contiguous|_to_copy|^aten::to$|expand|" \
       r"index|gather|scatter|" + LAYOUT


def scopes(launcher):
    """The op names and hook scopes that enclose a kernel's launcher, innermost first."""
    names = []
    while launcher is not None:
        names.append(launcher.name)
        launcher = launcher.cpu_parent
    return names


def classify(name, launcher=None):
    """One kernel (GPU) or op (CPU) into CLASSES, given the CPU op that launched it (see module doc)."""
    lower = name.lower()
    chain = scopes(launcher)
    if SCOPE + "attention" in chain:
        return "other"
    if re.search(LAYOUT, lower):
        return "copy"
    ops = [n.lower() for n in chain if not n.startswith(SCOPE)]  # the launcher first
    if re.search(CONV_KERNEL, lower) or re.match(CONV_OP, lower):
        return "conv"
    if SCOPE + "norm" in chain or re.search(NORM, lower) or any(re.search(NORM, n) for n in ops):
        return "norm_silu"
    if re.search(COPY, lower) or (ops and re.search(COPY, ops[0])):
        return "copy"
    if any(re.match(CONV_OP, n) for n in ops):  # cuDNN's helper kernels inside a conv op
        return "conv"
    if profile_step.classify(name) == "elementwise" or (ops and profile_step.classify(ops[0]) == "elementwise"):
        return "elementwise"
    return "other"


def _hook_scopes(vae):
    """Forward hooks that open a record_function range around diffusers' norm, SiLU and attention
    modules; returns the hook handles (remove them when done)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanRMS_norm

    kinds = {WanRMS_norm: "norm", torch.nn.SiLU: "norm", WanAttentionBlock: "attention"}
    open_ranges = []
    handles = []

    def enter(label):
        def pre(module, args):
            rf = torch.profiler.record_function(SCOPE + label)
            rf.__enter__()
            open_ranges.append(rf)
        return pre

    def leave(module, args, out):
        open_ranges.pop().__exit__(None, None, None)

    for m in vae.modules():
        label = next((v for k, v in kinds.items() if isinstance(m, k)), None)
        if label:
            handles += [m.register_forward_pre_hook(enter(label)), m.register_forward_hook(leave)]
    return handles


def _range(name):
    """A profiler range that also claims the kernels launched straight from Python inside it (vkern's
    Triton and vkern._C convs): a FUNCTION-scope RecordFunction. torch.profiler.record_function opens a
    user scope, which the profiler never links kernels to (they would have no launcher at all)."""
    fast = getattr(torch._C._profiler, "_RecordFunctionFast", None)
    return fast(name) if fast else torch.profiler.record_function(name)


def _out_size(sizes, kernel, stride, before, after, dilation):
    """A conv's output sizes from its input sizes and, per dimension, stride, padding before and after, dilation."""
    return [(n + b + a - d * (k - 1) - 1) // s + 1
            for n, k, s, b, a, d in zip(sizes, kernel, stride, before, after, dilation)]


def _per_dim(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


def _shown(shape):
    """The output sizes a label shows: frames x H x W (3D), images (batch x frames) x H x W (2D)."""
    return list(shape[2:]) if len(shape) == 5 else [shape[0], *shape[2:]]


def _images(shape):
    """(images, H, W) of a conv output's shape: batch x frames of a 3D conv's, the batch of a 2D conv's."""
    return (shape[0] * shape[2], *shape[3:]) if len(shape) == 5 else (shape[0], *shape[2:])


def _describe_functional(dims):
    """For F.conv{dims}d(input, weight, bias, stride, padding, dilation, groups): (weight, groups, output
    shape, backend)."""
    def describe(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        kernel, dilation = weight.shape[2:], _per_dim(dilation, dims)
        sizes = x.shape[2:]
        if padding == "same":
            out = list(sizes)
        else:
            pad = _per_dim(0 if padding == "valid" else padding, dims)
            out = _out_size(sizes, kernel, _per_dim(stride, dims), pad, pad, dilation)
        return weight, groups, [x.shape[0], weight.shape[0], *out], "cudnn" if x.is_cuda else x.device.type
    return describe


def _describe_in_place(backend, x, weight, bias, stride, padding, *_, upsample=1, **__):
    """conv3d_in_place's (cache, residual, ... need not be read): causal, time padding in front only; upsample: x
    upsampled in space first. The batch's frames are shown as frames (B * T items of I frames: the upsampling conv
    of time-upsampled frames)."""
    tp, hp, wp = padding
    T, H, W = x.shape[2:]
    out = _out_size((T, upsample * H, upsample * W), weight.shape[2:], stride, (tp, hp, wp), (0, hp, wp), (1, 1, 1))
    return weight, 1, [1, weight.shape[0], x.shape[0] * out[0], *out[1:]], backend


def _label(weight, groups, shape, backend):
    kernel = "x".join(map(str, weight.shape[2:]))
    return f"{weight.shape[1] * groups}->{weight.shape[0]} k{kernel} {'x'.join(map(str, _shown(shape)))} {backend}"


@contextlib.contextmanager
def conv_ranges():
    """Inside the block, every conv entry point the loops use runs in a _range(CONV + label); yields
    {label: {backend, calls, flops}}, filled as the convs run. The module attributes are looked up at
    call time (F.conv3d, ops.causal_conv.conv3d_in_place), so patching them reaches every caller;
    restored on exit. vkern's causal_conv3d_cuda is reached only through conv3d_in_place."""
    from vkern.ops import causal_conv

    F = torch.nn.functional
    stats = {}
    inside = []  # a conv called by another (a backend falling back to F.conv3d) is the outer one's

    def probe(fn, describe):
        def conv(*args, **kwargs):
            if inside:
                return fn(*args, **kwargs)
            weight, groups, shape, backend = describe(*args, **kwargs)
            label = _label(weight, groups, shape, backend)
            inside.append(label)
            try:
                with _range(CONV + label):
                    out = fn(*args, **kwargs)
            finally:
                inside.pop()
            first = out[0] if isinstance(out, tuple) else out  # (output, normed output)
            if _images(first.shape) != _images(shape):  # a wrong label would silently misfile the time
                raise AssertionError(f"conv label {label!r}: the output is {tuple(first.shape)}")
            entry = stats.setdefault(label, dict(backend=backend, calls=0, flops=0))
            entry["calls"] += 1
            entry["flops"] += 2 * first.numel() * math.prod(weight.shape[1:])  # C/groups x kernel taps per output
            return out
        return conv

    originals = [(F, "conv3d", F.conv3d), (F, "conv2d", F.conv2d),
                 (causal_conv, "conv3d_in_place", causal_conv.conv3d_in_place)]
    describes = [_describe_functional(3), _describe_functional(2), _describe_in_place]
    try:
        for (module, name, fn), describe in zip(originals, describes):
            setattr(module, name, probe(fn, describe))
        yield stats
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def conv_layers(items, stats):
    """[{label, backend, ms, calls, tflops}] by ms, most first: each conv_ranges label with the time of
    the items (device_items') whose launcher chain holds its range."""
    ms = dict.fromkeys(stats, 0.0)
    for _, us, launcher in items:
        label = next((n[len(CONV):] for n in scopes(launcher) if n.startswith(CONV)), None)
        if label in ms:
            ms[label] += us / 1e3
    layers = [dict(label=label, backend=stats[label]["backend"], ms=round(t, 3), calls=stats[label]["calls"],
                   tflops=float(f"{stats[label]['flops'] / t / 1e9:.4g}") if t > 0 else None)
              for label, t in ms.items()]
    return sorted(layers, key=lambda layer: -layer["ms"])


def _runner(op, provider, vae, inp):
    from vkern.modules import wan_vae

    if provider == "diffusers":
        return (lambda: vae.decode(inp).sample) if op == "decode" else (lambda: vae.encode(inp).latent_dist.parameters)
    from .bench import CUDA_TABLE_S58, CUDA_TABLE_TF32_S51, cudnn_convs, tf32_norm_pass, with_cuda_table

    variants = {"vkern": lambda fn: fn, "vkern-cudnn": cudnn_convs, "vkern-tf32-norm-pass": tf32_norm_pass,
                "vkern-cuda-s58": lambda fn: with_cuda_table(fn, CUDA_TABLE_S58),
                "vkern-cuda-tf32-s51": lambda fn: with_cuda_table(fn, CUDA_TABLE_TF32_S51, "CUDA_FASTER_TF32")}
    if provider in variants:  # what vkern.patch(vae) runs, called directly (or a variant of it)
        fn = variants[provider](wan_vae.decode if op == "decode" else wan_vae.encode)
        return lambda: fn(vae, inp)
    raise SystemExit(f"--providers: unknown {provider!r} (diffusers, {', '.join(variants)})")


def _inputs(op, res, device, dtype):
    from vkern import models

    g = torch.Generator(device="cpu").manual_seed(0)
    if op == "decode":
        return torch.randn(models.latent_shape(res), generator=g).to(device, dtype)
    frames, height, width = models.RESOLUTIONS[res]
    return (torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1).to(device, dtype)


def gpu_idle(prof, top=10):
    """Where the GPU waited in a profile: (idle ms between the first kernel's start and the last one's end, the
    `top` kernel names before which the most idle time fell, as [{name, ms, gaps}]). A gap before a
    kernel is the time the GPU had nothing queued: the CPU was still launching it (Python and launch overhead)."""
    device = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                     and e.time_range.elapsed_us() > 0), key=lambda e: e.time_range.start)
    idle, before, end = 0.0, {}, None
    for e in device:
        if end is not None and e.time_range.start > end:
            gap = (e.time_range.start - end) / 1e3
            idle += gap
            name = e.key[:80]
            ms, n = before.get(name, (0.0, 0))
            before[name] = (ms + gap, n + 1)
        end = e.time_range.end if end is None else max(end, e.time_range.end)
    ranked = sorted(before.items(), key=lambda kv: -kv[1][0])[:top]
    return idle, [dict(name=name, ms=round(ms, 3), gaps=n) for name, (ms, n) in ranked]


def profile_call(fn, device):
    """One warm call, one timed call, one profiled call: (wall ms unprofiled, wall ms profiled, items,
    conv_layers' list, gpu_idle's (ms, list); only the profiled call runs its convs inside conv_ranges)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"

    def call():
        with torch.inference_mode():
            out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out

    call()  # Triton compilation, cuDNN heuristics, allocator warm-up
    start = time.perf_counter()
    call()
    wall = (time.perf_counter() - start) * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with conv_ranges() as convs, profile(activities=activities) as prof:
        start = time.perf_counter()
        call()
        profiled = (time.perf_counter() - start) * 1e3
    items = [(n, us, launcher) for n, us, launcher in profile_step.device_items(prof, cuda)
             if not n.startswith(SCOPE)]  # a range: on a GPU the hooks' are annotations, on the CPU Python time
    return wall, profiled, items, conv_layers(items, convs), gpu_idle(prof) if cuda else (0.0, [])


def run(res, ops, providers, device, dtype=torch.bfloat16):
    from vkern import models

    size = "tiny" if res == "tiny" else "default"
    torch.manual_seed(0)
    vae = models.build_wan_vae(size, dtype, device)
    hooks = _hook_scopes(vae)
    rows = []
    try:
        for op in ops:
            inp = _inputs(op, res, device, dtype)
            for provider in providers:
                wall, profiled, items, layers, (idle, idle_before) = profile_call(_runner(op, provider, vae, inp),
                                                                                   device)
                per_class, top = summarize(items, classify, CLASSES, TOP)
                total = sum(per_class.values())
                shape = f"wan-vae-{res}" + ("-fp32" if dtype == torch.float32 else "")
                rows.append(dict(op=f"profile-vae-{op}", shape=shape, provider=provider, world=1,
                                 **{f"{c}_ms": per_class[c] for c in CLASSES}, total_ms=total, wall_ms=wall,
                                 profiled_wall_ms=profiled, kernels=len(items), param_gib=param_bytes(vae) / 2**30,
                                 timer="cuda-kernels" if device.type == "cuda" else "cpu-self", top=top,
                                 conv_layers=layers, gpu_idle_ms=idle, idle_before=idle_before))
                del items
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            del inp
    finally:
        for h in hooks:
            h.remove()
    return rows


def table(rows):
    """Markdown: ms per class for each (op, provider), the GPU's busy share of the profiled call, and
    each class against the first provider of the same op."""
    header = ["op", "provider", *(LABELS[c] for c in CLASSES), "kernels total", "wall (profiled)", "wall",
              "non-conv"]
    lines = []
    for r in rows:
        lines.append([r["op"].removeprefix("profile-vae-") + " " + r["shape"].removeprefix("wan-vae-"), r["provider"],
                      *(f"{r[f'{c}_ms']:.1f}" for c in CLASSES), f"{r['total_ms']:.1f}",
                      f"{r['profiled_wall_ms']:.1f}", f"{r['wall_ms']:.1f}", f"{r['total_ms'] - r['conv_ms']:.1f}"])
    return "ms per class (GPU kernel time; CPU: op self time)\n\n" + markdown(header, lines)


def top_table(row):
    lines = [[f"{t['ms']:.2f}", t["count"], LABELS[t["cls"]], t["name"][:100].replace("|", "/")] for t in row["top"]]
    return f"top {TOP}: {row['op']} {row['shape']} {row['provider']}\n\n" + markdown(["ms", "calls", "class", "kernel"], lines)


def idle_table(row):
    lines = [[f"{t['ms']:.2f}", t["gaps"], t["name"].replace("|", "/")] for t in row["idle_before"]]
    return (f"GPU idle between kernels: {row['gpu_idle_ms']:.1f} ms of {row['profiled_wall_ms']:.1f} ({row['op']} "
            f"{row['shape']} {row['provider']}); the kernels the most idle time came before\n\n"
            + markdown(["idle ms", "gaps", "next kernel"], lines))


def conv_table(row):
    layers = row["conv_layers"]
    lines = [[c["label"].rsplit(" ", 1)[0], c["backend"], c["calls"], f"{c['ms']:.2f}",
              "-" if c["tflops"] is None else f"{c['tflops']:.3g}"] for c in layers]
    title = (f"conv layers: {row['op']} {row['shape']} {row['provider']} ({sum(c['ms'] for c in layers):.1f} ms, "
             f"{sum(c['calls'] for c in layers)} calls)")
    return title + "\n\n" + markdown(["conv (in->out, kernel, out frames x H x W)", "backend", "calls", "ms",
                                      "TFLOP/s"], lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.profile_vae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", default="480p", choices=["tiny", "480p", "720p"])
    parser.add_argument("--ops", default="decode,encode", help="comma-separated: decode, encode")
    parser.add_argument("--providers", default="diffusers,vkern",
                        help="comma-separated: diffusers, vkern, vkern-cudnn (every conv on cuDNN), vkern-cuda-tf32-s51 "
                        "(fp32: the upsampling convs on cuDNN), vkern-tf32-norm-pass (fp32: norm2 of the 96-channel "
                        "blocks in the norm pass), vkern-cuda-s58 (the conv routing before session 59)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (tiny only)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="the VAE's and its input's dtype")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--md", default=None, help="write the markdown tables here too")
    args = parser.parse_args(argv)
    device = cli_device(args.device, "--res", args.res)
    ops = args.ops.split(",")
    if set(ops) - {"decode", "encode"}:
        raise SystemExit(f"--ops: expected decode and/or encode, got {args.ops!r}")
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    rows = save_rows(run(args.res, ops, args.providers.split(","), device, dtype), device, args.out)
    text = "\n\n".join([table(rows)] + [top_table(r) for r in rows] + [conv_table(r) for r in rows]
                         + [idle_table(r) for r in rows if r["idle_before"]])
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
