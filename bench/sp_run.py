"""One Wan transformer step (or Wan VACE's, Wan Animate's: --family), sequence-parallel over N GPUs, beside the
same step on one GPU.

    torchrun --nproc-per-node 2 -m bench.sp_run --size 14b --res 720p --out rows.jsonl
    torchrun --nproc-per-node 4 -m bench.sp_run --family wan-animate --size 14b --res 720p --providers vkern,vkern-sp

Rows (op "sp-step", JSON lines like bench/bench.py), in run order:
  diffusers, world 1       the unpatched model on one GPU
  vkern, world 1           vkern.patch(model) on one GPU
  vkern-sp*, world N       vkern.patch(model, PatchConfig(sp=SPConfig(...))), Ulysses over the N ranks:
    vkern-sp               the default SPConfig (input agreement once per input shape)
    vkern-sp-everystep     check_inputs="every-step" (the cost of checking every step)
    vkern-sp-nocheck       check_inputs="off"
    vkern-sp-fp8           fp8_payload=True (q/k/v as e4m3 + per-token-per-head scales)
    vkern-sp-overlap       overlap_chunks=--chunks (exchanges split by heads, overlapped with attention)
    vkern-sp-fp8-overlap   both
    vkern-sp-ring          ring_degree=N (pure ring attention; for comparison, not the default)
    vkern-sp-ring2/-ring4  ring_degree=2/4: Ulysses over N/2 (N/4) ranks x a ring of 2 (4) groups; for
                           more ranks than heads (Wan-1.3B's 12 heads on 8 GPUs) without head padding
    vkern-sp-copy          zero_copy=False (q/k/v packed into the send buffer by copying, the output
                           unpacked by copying: the A/B of the default's zero-copy path)
    vkern-sp-v-first       qkv_exchange="v-first" (v sent alone first, then q and k)
    vkern-sp-one-exchange  qkv_exchange="one" (zero-copy, but q/k/v in one exchange after all three
                           projections: the A/B of the default's early k/v exchange)
  diffusers-cp, world N    diffusers' enable_parallelism(ContextParallelConfig(ulysses_degree=N)), if
                           this diffusers has it (its hooks cannot be removed, so it runs last)
The world-1 rows run on every rank at once, each on its own GPU with no communication (the same
clocks and power draw as the parallel rows); every metric is the slowest rank's (a2a_min_ms excepted).

Per row: ms (median of --repeats steps after one warm-up step), then one more step that gives the
output (rel_l2/cos against the diffusers world-1 output, when it ran), the peak memory, and, for the
vkern-sp rows, the communication breakdown from vkern.distributed.CommTimer (CUDA events around the
waits, packing and unpacking; off during the timed steps):
  a2a_ms, a2a_pct        the compute stream's wait for all-to-alls in that step, and its share of
                         that step (inst_ms); includes waiting for the slowest rank to arrive
  a2a_min_ms, a2a_min_pct  the same for the rank that waits least (the one the others wait for): the
                         exposed communication on the critical path, without the rank skew
  pack_ms, unpack_ms     copies into send buffers / out of receive buffers (+ fp8 quant/dequant)
  pack_mb, unpack_mb     the bytes those copies wrote in that step (CommTimer.bytes)
  all_gather_ms, ring_ms the final proj_out gather; the ring's exposed key/value transfers
  a2a_only_ms, a2a_only_pct   the same step's all-to-alls alone (the exact per-layer payloads as one
                         q/k/v and one output exchange, nothing else running), and their share of
                         ms: the wire time
  a2a_mb_per_layer       bytes each rank sends per layer (q/k/v + output, own chunk included)
speedup_vs_vkern1 / speedup_vs_diffusers1: world-1 ms over this row's ms; rel_l2_vs_vkern1 /
cos_vs_vkern1: this row's output against vkern's world-1 output (the "checked against 1 GPU" of the
SP rows). --world1 PATH carries both across jobs (a 2- and a 4-GPU job beside an 8-GPU one): the job
that runs the vkern world-1 row saves its ms and output there; a job that does not loads them.
--device cpu (gloo, tiny sizes, wall-clock timing) only smoke-tests the script.
"""
import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from . import shapes
from .bench import _commit
from .timing import rel_l2, time_cuda

