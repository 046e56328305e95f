"""FP8 layerwise casting accuracy on the Wan configs (issue 4): per-layer SQNR and model-output cosine of
vkern's fp8 storage and compute modes, JSON rows (op "fp8-accuracy") and a markdown table.

    python -m bench.fp8_accuracy --size 1.3b,14b --res 480p --out rows.jsonl
    python -m bench.fp8_accuracy --size tiny --device cpu          # CI / smoke test (tiny uses its own res)

Models are random-weight bf16 Wan transformers built as the step benchmark builds them (bench.profile_step.build:
seed 0, vkern.models.build_wan_transformer), inputs from vkern.models.transformer_inputs.

Per layer (floors: storage >= 30 dB, compute >= 25 dB). One unpatched bf16 forward under inference_mode with
a forward hook on exactly the nn.Linear layers vkern.patch(model, PatchConfig(fp8=mode)) converts (the
patch's own vkern.patch.fp8.fp8_targets: diffusers' layerwise-casting skip list). Each hook takes the layer's
real bf16 input x and computes
    signal      x.float() @ W.float().T + b.float() in fp32 (TF32 off), from the bf16 input and weights,
    fp8 output  per mode, the Fp8Linear the patch would install (vkern.patch.fp8.to_fp8, the patch's own
                constructor: same mode, same fp8_fast_accum) run on x, then freed,
    bf16 output the layer's own output (the hook's `output`): the bf16 noise floor for comparison,
and SQNR = 10 log10(sum signal^2 / sum (signal - out)^2), the sums in float64 over row chunks (no full fp32
copy of an FFN output). Every layer sees the bf16 model's own activations, so per-layer numbers do not
include error carried in from earlier fp8 layers; that is what the model-level numbers show. Compute-mode
layers quantize x per token themselves here; in the patched model the fused LayerNorm+modulate and GELU
kernels hand the FFN/attention inputs over already in e4m3 (per-token scales, the same scheme, computed
from their own LayerNorm/GELU output: bit-exact with the separate quantizer after LayerNorm, up to the
last ulp of tanh after GELU):
that difference, too, is in the model-level numbers only.
Reported per layer class (fqn without "blocks.N.", e.g. attn1.to_q, attn2.to_out.0, ffn.net.0.proj):
min / median / max over the blocks, and per mode the overall min, its layer, and the median.

Model level (floors: cosine >= 0.999 storage, >= 0.995 compute). The output of
vkern.patch(model, PatchConfig(fp8=mode)) (undone after each run) is compared, cosine and rel L2 in float64,
    cos / rel_l2                       against the unpatched diffusers bf16 output: the issue's "patched vs
                                       unpatched", what a user sees; pass_cos uses it,
    cos_vs_vkern / rel_l2_vs_vkern     against vkern.patch(model) with the default config (bf16): the same
                                       attention and block glue, so the fp8 effect alone.
A "vkern" row carries the default bf16 patch against diffusers (the glue's own difference) for scale.
The unpatched reference is the output of the hooked forward (hooks do not change it).

Rows also carry n_targets (layers the patch's selection picks), n_converted (handle.summary of the real
patch), per_layer ({fqn: dB}), fast_accum, wall_s (whole size), layers_s (build + measured forward) and,
on a GPU, peak_gib (torch.cuda.max_memory_allocated over the measured forward: weights, activations and
the hooks' temporaries). Estimate for 14B 480p: ~27 GiB of bf16 weights + ~3.5 GiB activations + ~3 GiB
of hook temporaries (two extra 32760 x 13824 bf16 outputs and one chunk of fp32/fp64 sums); the
model's fp32 build (as in bench.bench) is the run's largest moment, ~53 GiB, before any of this.
"""
import argparse
import gc
import math
import re
import statistics
import time

import torch

MODES = ("storage", "compute")
SQNR_FLOOR_DB = {"storage": 30.0, "compute": 25.0}
COS_FLOOR = {"storage": 0.999, "compute": 0.995}
CHUNK_ROWS = 2048  # tokens per SQNR chunk: 14B FFN up at 2048 rows is ~0.1 GiB fp32, ~0.2 GiB per fp64 temporary
DT = torch.bfloat16


