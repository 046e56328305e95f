"""Summarises ncu's per-SASS-instruction source page (CSV, bench/flash_ncu.sh source): where the warps' stall
samples fall, by opcode and by reason, and the 40 instructions with the most samples, in address order.
    python bench/ncu_source_summary.py flash-source.csv"""
import collections
import csv
import sys


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main(path):
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f)]
    header_at = next((i for i, r in enumerate(rows) if any("Source" == c.strip() for c in r)), None)
    if header_at is None:
        print("no 'Source' column; the first rows:", rows[:3]); return
    header, body = rows[header_at], rows[header_at + 1:]
    col = {name.strip(): i for i, name in enumerate(header)}
    print("columns:", "; ".join(header))
    source = col["Source"]
    samples = next((i for n, i in col.items() if n.startswith("Warp Stall Sampling (All")), None)
    if samples is None:
        print("no stall-sampling column"); return
    # One column per stall reason (all samples); the "(Not Issued)" copies and the totals would count twice.
    reasons = [(n, i) for n, i in col.items() if n.startswith("stall_") and "(Not Issued)" not in n]
    total = sum(number(r[samples]) for r in body if len(r) > samples)
    by_op, by_reason = collections.Counter(), collections.Counter()
    for r in body:
        if len(r) <= samples:
            continue
        op = r[source].strip().split()
        op = [t for t in op if not t.startswith("@")]
        by_op[op[0] if op else "?"] += number(r[samples])
        for n, i in reasons:
            by_reason[n] += number(r[i]) if len(r) > i else 0
    print(f"total stall samples {total:.0f}")
    for op, n in by_op.most_common(25):
        print(f"  {op:48s} {n:9.0f} {100 * n / total:5.1f}%")
    for n, v in by_reason.most_common(20):
        print(f"  reason {n:60s} {v:9.0f}")
    top = sorted(range(len(body)), key=lambda k: -number(body[k][samples]) if len(body[k]) > samples else 0)[:40]
    for k in sorted(top):
        print(f"  #{k:5d} {number(body[k][samples]):8.0f}  {body[k][source].strip()[:90]}")


if __name__ == "__main__":
    main(sys.argv[1])
