"""Offline view of the CUDA attention kernel's main loop (no GPU needed): builds csrc/flash_attention.cu to a
cubin with nvcc, disassembles it with nvdisasm (-hex, for the control codes) and prints, per kernel
instantiation, the main loop's static instruction count, its opcode histogram, and the sum of the stall counts
ptxas set (bits 41-44 of each instruction's upper word: clocks before the warp's next instruction may issue).
The loop is static: its masking branches count though a block without masked keys skips them, and scoreboard
waits and the other warps are not in it; compare variants with it, do not read it as time.
    python -m bench.flash_sass [--match E4M3] [--list N]   (nvdisasm: $NVDISASM, PATH, or triton's copy)
--list N prints the first N instructions of the exponential section (first to last MUFU.EX2) with their stalls.
Used in bench/NOTES.md session 13."""
import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nvdisasm():
    found = os.environ.get("NVDISASM") or shutil.which("nvdisasm")
    if found:
        return found
    import triton  # ships one with its NVIDIA backend

    hits = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm"))
    if not hits:
        raise SystemExit("nvdisasm not found: set NVDISASM")
    return hits[0]


def disassemble():
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "flash.cubin")
        subprocess.run(["nvcc", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
                        "-I", os.path.join(ROOT, "csrc"), "-cubin", os.path.join(ROOT, "csrc", "flash_attention.cu"),
                        "-o", cubin], check=True)
        return subprocess.run([nvdisasm(), "-hex", "-c", cubin], check=True, capture_output=True, text=True).stdout


def kernels(sass):
    """{instantiation: ([(stall, opcode text)], {label: index})} for each flash_fwd_kernel."""
    out = {}
    for part in re.split(r"\n(?=\s*\.text\._Z)", sass):
        name = re.match(r"\s*\.text\.(\S+):", part)
        if not name or "flash_fwd_kernel" not in name.group(1):
            continue
        lines, labels, rows = part.split("\n"), {}, []
        for i, line in enumerate(lines):
            label = re.match(r"\s*\.L_x_(\d+):", line)
            if label:
                labels[label.group(1)] = len(rows)
            ins = re.search(r"/\*[0-9a-f]{4}\*/\s+(.*?)\s*;\s*/\* (0x[0-9a-f]+) \*/", line)
            if ins and i + 1 < len(lines):
                upper = re.search(r"/\* (0x[0-9a-f]+) \*/", lines[i + 1])
                rows.append(((int(upper.group(1), 16) >> 41) & 0xF, ins.group(1)))
        key = re.search(r"flash_fwd_kernel(.*?)EEEv", name.group(1)).group(1)
        out[key] = (rows, labels)
    return out


def main_loop(rows, labels):
    """The shortest backward-branch span holding >= 8 wgmmas and >= 40 exponentials: the per-key-block loop."""
    best = None
    for k, (_, text) in enumerate(rows):
        target = re.search(r"BRA.*\.L_x_(\d+)", text)
        if target and labels.get(target.group(1), k) < k:
            span = rows[labels[target.group(1)]:k + 1]
            if (sum("GMMA" in t for _, t in span) >= 8 and sum("MUFU.EX2" in t for _, t in span) >= 40
                    and (best is None or len(span) < len(best))):
                best = span
    return best or []


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--match", default="", help="only instantiations whose mangled name contains this")
    parser.add_argument("--list", type=int, default=0)
    args = parser.parse_args()
    for key, (rows, labels) in sorted(kernels(disassemble()).items()):
        if args.match not in key:
            continue
        loop = main_loop(rows, labels)
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for _, t in loop)
        exps = [k for k, (_, t) in enumerate(loop) if "MUFU.EX2" in t]
        section = loop[exps[0]:exps[-1] + 1] if exps else []
        print(f"{key}: loop {len(loop)} instructions, stall sum {sum(s for s, _ in loop)}; exponential section "
              f"{len(section)} instructions, stall sum {sum(s for s, _ in section)}")
        print("   ", ", ".join(f"{op} {n}" for op, n in ops.most_common(12)))
        for stall, text in section[:args.list]:
            print(f"    s{stall:2d}  {text}")


if __name__ == "__main__":
    main()
