"""Print benchmark rows (JSON lines) as a table: python -m bench.table rows.jsonl

Weight memory: param_gib, the model's parameter and buffer bytes (bench.timing.param_bytes). Step and VAE
rows also carry allocated_gib, torch.cuda.memory_allocated() after the build (not shown). weights_gib is
in older rows only: torch.cuda.memory_allocated() in step/VAE rows (cuBLAS workspace included), the
parameter bytes in profile rows; sp-step rows (bench/sp_run.py) still write it as the bf16 state_dict's bytes."""
import json
import sys

METRICS = ("ms", "attention_ms", "gemm_ms", "elementwise_ms", "other_ms", "psnr_db", "a2a_ms", "a2a_pct", "eager_ms", "tflops", "tflops_sync", "gbps", "param_gib", "weights_gib", "peak_gib", "activation_gib", "sqnr_db", "sqnr_min_db", "sqnr_median_db", "rel_l2", "cos",
           "rel_l2_vs_cudnn", "rel_l2_vs_diffusers", "rel_l2_vs_first", "cos_vs_first", "bit_exact", "timing", "error")


def fmt(v, metric=""):
    if isinstance(v, float) and metric.startswith("cos"):
        return f"{v:.6f}"  # cosines sit near 1: two decimals would show 1.00 for every provider
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}"
    return str(v)


def main(paths):
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    if not rows:
        print("no rows")
        return
    print(f"{rows[0].get('gpu')}, torch {rows[0].get('torch')}, commit {rows[0].get('commit')}")
    for op in dict.fromkeys(r["op"] for r in rows):
        group = [r for r in rows if r["op"] == op]
        cols = [m for m in METRICS if any(m in r for r in group)]
        print(f"\n{op:<14} {'shape':<26} {'provider':<18} " + " ".join(f"{c:>12}" for c in cols))
        for r in group:
            print(f"{'':<14} {r['shape']:<26} {r.get('provider', '-'):<18} " + " ".join(f"{fmt(r.get(c, ''), c):>12}" for c in cols))


if __name__ == "__main__":
    main(sys.argv[1:])
