"""The multi-process harness of the sequence-parallel tests (tests/test_sequence_parallel.py,
tests/test_sp_wan.py): each world size starts ONCE per test module (gloo processes on 127.0.0.1, set
up from torchrun's environment variables through init_from_env); every rank runs all of the module's
cases and writes which failed; each pytest test reads its own case's verdict.

A module gives its cases as a module-level function cases(sp, seed, results) that fills results
{case: None or the failure's traceback} (use run() per case), and gets its verdicts with
results_fixture(cases) and check(). Uninitialized memory is NaN in the workers (deterministic mode),
so an element that a transform forgets to write cannot equal the reference.
"""
import json
import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = timedelta(seconds=30)  # a hang in a collective becomes an error within this


def run(fn, *args):
    """fn(*args) -> None if it passed, else the failure's traceback (a case's verdict)."""
    try:
        fn(*args)
        return None
    except Exception:
        return traceback.format_exc()


def expect_error(fn, exc_type, *fragments):
    """fn() must raise exc_type with every fragment in its message; returns the error."""
    try:
        fn()
    except exc_type as error:
        missing = [f for f in fragments if f not in str(error)]
        if missing:
            raise AssertionError(f"error message {str(error)!r} lacks {missing}") from None
        return error
    raise AssertionError(f"no {exc_type.__name__} (expected one mentioning {fragments})")


class CountCalls:
    """Counts the calls of torch.distributed.<name> while active (e.g. all_to_all_single, to check
    that q, k and v travel in one). calls: how many; buffers: per call, the (data_ptr, nbytes) of its
    tensor arguments in order (for all_to_all_single: output, input)."""

    def __init__(self, name="all_to_all_single"):
        self.name = name

    def __enter__(self):
        self.calls, self.buffers, self.original = 0, [], getattr(dist, self.name)

        def counted(*args, **kwargs):
            self.calls += 1
            self.buffers.append([(t.data_ptr(), t.numel() * t.element_size())
                                 for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)])
            return self.original(*args, **kwargs)
        setattr(dist, self.name, counted)
        return self

    def __exit__(self, *exc):
        setattr(dist, self.name, self.original)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, seed, out_dir, cases):
    """One rank: join the group as torchrun would, run cases(sp, seed, results), write the verdicts."""
    torch.set_num_threads(1)  # the workers share a few cores
    # Uninitialized memory is NaN: an element the transform forgets to write cannot pass.
    # (warn_only: only the NaN fill is wanted here, not errors from nondeterministic CUDA ops.)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    results = {}
    try:
        from vkern.distributed import init_from_env

        sp = init_from_env(backend=backend, timeout=TIMEOUT)
        cases(sp, seed, results)
        torch.distributed.destroy_process_group()
    except Exception:
        results["__worker__"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def spawn(world, backend, tmp_path_factory, cases, preload=(), budget_s=None):
    """Run cases on `world` processes; returns ({case: [failure or None per rank]}, seed). budget_s:
    how long all ranks together may take before they count as hung (default 2 x TIMEOUT; a hang inside
    a collective already ends after TIMEOUT, this is the last resort; the CI machine is small and shared).
    preload: modules for the fork server to import once, the cases' module among them (it starts with
    the first spawn of the pytest session, so a later caller's preload is ignored and its ranks import
    them instead)."""
    out_dir = str(tmp_path_factory.mktemp(f"sp{world}{backend}"))
    seed = torch.randint(0, 2**20, ()).item()  # fresh data each run, printed on failure
    # A fork server imports torch once and forks the ranks from that clean single-threaded process:
    # a fresh interpreter per rank costs seconds each on a small machine, and forking pytest itself
    # (threads, OpenMP) is unsafe.
    ctx = mp.get_context("forkserver")
    # (torch._inductor.config: use_deterministic_algorithms imports it, which takes seconds.)
    ctx.set_forkserver_preload(["torch", "torch._inductor.config", "vkern.distributed", __name__, *preload])
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, backend, seed, out_dir, cases)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + (budget_s or TIMEOUT.total_seconds() * 2)
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    assert not hung, f"ranks {hung} of {world} did not finish (seed {seed})"
    per_rank = []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.json")
        assert os.path.exists(path), f"rank {r} of {world} died without a report (exit code {procs[r].exitcode})"
        with open(path) as f:
            per_rank.append(json.load(f))
    crashed = {r: res["__worker__"] for r, res in enumerate(per_rank) if "__worker__" in res}
    assert not crashed, f"seed {seed}: " + "\n".join(f"rank {r}:\n{tb}" for r, tb in crashed.items())
    return {case: [res.get(case, "not run") for res in per_rank] for case in per_rank[0]}, seed


def results_fixture(cases, preload=(), budget_s=None):
    """A module-scoped fixture giving get(world): the gloo verdicts of cases on `world` ranks (spawned
    once per world size and module)."""
    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        cache = {}

        def get(world):
            if world not in cache:
                cache[world] = spawn(world, "gloo", tmp_path_factory, cases, preload, budget_s)
            return cache[world]
        return get
    return fixture


def check(results, case):
    """Fail with every rank's traceback if case failed on any rank."""
    verdicts, seed = results
    assert case in verdicts, f"{case} was not run"
    failures = [f"rank {r}:\n{v}" for r, v in enumerate(verdicts[case]) if v is not None]
    assert not failures, f"{case} (seed {seed}) failed on:\n" + "\n".join(failures)


def check_all(results):
    """Fail if any case failed on any rank (one test for a whole spawn, e.g. the NCCL runs)."""
    verdicts, seed = results
    failures = {case: v for case, v in verdicts.items() if any(x is not None for x in v)}
    assert not failures, f"seed {seed}: " + "\n".join(f"{c}: {v}" for c, v in failures.items())
