"""Where one Wan transformer step's activation peak happens: the peak allocated memory (over the weights)
within each phase of the forward (input embedding, each block, output norm + projection).

    python -m bench.memory_phases --size 14b --res 480p --providers diffusers,vkern-chunked
"""
import argparse
import gc

import torch


def phases(model, inputs):
    """[(phase, peak GiB over the memory allocated before the step)] for one step of model."""
    from vkern.modules.wan_block import ignores_block_inputs

    base = torch.cuda.memory_allocated()
    marks = []

    def mark(name):
        # Marked: the probe touches no tensor, so the hooked blocks still overwrite their input in place as
        # unhooked ones do (an unmarked hook turns that off, and the phases would show a block that is not run).
        @ignores_block_inputs
        def hook(*_):
            torch.cuda.synchronize()
            marks.append((name, (torch.cuda.max_memory_allocated() - base) / 2**30))
            torch.cuda.reset_peak_memory_stats()
        return hook

    handles = [model.blocks[0].register_forward_pre_hook(mark("embeddings (before block 0)"))]
    handles += [b.register_forward_hook(mark(f"block {i}")) for i, b in enumerate(model.blocks[:2])]
    handles += [model.blocks[-1].register_forward_hook(mark("blocks 2.."))]
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        model(**inputs)
    mark("output norm + projection")()
    for h in handles:
        h.remove()
    return marks


def main(argv=None):
    from vkern import models

    from .bench import _build_step_model

    parser = argparse.ArgumentParser(prog="python -m bench.memory_phases", description=__doc__)
    parser.add_argument("--size", default="14b")
    parser.add_argument("--res", default="480p")
    parser.add_argument("--providers", default="diffusers,vkern-chunked")
    args = parser.parse_args(argv)
    for provider in args.providers.split(","):
        model = _build_step_model(args.size, provider)
        inputs = models.transformer_inputs(model, args.res, torch.bfloat16, "cuda")
        print(provider, " | ".join(f"{name} {gib:.2f} GiB" for name, gib in phases(model, inputs)), flush=True)
        del model, inputs
        gc.collect()  # the patch handle and the model refer to each other (run 13: a lingering model made
        torch.cuda.empty_cache()  # the next provider's phases negative)


if __name__ == "__main__":
    main()
