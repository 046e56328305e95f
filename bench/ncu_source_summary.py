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
    loop_regions(body, source, samples, reasons, col.get("Instructions Executed"))


def loop_regions(body, source, samples, reasons, executed):
    """The consumers' main loop (from the first to the last instruction of the largest execution count that at
    least 100 instructions share: mbarrier retries spin more often, one by one) cut where a consumer's block changes
    phase: loop top -> first wgmma, the issues -> the product wait, the wait, the row max (-> first MUFU.EX2), the
    exponentials (-> the last), the rest. Shares of the loop's samples, and each region's three largest reasons."""
    if executed is None:
        return
    counts = [number(r[executed]) if len(r) > executed else 0 for r in body]
    per_block = max(c for c, n in collections.Counter(counts).items() if n >= 100)
    loop = [k for k, c in enumerate(counts) if c == per_block]
    lo, hi = loop[0], loop[-1] + 1
    text = [body[k][source] for k in range(lo, hi)]
    find = lambda key, start=0: next(k for k in range(start, hi - lo) if key in text[k])
    gmma = find("GMMA")
    wait = find("WARPGROUP.DEPBAR", gmma)
    mufu = find("MUFU.EX2", wait)
    last = max(k for k in range(hi - lo) if "MUFU.EX2" in text[k])
    cuts = [("loop top -> first wgmma", 0, gmma), ("issues -> product wait", gmma, wait), ("product wait", wait, wait + 1),
            ("row max -> first MUFU.EX2", wait + 1, mufu), ("exponentials", mufu, last + 1),
            ("the rest", last + 1, hi - lo)]
    loop_total = sum(number(body[k][samples]) for k in range(lo, hi)) or 1
    print(f"main loop: instructions {lo}..{hi - 1}")
    for name, a, b in cuts:
        rows = [body[lo + k] for k in range(a, b)]
        share = sum(number(r[samples]) for r in rows) / loop_total
        by = collections.Counter()
        for r in rows:
            for n, i in reasons:
                by[n] += number(r[i]) if len(r) > i else 0
        print(f"  {name:28s} {b - a:5d} instructions {100 * share:5.1f}%  " +
              " ".join(f"{n[6:]} {100 * v / loop_total:.1f}" for n, v in by.most_common(3)))


if __name__ == "__main__":
    main(sys.argv[1])
