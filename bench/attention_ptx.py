"""Does the pipelined attention loop overlap on Hopper? Compile vkern's flash-attention kernel for sm_90 on a
machine without a GPU (bf16, D=128, BLOCK_M=BLOCK_N=128, 8 warps) and print, for the main loop of each
variant, the order of its tensor-core products, their waits and the softmax's exp2, in the PTX and (when
Triton's bundled ptxas/cuobjdump run here) in the SASS, with ptxas's registers, spills and its C7514
warning (wgmma serialized). python -m bench.attention_ptx [--stages 2,3] [--sass]

Reading it: `QK(8)` is the QK^T product's 8 wgmma k-steps (both operands in shared memory), `PV(8)` P @ V's
(P from registers), `tiny` the pipelined loop's wait anchor, `wait N` a wgmma.wait_group N, `ex2 x n` n
exp2 instructions in a row, `bar` a CTA barrier, `ldwait` a wait on the asynchronous K/V copies."""
import argparse
import os
import re
import shutil
import subprocess
import tempfile

import triton

from .triton_ptx import compile_sm90

SIGNATURE = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "lse_ptr": "*fp32",
             "qs_ptr": "*fp32", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "kpm_ptr": "*u8",
             "Sq": "i32", "Skv": "i32", "H": "i32",
             "stride_qb": "i32", "stride_qs": "i32", "stride_qh": "i32",
             "stride_kb": "i32", "stride_ks": "i32", "stride_kh": "i32",
             "stride_vb": "i32", "stride_vs": "i32", "stride_vh": "i32", "stride_vd": "i32",
             "stride_ob": "i32", "stride_os": "i32", "stride_oh": "i32", "scale_log2": "fp32"}
# wan14b-720p: Sq = Skv = 75600, H = 40, D = 128: every pointer, length and stride but H is a multiple of 16,
# and stride_vd = 1 is specialized to a constant, as a real launch does.
ALIGNED = [n for n, t in SIGNATURE.items() if t.startswith("*") or n.startswith("stride") or n in ("Sq", "Skv")]
VARIANTS = {"default": {}, "pipe (no anchor)": {"PIPELINE": True, "ANCHOR": False},
            "pipe": {"PIPELINE": True, "ANCHOR": True}}


def compile_variant(flags, stages):
    from vkern.triton.attention import _attention_kernel

    consts = dict(stride_vd=1, HEAD_DIM=128, BLOCK_M=128, BLOCK_N=128, QK8=False, V8=False, HAS_KPM=False,
                  WRITE_LSE=False, UPCAST=False, PIPELINE=False, ANCHOR=True)  # an offline compile takes no defaults
    consts.update(flags)
    aligned = [n for n in ALIGNED if n != "stride_vd"]
    return compile_sm90(_attention_kernel, SIGNATURE, consts, 8, aligned, stages)


def _main_loop(lines, label_re, branch_re):
    """The lines of the first loop: from its header label to the branch back to it."""
    for i, line in enumerate(lines):
        m = re.match(label_re, line)
        if m:
            for j in range(i + 1, len(lines)):
                if re.search(branch_re.format(re.escape(m.group(1))), lines[j]):
                    return lines[i:j + 1]
    return []


def _compress(events):
    out = []
    for e in events:
        if out and out[-1][0] == e:
            out[-1][1] += 1
        else:
            out.append([e, 1])
    return " ".join(e if n == 1 else (f"{e}({n})" if e in ("QK", "PV") else f"{e} x{n}") for e, n in out)


def ptx_loop(ptx):
    lines = ptx.splitlines()
    loop = _main_loop(lines, r"^(\$L__BB\d+_\d+):", r"bra(\.uni)?\s+{};")
    events = []
    for line in loop:
        s = line.strip()
        if s.startswith("wgmma.mma_async"):
            shape = re.search(r"\.m64n(\d+)k", s).group(1)
            b_reg = re.search(r"\},\s*(\S+?),", s).group(1)  # A operand: %rd descriptor (smem) or {regs}
            events.append("tiny" if shape == "16" else ("PV" if b_reg.startswith("{") else "QK"))
        elif s.startswith("wgmma.wait_group"):
            events.append("wait " + re.search(r"(\d+);", s).group(1))
        elif s.startswith("ex2."):
            events.append("ex2")
        elif s.startswith("cp.async.wait_group"):
            events.append("ldwait")
        elif s.startswith("bar.sync"):
            events.append("bar")
    return _compress(events)


def sass(ptx):
    """(ptxas -v summary, SASS main-loop events) with Triton's bundled tools, or None where they do not run."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas, cuobjdump = (shutil.which(t, path=bindir) for t in ("ptxas", "cuobjdump"))
    if not ptxas or not cuobjdump:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", cubin], capture_output=True, text=True).stderr
        dump = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    info = (f"{regs.group(1) if regs else '?'} registers, spills {spill.group(1)}/{spill.group(2)} bytes st/ld, "
            f"C7514 (wgmma serialized): {'YES' if 'C7514' in log else 'no'}")
    lines = dump.splitlines()
    # loop header: the target of the last backward branch
    targets = [(i, int(m.group(1), 16)) for i, l in enumerate(lines)
               for m in [re.search(r"BRA\s+(?:\S+\s+)?0x([0-9a-f]+)", l)] if m]
    addr = {int(m.group(1), 16): i for i, l in enumerate(lines) for m in [re.match(r"\s*/\*([0-9a-f]{4,})\*/", l)] if m}
    back = [(i, addr[t]) for i, t in targets if t in addr and addr[t] < i]
    if not back:
        return info, ""
    end, start = back[0]
    events = []
    for l in lines[start:end + 1]:
        if "HGMMA" in l:
            m = re.search(r"HGMMA\.64x(\d+)x\d+\S*\s+\S+,\s*(\S+?),", l)
            events.append("tiny" if m.group(1) == "16" else ("QK" if m.group(2).startswith("gdesc") else "PV"))
        elif "WARPGROUP.DEPBAR" in l:
            events.append("wait " + re.search(r"gsb0,\s*(0x[0-9a-f]+)", l).group(1))
        elif "MUFU.EX2" in l:
            events.append("ex2")
        elif re.search(r"\bDEPBAR\.LE\s+SB0", l):
            events.append("ldwait")
        elif "BAR.SYNC" in l:
            events.append("bar")
        elif re.search(r"\b(STL|LDL)\b", l):
            events.append("spill")
    return info, _compress(events)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--no-sass", action="store_true")
    args = parser.parse_args(argv)
    for stages in map(int, args.stages.split(",")):
        for name, flags in VARIANTS.items():
            ptx = compile_variant(flags, stages).asm["ptx"]
            print(f"== {name}, num_stages={stages}")
            print("  PTX  loop:", ptx_loop(ptx))
            got = None if args.no_sass else sass(ptx)
            if got:
                print("  ptxas    :", got[0])
                print("  SASS loop:", got[1])


if __name__ == "__main__":
    main()
