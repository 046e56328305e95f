"""One Wan transformer step, sequence-parallel over N GPUs, beside the same step on one GPU.

    torchrun --nproc-per-node 2 -m bench.sp_run --size 14b --res 720p --out rows.jsonl

Rows (op "sp-step", JSON lines like bench/bench.py):
  diffusers, world 1     the unpatched model on one GPU
  vkern, world 1         vkern.patch(model) on one GPU
  vkern, world N         vkern.patch(model, PatchConfig(sp=SPConfig())): Ulysses over the N ranks
  diffusers-cp, world N  diffusers' enable_parallelism(ContextParallelConfig(ulysses_degree=N)), if
                         this diffusers has it (its hooks cannot be removed, so it runs last)
The world-1 rows run on every rank at once, each on its own GPU with no communication (the same
clocks and power draw as the parallel rows); every row reports the slowest rank's median.
rel_l2/cos compare each provider's output with the diffusers world-1 output (when it ran).
--device cpu (gloo, tiny sizes, wall-clock timing) only smoke-tests the script.
"""
import argparse
import datetime
import gc
import json
import statistics
import time

import torch
import torch.distributed as dist

from . import shapes
from .bench import _commit
from .timing import rel_l2, time_cuda

DT = torch.bfloat16


def _time(step, device, repeats):
    if device.type == "cuda":
        ms, lo, hi = time_cuda(step, 1, repeats)
        torch.cuda.reset_peak_memory_stats()
        step()
        return ms, lo, hi, torch.cuda.max_memory_allocated() / 2**30
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times), max(times), 0.0  # no peak memory on the CPU


def _slowest(values, device):
    """Each metric's maximum over the ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _providers(model, sp, world, check):
    """(provider, world, setup) in run order; setup() patches the model and returns the undo."""
    import vkern
    from vkern.distributed import SPConfig

    def vkern_single():
        return vkern.patch(model).undo

    def vkern_sp():
        return vkern.patch(model, vkern.PatchConfig(sp=SPConfig(group=sp, check_inputs=check))).undo

    def diffusers_cp():
        from diffusers import ContextParallelConfig

        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        return None
    return [("diffusers", 1, lambda: None), ("vkern", 1, vkern_single), ("vkern", world, vkern_sp),
            ("diffusers-cp", world, diffusers_cp)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m bench.sp_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="14b", choices=["tiny", "1.3b", "14b"])
    parser.add_argument("--res", default="720p", choices=["tiny", "480p", "720p"])
    parser.add_argument("--providers", default="all", help="comma-separated of diffusers,vkern,vkern-sp,diffusers-cp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--no-check", action="store_true",
                        help="SPConfig(check_inputs=False): no per-step cross-rank input check (one host sync)")
    parser.add_argument("--out", default=None, help="append JSON lines here (rank 0)")
    args = parser.parse_args(argv)

    from vkern import models
    from vkern.distributed import init_from_env

    # A rank that fails alone leaves the others in a collective: the NCCL watchdog ends the job
    # after this timeout instead of letting it hold the GPUs (a 14B 720p step takes ~10 s on one GPU).
    sp = init_from_env(backend="nccl" if args.device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=5))
    device = sp.device
    name = next((k for k, v in shapes.STEPS.items() if v == (args.size, args.res)), f"wan{args.size}-{args.res}")
    torch.manual_seed(0)  # the same weights on every rank
    model = models.build_wan_transformer(args.size, DT, device)
    inputs = models.transformer_inputs(model, args.res, DT, device)  # seeded: the same on every rank
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30
    _, _, F, H, W = inputs["hidden_states"].shape
    meta = dict(op="sp-step", shape=name, tokens=F * (H // 2) * (W // 2), batch=1, weights_gib=weights,
                gpu=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                commit=_commit(), date=datetime.date.today().isoformat())
    wanted = None if args.providers == "all" else args.providers.split(",")
    reference = None
    for provider, world, setup in _providers(model, sp, sp.world, not args.no_check):
        label = "vkern-sp" if provider == "vkern" and world > 1 else provider
        if wanted is not None and label not in wanted:
            continue
        row = dict(meta, provider=provider, world=world)
        if label == "vkern-sp":
            row["check_inputs"] = not args.no_check
        undo = None
        try:
            undo = setup()

            def step():
                with torch.inference_mode():
                    # return_dict=False: diffusers' context parallel rejects its output dataclass (run 9d2d533)
                    return model(**inputs, return_dict=False)[0]

            dist.barrier()
            ms, lo, hi, peak = _time(step, device, args.repeats)
            out = step()
            if provider == "diffusers":
                reference = out
            ms, lo, hi, peak = _slowest([ms, lo, hi, peak], device)
            row.update(ms=ms, ms_min=lo, ms_max=hi)
            if reference is not None:
                cos = torch.nn.functional.cosine_similarity(out.double().flatten(), reference.double().flatten(), 0)
                row.update(rel_l2_vs_diffusers=rel_l2(out, reference), cos_vs_diffusers=cos.item())
            if device.type == "cuda":
                row.update(peak_gib=peak, activation_gib=peak - weights)
        except Exception as error:
            # A provider that cannot run here (e.g. diffusers-cp with heads % N != 0) gets a row saying why.
            row["error"] = f"{type(error).__name__}: {error}"[:500]
        finally:
            if undo is not None:
                undo()
        if sp.rank == 0:
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
