"""Where a Wan VAE decode/encode spends its GPU time: torch.profiler over one call per provider
(diffusers' loop, vkern's), kernel time by class, JSON rows (op "profile-vae-decode" /
"profile-vae-encode") and a markdown table, plus the top kernels.

    python -m bench.profile_vae --res 480p --out rows.jsonl           # H100/H200: ~40 s
    python -m bench.profile_vae --res tiny --device cpu               # CI: CPU ops instead of kernels

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
"""
import argparse
import gc
import re
import time

import torch

from . import profile_step
from .profile_step import cli_device, markdown, save_rows, summarize
from .timing import param_bytes

CLASSES = ("conv", "norm_silu", "copy", "elementwise", "other")
LABELS = {"conv": "conv", "norm_silu": "norm+silu", "copy": "copy+cat+pad", "elementwise": "other elementwise",
          "other": "other"}
SCOPE = "vae:"  # record_function ranges opened by the hooks: "vae:norm", "vae:attention"
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


def _runner(op, provider, vae, inp):
    from vkern.modules import wan_vae

    if provider == "diffusers":
        return (lambda: vae.decode(inp).sample) if op == "decode" else (lambda: vae.encode(inp).latent_dist.parameters)
    if provider in ("vkern", "vkern-cudnn"):  # what vkern.patch(vae) runs on CUDA, called directly
        from .bench import cudnn_convs

        fn = wan_vae.decode if op == "decode" else wan_vae.encode
        fn = cudnn_convs(fn) if provider == "vkern-cudnn" else fn
        return lambda: fn(vae, inp)
    raise SystemExit(f"--providers: unknown {provider!r} (diffusers, vkern, vkern-cudnn)")


def _inputs(op, res, device, dtype):
    from vkern import models

    g = torch.Generator(device="cpu").manual_seed(0)
    if op == "decode":
        return torch.randn(models.latent_shape(res), generator=g).to(device, dtype)
    frames, height, width = models.RESOLUTIONS[res]
    return (torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1).to(device, dtype)


def profile_call(fn, device):
    """One warm call, one timed call, one profiled call: (wall ms unprofiled, wall ms profiled, items)."""
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
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        call()
        profiled = (time.perf_counter() - start) * 1e3
    items = [(n, us, launcher) for n, us, launcher in profile_step.device_items(prof, cuda)
             if not n.startswith(SCOPE)]  # on the CPU a hook range's self time is Python, not an op
    return wall, profiled, items


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
                wall, profiled, items = profile_call(_runner(op, provider, vae, inp), device)
                per_class, top = summarize(items, classify, CLASSES, TOP)
                total = sum(per_class.values())
                rows.append(dict(op=f"profile-vae-{op}", shape=f"wan-vae-{res}", provider=provider, world=1,
                                 **{f"{c}_ms": per_class[c] for c in CLASSES}, total_ms=total, wall_ms=wall,
                                 profiled_wall_ms=profiled, kernels=len(items), param_gib=param_bytes(vae) / 2**30,
                                 timer="cuda-kernels" if device.type == "cuda" else "cpu-self", top=top))
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.profile_vae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", default="480p", choices=["tiny", "480p", "720p"])
    parser.add_argument("--ops", default="decode,encode", help="comma-separated: decode, encode")
    parser.add_argument("--providers", default="diffusers,vkern", help="comma-separated: diffusers, vkern, vkern-cudnn (every conv on cuDNN)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (tiny only)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--md", default=None, help="write the markdown tables here too")
    args = parser.parse_args(argv)
    device = cli_device(args.device, "--res", args.res)
    ops = args.ops.split(",")
    if set(ops) - {"decode", "encode"}:
        raise SystemExit(f"--ops: expected decode and/or encode, got {args.ops!r}")
    rows = save_rows(run(args.res, ops, args.providers.split(","), device), device, args.out)
    text = "\n\n".join([table(rows)] + [top_table(r) for r in rows])
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