DT = torch.bfloat16
SP_VARIANTS = {  # label: SPConfig kwargs ("chunks" -> --chunks, "world" -> N)
    "vkern-sp": {},
    "vkern-sp-everystep": dict(check_inputs="every-step"),
    "vkern-sp-nocheck": dict(check_inputs="off"),
    "vkern-sp-fp8": dict(fp8_payload=True),
    "vkern-sp-overlap": dict(overlap_chunks="chunks"),
    "vkern-sp-fp8-overlap": dict(fp8_payload=True, overlap_chunks="chunks"),
    "vkern-sp-ring": dict(ring_degree="world"),
    "vkern-sp-ring2": dict(ring_degree=2),
    "vkern-sp-ring4": dict(ring_degree=4),
    "vkern-sp-copy": dict(zero_copy=False),
    "vkern-sp-v-first": dict(qkv_exchange="v-first"),
    "vkern-sp-one-exchange": dict(qkv_exchange="one"),
}
DEFAULT_PROVIDERS = "diffusers,vkern,vkern-sp,vkern-sp-copy,vkern-sp-nocheck,vkern-sp-fp8,vkern-sp-overlap,diffusers-cp"


def _now(device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _since(start, device):
    if device.type == "cuda":
        stop = torch.cuda.Event(enable_timing=True)
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop)
    return (time.perf_counter() - start) * 1e3


