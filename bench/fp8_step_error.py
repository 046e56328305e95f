"""Which Linears carry a step's fp8-compute error: one step shape's output rel L2 vs diffusers (bf16) under vkern
without fp8 (the floor), with every default fp8 target quantized, and with the targets matching each --skip regex
left in bf16.

    python -m bench.fp8_step_error --shape wan-animate14b-720p --skip "^face_" --out results.jsonl
"""
import argparse
import gc
import json
import re
import time

import torch

from . import shapes
from .bench import DT, _commit, _step_models
from .timing import rel_l2
from vkern.patch.fp8 import default_skip_patterns


def step_output(family, size, res, config=None):
    """The step's output (on the CPU) from a fresh seeded model, patched with config when given."""
    import vkern

    torch.manual_seed(0)
    model = _step_models()[family][0](size, DT, "cuda")
    if config is not None:
        vkern.patch(model, config)
    inputs = _step_models()[family][1](model, res, DT, "cuda")
    with torch.inference_mode():
        out = model(**inputs).sample.cpu()
    del model, inputs
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(argv=None):
    import vkern

    parser = argparse.ArgumentParser(prog="python -m bench.fp8_step_error", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, help="a bench/shapes.py STEPS name")
    parser.add_argument("--skip", action="append", default=[], help="a regex over fqns kept in bf16 (repeatable)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    family, size, res = shapes.STEPS[args.shape]
    reference = step_output(family, size, res)
    rows = []
    out = step_output(family, size, res, vkern.PatchConfig())  # vkern's own difference, no fp8: the floor
    rows.append(dict(op="fp8-step-error", shape=args.shape, skip="no fp8", rel_l2_vs_diffusers=rel_l2(out, reference),
                     gpu=torch.cuda.get_device_name(), torch=torch.__version__))
    print(json.dumps(rows[-1]))
    patterns = default_skip_patterns(_step_models()[family][0](size, DT, "meta"))  # what the default skips
    for skip in [None, *args.skip]:
        def wanted(m, fqn, skip=skip):  # diffusers' skip list, and then the --skip regex
            return not any(re.search(p, fqn) for p in patterns) and not (skip and re.search(skip, fqn))

        out = step_output(family, size, res, vkern.PatchConfig(fp8="compute", fp8_keep_original="drop",
                                                                fp8_filter_fn=wanted))
        row = dict(op="fp8-step-error", shape=args.shape, skip=skip, rel_l2_vs_diffusers=rel_l2(out, reference),
                   gpu=torch.cuda.get_device_name(), torch=torch.__version__)
        print(json.dumps(row))
        rows.append(row)
    for r in rows:
        r.update(commit=_commit(), date=time.strftime("%Y-%m-%d"))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
