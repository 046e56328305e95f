"""Which Linears carry a step's fp8-compute error: one step's output rel L2 vs diffusers (bf16) under vkern without
fp8 (the floor), with every default fp8 target quantized, and with the targets matching each --skip regex left in
bf16 (diffusers' layerwise-casting skip list applies throughout).

    python -m bench.fp8_step_error --shape wan-animate14b-720p --skip "^face_" --skip "^blocks\\." --out results.jsonl
    python -m bench.fp8_step_error --shape wan-animate-tiny --device cpu   # a family's tiny model (tests)
"""
import argparse
import gc
import json
import re
import time

import torch

from vkern.patch.fp8 import default_skip_patterns

from . import shapes
from .bench import DT, _commit, _step_models
from .timing import rel_l2


def step_spec(shape):
    """(family, size, res) of a bench/shapes.py STEPS name, or of "<family>-tiny"."""
    if shape.endswith("-tiny") and shape.removesuffix("-tiny") in _step_models():
        return shape.removesuffix("-tiny"), "tiny", "tiny"
    if shape not in shapes.STEPS:
        raise SystemExit(f"--shape: {shape!r} is neither a bench/shapes.py STEPS name nor <family>-tiny")
    return shapes.STEPS[shape]


def step_output(spec, device, config=None):
    """The step's output (on the CPU) from a fresh seeded model, patched with config when given."""
    import vkern

    family, size, res = spec
    torch.manual_seed(0)
    model = _step_models()[family][0](size, DT, device)
    if config is not None:
        vkern.patch(model, config)
    inputs = _step_models()[family][1](model, res, DT, device)
    with torch.inference_mode():
        out = model(**inputs).sample.cpu()
    del model, inputs
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return out


def errors(shape, skips=(), device="cuda"):
    """[(what, rel L2 vs diffusers)]: "no fp8", "all" (the default targets), then one per skip regex."""
    import vkern

    spec = step_spec(shape)
    reference = step_output(spec, device)
    patterns = default_skip_patterns(_step_models()[spec[0]][0](spec[1], DT, "meta"))  # what the default skips
    rows = [("no fp8", rel_l2(step_output(spec, device, vkern.PatchConfig()), reference))]
    for skip in [None, *skips]:
        def wanted(m, fqn, skip=skip):  # diffusers' skip list, and then the --skip regex
            return not any(re.search(p, fqn) for p in patterns) and not (skip and re.search(skip, fqn))

        config = vkern.PatchConfig(fp8="compute", fp8_keep_original="drop", fp8_filter_fn=wanted)
        rows.append((skip or "all", rel_l2(step_output(spec, device, config), reference)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.fp8_step_error", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, help="a bench/shapes.py STEPS name, or <family>-tiny")
    parser.add_argument("--skip", action="append", default=[], help="a regex over fqns kept in bf16 (repeatable)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    where = dict(gpu=torch.cuda.get_device_name(device)) if device.type == "cuda" else dict(device=str(device))
    rows = [dict(op="fp8-step-error", shape=args.shape, fp8=what, rel_l2_vs_diffusers=err, **where,
                 torch=torch.__version__, commit=_commit(), date=time.strftime("%Y-%m-%d"))
            for what, err in errors(args.shape, args.skip, device)]
    for r in rows:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