def sqnr_db(signal2, noise2):
    """10 log10(signal2 / noise2); inf for no noise at all."""
    if noise2 == 0:
        return math.inf
    if signal2 == 0:
        return -math.inf
    return 10 * math.log10(signal2 / noise2)


def layer_class(fqn):
    """'blocks.7.attn1.to_q' -> 'attn1.to_q'."""
    return re.sub(r"^blocks\.\d+\.", "", fqn)


@torch.no_grad()
def error_sums(x, weight, bias, outputs, chunk_rows=CHUNK_ROWS):
    """(sum signal^2, [sum (signal - out)^2 for out in outputs]) in float64, signal = x W^T + b computed in fp32
    from x's and W's own values; chunk_rows tokens at a time."""
    x = x.reshape(-1, x.shape[-1])
    outputs = [o.reshape(-1, o.shape[-1]) for o in outputs]
    w = weight.float()
    b = None if bias is None else bias.float()
    signal2 = torch.zeros((), dtype=torch.float64, device=x.device)
    noise2 = [torch.zeros_like(signal2) for _ in outputs]
    for start in range(0, x.shape[0], chunk_rows):
        s = torch.nn.functional.linear(x[start:start + chunk_rows].float(), w, b).double()
        signal2 += s.square().sum()
        for acc, out in zip(noise2, outputs):
            acc += (s - out[start:start + chunk_rows].double()).square().sum()
        del s
    return signal2.item(), [n.item() for n in noise2]