def _measure(step, device, repeats, comm_timer):
    """(ms, min, max, out, peak GiB, inst_ms, comm {category: ms} or None)."""
    if device.type == "cuda":
        ms, lo, hi = time_cuda(step, 1, repeats)
        torch.cuda.reset_peak_memory_stats()
    else:
        step()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        ms, lo, hi = statistics.median(times), min(times), max(times)
    # One more step: the output, the peak, and (for SP rows) the communication breakdown.
    timer = comm_timer() if comm_timer is not None else contextlib.nullcontext()
    dist.barrier()
    with timer:
        start = _now(device)
        out = step()
        inst_ms = _since(start, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    comm = None
    if comm_timer is not None:
        comm = {**timer.ms(), "pack_mb": timer.bytes["pack"] / 1e6, "unpack_mb": timer.bytes["unpack"] / 1e6}
    return ms, lo, hi, out, peak, inst_ms, comm


def _slowest(values, device):
    """Each metric's maximum over the ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _payload_bytes(model, tokens, world, batch, fp8):
    """Bytes per destination rank of one layer's q/k/v all-to-all and output all-to-all."""
    from vkern.distributed import ShardSpec
    from vkern.distributed.ulysses import _fp8_bytes

    cfg = model.config
    spec = ShardSpec.create(tokens, cfg.num_attention_heads, world)
    D, local, hl = cfg.attention_head_dim, spec.local_seq_len, spec.local_heads
    qkv = _fp8_bytes(3, batch, local, hl, D) if fp8 else 3 * batch * local * hl * D * 2
    return qkv, batch * local * hl * D * 2


def _a2a_only(model, tokens, sp, batch, fp8, repeats):
    """Milliseconds of one step's all-to-alls alone (2 per sharded self-attention with the exact payload sizes)."""
    qkv, out = _payload_bytes(model, tokens, sp.world, batch, fp8)
    bufs = [torch.empty(sp.world * n, dtype=torch.uint8, device=sp.device) for n in (qkv, qkv, out, out)]

    def exchanges():
        for _ in range(len(model.blocks) + len(getattr(model, "vace_blocks", ()))):
            dist.all_to_all_single(bufs[1], bufs[0], group=sp.group)
            dist.all_to_all_single(bufs[3], bufs[2], group=sp.group)
    dist.barrier()
    if sp.device.type == "cuda":
        ms = time_cuda(exchanges, 1, repeats)[0]
    else:
        exchanges()
        start = time.perf_counter()
        exchanges()
        ms = (time.perf_counter() - start) * 1e3
    del bufs
    return ms, sp.world * (qkv + out) / 2**20


def _profile_row(row, step, sp, out):
    """One profiled step on every rank; rank 0 writes the row with each rank's timeline split."""
    from .sp_profile import profile_kernels, timeline_stats

    dist.barrier()
    stats = timeline_stats(profile_kernels(step))
    ranks = [None] * sp.world
    dist.all_gather_object(ranks, stats, group=sp.group)
    if sp.rank == 0:
        row["ranks"] = ranks
        print(json.dumps(row), flush=True)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")


def _providers(model, sp, world, chunks):
    """(label, world, setup, sp_kwargs) in run order; setup() patches the model and returns the undo."""
    import vkern
    from vkern.distributed import SPConfig

    def vkern_single():
        return vkern.patch(model).undo

    def vkern_sp(kwargs):
        kwargs = {k: chunks if v == "chunks" else world if v == "world" else v for k, v in kwargs.items()}
        return lambda: vkern.patch(model, vkern.PatchConfig(sp=SPConfig(group=sp, **kwargs))).undo

    def diffusers_cp():
        from diffusers import ContextParallelConfig

        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        return None
    rows = [("diffusers", 1, lambda: None, None), ("vkern", 1, vkern_single, None)]
    rows += [(label, world, vkern_sp(kwargs), kwargs) for label, kwargs in SP_VARIANTS.items()]
    return rows + [("diffusers-cp", world, diffusers_cp, None)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m bench.sp_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="wan", choices=["wan", "wan-vace", "wan-animate"],
                        help="the transformer (bench.bench's step models; VACE: 14b at 480p, Animate: 14b at 720p)")
    parser.add_argument("--size", default="14b", choices=["tiny", "1.3b", "14b"])
    parser.add_argument("--res", default="720p", choices=["tiny", "480p", "720p"])
    parser.add_argument("--providers", default=DEFAULT_PROVIDERS,
                        help=f"comma-separated of diffusers,vkern,{','.join(SP_VARIANTS)},diffusers-cp, or all")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=2, help="overlap_chunks of the *-overlap rows")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--no-check", action="store_true", help="run vkern-sp with check_inputs='off'")
    parser.add_argument("--no-comm-timing", action="store_true", help="skip the CommTimer step and a2a_only")
    parser.add_argument("--out", default=None, help="append JSON lines here (rank 0)")
    parser.add_argument("--profile", action="store_true",
                        help="after each vkern row, one profiled step per rank: an 'sp-profile' row with every "
                             "rank's GPU timeline split (bench/sp_profile.py)")
    parser.add_argument("--world1", default=None,
                        help="a .pt file: saved by a job that runs the vkern world-1 row (its ms and output), "
                             "loaded by one that does not, for speedup_vs_vkern1 and rel_l2_vs_vkern1")
    args = parser.parse_args(argv)

    from vkern.distributed import CommTimer, init_from_env

    from .bench import _step_models

    # A rank that fails alone leaves the others in a collective: the NCCL watchdog ends the job
    # after this timeout instead of letting it hold the GPUs (a 14B 720p step takes ~12 s on one GPU).
    sp = init_from_env(backend="nccl" if args.device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=5))
    device = sp.device
    if args.no_check:
        SP_VARIANTS["vkern-sp"] = dict(check_inputs="off")
    spec = (args.family, args.size, args.res)
    name = next((k for k, v in shapes.STEPS.items() if v == spec), f"{args.family}{args.size}-{args.res}")
    build, make_inputs = _step_models()[args.family]
    torch.manual_seed(0)  # the same weights on every rank
    model = build(args.size, DT, device)
    inputs = make_inputs(model, args.res, DT, device)  # seeded: the same on every rank
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30
    _, _, F, H, W = inputs["hidden_states"].shape
    p_t, p_h, p_w = model.config.patch_size
    tokens = (F // p_t) * (H // p_h) * (W // p_w)
    batch = inputs["hidden_states"].shape[0]
    meta = dict(op="sp-step", shape=name, tokens=tokens, batch=batch, weights_gib=weights,
                gpu=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                commit=_commit(), date=datetime.date.today().isoformat(),
                nccl_env={k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")})
    wanted = None if args.providers == "all" else args.providers.split(",")
    unknown = set(wanted or ()) - {"diffusers", "vkern", "diffusers-cp", *SP_VARIANTS}
    if unknown:
        raise SystemExit(f"--providers: unknown {sorted(unknown)}")
    reference, base, vkern1_out = None, {}, None
    if args.world1 and "vkern" not in (wanted or ["vkern"]):
        saved = torch.load(args.world1, map_location=device)
        if saved["shape"] != name:
            raise SystemExit(f"--world1 {args.world1}: saved for {saved['shape']}, this run is {name}")
        base["vkern"], vkern1_out = saved["ms"], saved["out"]
    for label, world, setup, sp_kwargs in _providers(model, sp, sp.world, args.chunks):
        if wanted is not None and label not in wanted:
            continue
        row = dict(meta, provider=label, world=world)
        if sp_kwargs is not None:
            row["sp_config"] = {k: args.chunks if v == "chunks" else sp.world if v == "world" else v
                                for k, v in sp_kwargs.items()}
        undo = None
        try:
            undo = setup()

            def step():
                with torch.inference_mode():
                    # return_dict=False: diffusers' context parallel rejects its output dataclass (run 9d2d533)
                    return model(**inputs, return_dict=False)[0]

            dist.barrier()
            timed = sp_kwargs is not None and not args.no_comm_timing
            ms, lo, hi, out, peak, inst_ms, comm = _measure(step, device, args.repeats, CommTimer if timed else None)
            if label == "diffusers":
                reference = out
            values = [ms, lo, hi, peak, inst_ms]
            if comm is not None:
                values += [comm[k] for k in ("all_to_all", "pack", "unpack", "all_gather", "ring", "pack_mb", "unpack_mb")]
            # The all-to-all wait of the rank that waits least: a rank that arrives late waits least, so
            # this is the exposed communication on the critical path (the max over ranks adds rank skew).
            a2a_min = -_slowest([-comm["all_to_all"]], device)[0] if comm is not None else None
            values = _slowest(values, device)
            ms, lo, hi, peak, inst_ms = values[:5]
            row.update(ms=ms, ms_min=lo, ms_max=hi)
            if label in ("diffusers", "vkern") and world == 1:
                base[label] = ms
            if label == "vkern" and world == 1:
                vkern1_out = out
                if args.world1 and sp.rank == 0:
                    torch.save(dict(shape=name, ms=ms, out=out), args.world1)
            for key, label1 in (("speedup_vs_vkern1", "vkern"), ("speedup_vs_diffusers1", "diffusers")):
                if world > 1 and label1 in base:
                    row[key] = base[label1] / ms
            if comm is not None:
                a2a, pack, unpack, gather, ring, pack_mb, unpack_mb = values[5:]
                row.update(inst_ms=inst_ms, a2a_ms=a2a, a2a_pct=100 * a2a / inst_ms, a2a_min_ms=a2a_min,
                           a2a_min_pct=100 * a2a_min / inst_ms, pack_ms=pack,
                           unpack_ms=unpack, all_gather_ms=gather, ring_ms=ring, pack_mb=pack_mb,
                           unpack_mb=unpack_mb)
                if row["sp_config"].get("ring_degree", 1) == 1:
                    only, mb = _a2a_only(model, tokens, sp, batch, row["sp_config"].get("fp8_payload", False),
                                         args.repeats + 1)
                    only = _slowest([only], device)[0]
                    row.update(a2a_only_ms=only, a2a_only_pct=100 * only / ms, a2a_mb_per_layer=mb)
            for key, ref in (("diffusers", reference), ("vkern1", vkern1_out if world > 1 else None)):
                if ref is not None:
                    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), 0)
                    row.update({f"rel_l2_vs_{key}": rel_l2(out, ref), f"cos_vs_{key}": cos.item()})
            if device.type == "cuda":
                row.update(peak_gib=peak, activation_gib=peak - weights)
            if args.profile and device.type == "cuda" and label.startswith("vkern"):
                _profile_row(dict(meta, op="sp-profile", provider=label, world=world), step, sp, args.out)
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
        out = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if sp.rank == 0:
        _table(args.out)
    dist.destroy_process_group()


def _table(path):
    """A short table of this run's rows (from the file, when there is one)."""
    if not path:
        return
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print(f"{'provider':22} {'world':>5} {'ms':>9} {'x vkern1':>8} {'a2a ms':>8} {'a2a %':>6} {'wire ms':>8} "
          f"{'pack+unpack':>11} {'a2a min %':>9} {'l2 diff':>8} {'l2 vkern1':>9}")
    for r in rows[-12:]:
        if "error" in r:
            print(f"{r['provider']:22} {r['world']:>5} error: {r['error'][:80]}")
            continue
        f = lambda k, fmt: format(r[k], fmt) if k in r else "-"  # noqa: E731
        pu = format(r["pack_ms"] + r["unpack_ms"], ".1f") if "pack_ms" in r else "-"
        print(f"{r['provider']:22} {r['world']:>5} {f('ms', '.1f'):>9} {f('speedup_vs_vkern1', '.3f'):>8} "
              f"{f('a2a_ms', '.1f'):>8} {f('a2a_pct', '.2f'):>6} {f('a2a_only_ms', '.1f'):>8} {pu:>11} "
              f"{f('a2a_min_pct', '.2f'):>9} {f('rel_l2_vs_diffusers', '.4f'):>8} {f('rel_l2_vs_vkern1', '.4f'):>9}")


if __name__ == "__main__":
    main()
