"""Can NCCL 2.28's copy-engine (zero-SM) all-to-all carry vkern's Ulysses exchanges? A probe, not a
path vkern uses: under torchrun, for a few payloads, the all-to-all of plain tensors vs tensors from
torch's NCCL symmetric-memory pool (window-registered by rendezvous), each alone and beside a bf16 GEMM
(how much the exchange slows the GEMM: the SM contention run 27's profile found), and which kernels a
profiled exchange launched (an NCCL kernel, or copies). NCCL uses the copy engines only under CTA policy
zero (NCCL_CTA_POLICY=2, set by the launcher for those rows) and for registered buffers.
    NCCL_CTA_POLICY=2 torchrun --nproc-per-node 4 -m bench.ce_a2a_probe --out rows.jsonl"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def timed(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / repeats


def kernels(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.key[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    group = dist.group.WORLD
    a = torch.randn(16384, 5120, device=device, dtype=torch.bfloat16)
    w = torch.randn(5120, 5120, device=device, dtype=torch.bfloat16)
    gemm = lambda: torch.mm(a, w.T)  # noqa: E731  ~0.9 TFLOP: ~1.2 ms
    gemm_alone = timed(gemm)
    q = torch.randn(1, 10, 8192, 128, device=device, dtype=torch.bfloat16)
    attention = lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)  # noqa: E731  tensor cores, little HBM
    attention_alone = timed(attention)
    symm = None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        symm_mem.set_backend("NCCL")

        def symm(n):
            t = symm_mem.empty(n, dtype=torch.uint8, device=device)
            symm_mem.rendezvous(t, group=group.group_name)
            return t
        symm(1 << 20)
        symm_error = None
    except Exception as error:  # noqa: BLE001  the probe reports what this torch lacks
        symm, symm_error = None, f"{type(error).__name__}: {error}"[:300]
    rows = []
    for mb in (48, 145, 290):
        n = (mb << 20) // world * world
        kinds = {"plain": lambda: torch.empty(n, dtype=torch.uint8, device=device)}
        if symm is not None:
            kinds["symmetric"] = lambda: symm(n)
        for kind, alloc in kinds.items():
            send, recv = alloc(), alloc()
            send.fill_(rank)

            def a2a():
                dist.all_to_all_single(recv, send, group=group, async_op=True).wait()

            def beside(fn):
                def run():
                    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
                    fn()
                    work.wait()
                return run

            def launch_ms():
                """Host time of issuing the exchange (a path that waits on the host shows it here)."""
                torch.cuda.synchronize()
                start = time.perf_counter()
                work = dist.all_to_all_single(recv, send, group=group, async_op=True)
                ms = (time.perf_counter() - start) * 1e3
                work.wait()
                torch.cuda.synchronize()
                return ms
            dist.barrier()
            ms = timed(a2a)
            both_ms = timed(beside(gemm))
            attention_ms = timed(beside(attention))
            host_ms = min(launch_ms() for _ in range(3))
            ok = all(bool((recv.view(world, -1)[j] == j).all()) for j in range(world))
            row = dict(op="ce-a2a-probe", world=world, mb=mb, kind=kind, cta_policy=os.environ.get("NCCL_CTA_POLICY"),
                       a2a_ms=ms, gb_per_s=n * (world - 1) / world / ms / 1e6, gemm_alone_ms=gemm_alone,
                       a2a_beside_gemm_ms=both_ms, attention_alone_ms=attention_alone,
                       a2a_beside_attention_ms=attention_ms, launch_host_ms=host_ms, correct=ok, kernels=kernels(a2a) if mb == 145 else None,
                       symm_error=symm_error, nccl=".".join(map(str, torch.cuda.nccl.version())), torch=torch.__version__)
            rows.append(row)
            del send, recv
    if rank == 0:
        for r in rows:
            print(json.dumps(r))
        if args.out:
            with open(args.out, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