def measure_layers(model, inputs, modes=MODES, chunk_rows=CHUNK_ROWS):
    """One unpatched forward with the per-layer measurement hooks (see the module docstring).
    Returns (the model's output, {fqn: {"bf16": dB, mode: dB, ...}}, {mode: number of layers the patch converts}).
    Raises if a converted layer was not called exactly once."""
    import vkern
    from vkern.patch import fp8 as fp8_patch

    configs = {m: vkern.PatchConfig(fp8=m) for m in modes}
    targets = {m: dict(fp8_patch.fp8_targets(model, c)) for m, c in configs.items()}
    hooked = {}
    for t in targets.values():
        hooked.update(t)
    results = {}

    def hook(fqn):
        def measure(module, args, output):
            if fqn in results:
                raise RuntimeError(f"{fqn}: called twice in one forward; per-layer SQNR measures one call per layer")
            x = args[0]
            outs, measured = [output], [m for m in modes if fqn in targets[m]]
            for m in measured:
                layer = fp8_patch.to_fp8(module, fqn, configs[m])  # exactly what the patch installs
                outs.append(layer(x))
                del layer
            signal2, noise2 = error_sums(x, module.weight, module.bias, outs, chunk_rows)
            results[fqn] = {"bf16": sqnr_db(signal2, noise2[0]),
                            **{m: sqnr_db(signal2, n) for m, n in zip(measured, noise2[1:])}}
        return measure

    handles = [m.register_forward_hook(hook(fqn)) for fqn, m in hooked.items()]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 signal in full fp32 (PyTorch's default too)
    try:
        with torch.inference_mode():
            out = model(**inputs).sample
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for h in handles:
            h.remove()
    missing = [fqn for fqn in hooked if fqn not in results]
    if missing:
        raise RuntimeError(f"{len(missing)} fp8 target layers never ran in the forward: {missing[:5]}")
    return out, results, {m: len(t) for m, t in targets.items()}


def patched_outputs(model, inputs, modes=MODES):
    """({"vkern": output of the default (bf16) patch, mode: output of the fp8 patch}, {mode: layers the
    patch converted (handle.summary)}); every patch undone after its forward."""
    import vkern

    outs, converted = {}, {}
    configs = [("vkern", vkern.PatchConfig())] + [(m, vkern.PatchConfig(fp8=m)) for m in modes]
    for name, config in configs:
        with torch.inference_mode(), vkern.patch(model, config) as handle:
            outs[name] = model(**inputs).sample
            if config.fp8:
                converted[name] = handle.summary[f"Linear -> Fp8Linear ({config.fp8})"]
        del handle
        gc.collect()  # the Fp8Linear copies; the patch handle and the model referred to each other
        if outs[name].is_cuda:
            torch.cuda.empty_cache()
    return outs, converted


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _db(v):
    return round(v, 3) if math.isfinite(v) else v


def mode_stats(per_layer, mode):
    """Overall and per-class SQNR statistics of one mode (and of the bf16 layers they replace), and every
    layer's SQNR (per_layer, in the order the forward called them)."""
    values = {fqn: r[mode] for fqn, r in per_layer.items() if mode in r}
    by_class = {}
    for fqn, v in values.items():
        by_class.setdefault(layer_class(fqn), []).append((v, per_layer[fqn]["bf16"]))
    per_class = {c: dict(n=len(v), min_db=_db(min(a for a, _ in v)), median_db=_db(statistics.median(a for a, _ in v)),
                         max_db=_db(max(a for a, _ in v)), bf16_median_db=_db(statistics.median(b for _, b in v)))
                 for c, v in by_class.items()}
    worst = min(values, key=values.get)
    bf16 = [per_layer[fqn]["bf16"] for fqn in values]
    return dict(n_layers=len(values), sqnr_min_db=_db(values[worst]),
                sqnr_median_db=_db(statistics.median(values.values())), sqnr_max_db=_db(max(values.values())),
                worst_layer=worst,
                bf16_sqnr_min_db=_db(min(bf16)), bf16_sqnr_median_db=_db(statistics.median(bf16)), per_class=per_class,
                per_layer={fqn: _db(v) for fqn, v in values.items()})


def report(size, res="480p", device="cuda", modes=MODES, chunk_rows=CHUNK_ROWS):
    """Rows (without run metadata) for one Wan size: a "vkern" row (default bf16 patch vs diffusers) and one
    row per fp8 mode. size "tiny" runs at the "tiny" resolution whatever res says."""
    from vkern import PatchConfig, models

    from .profile_step import build, shape_name
    from .timing import param_bytes, rel_l2

    device = torch.device(device)
    cuda = device.type == "cuda"
    res = "tiny" if size == "tiny" else res
    start = time.perf_counter()
    model = build(size, "diffusers", device, DT)
    inputs = models.transformer_inputs(model, res, DT, device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reference, per_layer, n_targets = measure_layers(model, inputs, modes, chunk_rows)
    layers_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    outs, converted = patched_outputs(model, inputs, modes)
    common = dict(op="fp8-accuracy", shape=shape_name(size, res), world=1, size=size, res=res,
                  param_gib=param_bytes(model) / 2**30)
    rows = [dict(common, provider="vkern", cos=cosine(outs["vkern"], reference),
                 rel_l2=rel_l2(outs["vkern"], reference))]
    for mode in modes:
        stats = mode_stats(per_layer, mode)
        cos, cos_vkern = cosine(outs[mode], reference), cosine(outs[mode], outs["vkern"])
        rows.append(dict(common, provider=f"vkern-fp8-{mode}", **stats, n_targets=n_targets[mode],
                         n_converted=converted[mode], fast_accum=PatchConfig(fp8=mode).fp8_fast_accum,
                         sqnr_floor_db=SQNR_FLOOR_DB[mode], pass_sqnr=stats["sqnr_min_db"] >= SQNR_FLOOR_DB[mode],
                         cos=cos, rel_l2=rel_l2(outs[mode], reference), cos_vs_vkern=cos_vkern,
                         rel_l2_vs_vkern=rel_l2(outs[mode], outs["vkern"]), cos_floor=COS_FLOOR[mode],
                         pass_cos=cos >= COS_FLOOR[mode], pass_cos_vs_vkern=cos_vkern >= COS_FLOOR[mode]))
    wall = time.perf_counter() - start
    for r in rows:
        r.update(wall_s=round(wall, 1), layers_s=round(layers_s, 1))
        if cuda:
            r["peak_gib"] = peak  # the measured forward: weights + activations + hooks' temporaries
    del model, inputs, reference, outs
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def table(rows):
    """Markdown: one line per provider, then the per-class SQNR of each fp8 mode."""
    from .profile_step import markdown

    fp8 = [r for r in rows if r["provider"].startswith("vkern-fp8-")]
    if not fp8:
        return ""
    shape = rows[0]["shape"]
    lines = []
    for r in rows:
        if r in fp8:
            lines.append([r["provider"], r["n_layers"],
                          f"{r['sqnr_min_db']:.1f} / {r['sqnr_median_db']:.1f} (>= {r['sqnr_floor_db']:g})",
                          r["worst_layer"], f"{r['bf16_sqnr_min_db']:.1f} / {r['bf16_sqnr_median_db']:.1f}",
                          f"{r['cos']:.6f} (>= {r['cos_floor']})", f"{r['cos_vs_vkern']:.6f}", f"{r['rel_l2']:.4f}",
                          "PASS" if r["pass_sqnr"] and r["pass_cos"] else "FAIL"])
        else:
            lines.append([r["provider"], "-", "-", "-", "-", f"{r['cos']:.6f}", "-", f"{r['rel_l2']:.4f}", "-"])
    out = markdown([shape, "layers", "SQNR dB min / median (floor)", "worst layer", "bf16 layer SQNR min / median",
                    "cos vs diffusers (floor)", "cos vs vkern bf16", "rel L2 vs diffusers", "floors"], lines)
    classes = list(fp8[0]["per_class"])
    per_class = [[c, fp8[0]["per_class"][c]["n"],
                  *(f"{r['per_class'][c]['min_db']:.1f} / {r['per_class'][c]['median_db']:.1f} / "
                    f"{r['per_class'][c]['max_db']:.1f}" for r in fp8),
                  f"{fp8[0]['per_class'][c]['bf16_median_db']:.1f}"] for c in classes]
    out += "\n\n" + markdown([f"{shape} layer class", "n", *(f"{r['provider']} min / median / max dB" for r in fp8),
                              "bf16 median dB"], per_class)
    return out


def main(argv=None):
    from vkern import models

    from .profile_step import save_rows

    parser = argparse.ArgumentParser(prog="python -m bench.fp8_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1.3b,14b", help="comma-separated: tiny, 1.3b, 14b")
    parser.add_argument("--res", default="480p", choices=[r for r in models.RESOLUTIONS if r != "tiny"],
                        help="video resolution (size tiny always runs at its own tiny resolution)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: storage, compute")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (tiny only)")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help="tokens per SQNR chunk (memory bound)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    sizes, modes = args.size.split(","), tuple(args.modes.split(","))
    bad = [s for s in sizes if s not in models.WAN_TRANSFORMERS] + [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown --size/--modes {bad}; sizes {list(models.WAN_TRANSFORMERS)}, modes {list(MODES)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and any(s != "tiny" for s in sizes):
        raise SystemExit("--size 1.3b/14b need a CUDA GPU (on the CPU: --size tiny)")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 signal GEMMs in full fp32 (measure_layers also sets it)
    rows = []
    for size in sizes:
        got = save_rows(report(size, args.res, device, modes, args.chunk_rows), device, args.out)
        print(table(got), flush=True)
        for r in got[1:]:
            print(f"{r['shape']} {r['provider']}: SQNR min {r['sqnr_min_db']:.2f} dB at {r['worst_layer']} "
                  f"(floor {r['sqnr_floor_db']:g}, {'pass' if r['pass_sqnr'] else 'FAIL'}), cos {r['cos']:.6f} "
                  f"(floor {r['cos_floor']}, {'pass' if r['pass_cos'] else 'FAIL'}); {r['wall_s']} s"
                  + (f", peak {r['peak_gib']:.1f} GiB" if "peak_gib" in r else ""), flush=True)
        rows += got
    return rows


if __name__ == "__main__":
    main()
