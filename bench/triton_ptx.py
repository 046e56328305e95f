"""Compile vkern's Triton kernels for sm_90 on a machine without a GPU and count global loads and
stores by width (free evidence, before any device time): python -m bench.triton_ptx (from the repository root)"""
import collections
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_sm90(fn, signature, constexprs, num_warps, divisible_by_16=(), num_stages=3):
    """triton.compile for sm_90 without a GPU. divisible_by_16: argument names that a real launch would see as
    multiples of 16 (Triton specializes on that at run time; an offline compile must be told)."""
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible_by_16}
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def memory_ops(fn, signature, constexprs, num_warps, divisible_by_16=(), num_stages=3):
    """Global loads and stores by width; loads that a pipelined loop turned into asynchronous copies to shared
    memory are counted as cp.async.<bytes>B (16 B is a full vector)."""
    return ptx_memory_ops(compile_sm90(fn, signature, constexprs, num_warps, divisible_by_16, num_stages).asm["ptx"])


def ptx_memory_ops(ptx):
    """memory_ops' count over PTX text."""
    ops = collections.Counter(re.findall(r"\b((?:ld|st)\.global(?:\.\w+)*)", ptx))
    for size in re.findall(r"\bcp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx):
        ops[f"cp.async.{int(size, 0)}B"] += 1
    return ops


def qk_norm_rope_ptx(heads, head_dim=128, form="per_pair"):
    """(num_warps, PTX) of the QK prologue (RMSNorm across heads) with `form`'s fp32 tables, as a launch at a real
    shape specializes it: "per_pair" (Wan's: one row shared by the heads), or a row per head: "per_element" (LTX's,
    over the whole inner dim), "pairs" (Mochi's) or "split" (LTX-2's). The table's last stride is 1, which Triton
    makes a constexpr at run time."""
    from vkern.triton.qk_norm_rope import ROPE_FORMS, _qk_norm_rope_kernel

    # (the kernel's parameters in order: ASTSource matches the signature to them by position)
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
           "out_ptr": "*bf16", "scale_ptr": "*fp32", "S": "i32", "H": "i32", "stride_xb": "i64", "stride_xs": "i64",
           "stride_fb": "i32", "stride_fs": "i32", "stride_fh": "i32", "stride_fd": "constexpr", "stride_ob": "i64",
           "stride_os": "i64", "stride_og": "i64", "stride_oh": "i64", "heads_per_group": "i32", "eps": "fp32",
           "q_inv": "fp32"}
    consts = {"HEAD_DIM": head_dim, "HAS_ROPE": True, "NORM": True, "PER_HEAD": False, "QUANT": 0,
              "BLOCK_H": triton.next_power_of_2(heads), "BLOCK_D": triton.next_power_of_2(head_dim),
              "EMULATE_RNE": False, "ROPE_FORM": ROPE_FORMS.index(form), "TABLE_PER_HEAD": form != "per_pair",
              "LAYER_NORM": False, "stride_fd": 1}
    warps = max(1, min(8, consts["BLOCK_H"] * consts["BLOCK_D"] // 512))  # (as the launch picks them)
    # (stride_fb: 0 for tables shared by the batch; stride_fh: head_dim, or 0 when shared by the heads)
    aligned = ("x_ptr", "w_ptr", "cos_ptr", "sin_ptr", "out_ptr", "stride_xb", "stride_xs", "stride_fb", "stride_fs",
               "stride_fh", "stride_ob", "stride_os", "stride_og", "stride_oh")
    return warps, compile_sm90(_qk_norm_rope_kernel, sig, consts, warps, aligned).asm["ptx"]


def loads_before_first_barrier(ptx):
    """(global loads before the first bar.sync, global loads in all)."""
    head = ptx.split("bar.sync", 1)[0]
    return len(re.findall(r"\bld\.global", head)), len(re.findall(r"\bld\.global", ptx))


def main():
    for heads, head_dim, form in ((12, 128, "per_pair"), (40, 128, "per_pair"), (32, 64, "per_element"),
                                  (32, 128, "per_element"), (32, 128, "split")):
        warps, ptx = qk_norm_rope_ptx(heads, head_dim, form)
        print(f"qk_norm_rope {form} heads={heads} D={head_dim} warps={warps}:", dict(ptx_memory_ops(ptx)),
              "global loads before the first barrier / all: %d / %d" % loads_before_first_barrier(ptx))

    from vkern.triton.vae_glue import _residual_add_kernel, _rms_norm_silu_kernel

    sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "gamma_ptr": "*bf16", "bias_ptr": "*bf16", "in_bias_ptr": "*bf16",
           "P": "i32", "C": "i32", "stride_xb": "i64", "stride_ob": "i64", "scale": "fp32", "eps": "fp32"}
    add_sig = {"y_ptr": "*bf16", "s_ptr": "*bf16", "bias_ptr": "*fp32", "P": "i32", "C": "i32", "stride_yb": "i64",
               "stride_sb": "i64"}
    for C in (96, 192, 384):  # the Wan VAE's channel counts (multiples of 16: Triton specializes C on that)
        block_c = triton.next_power_of_2(C)
        tile = {"BLOCK_P": max(1, min(64, 4096 // block_c)), "BLOCK_C": block_c, "EMULATE_RNE": False}
        for in_bias in (False, True):
            consts = {**tile, "HAS_BIAS": False, "HAS_IN_BIAS": in_bias, "SILU": True}
            ops = memory_ops(_rms_norm_silu_kernel, sig, consts, 4, ("x_ptr", "out_ptr", "gamma_ptr", "bias_ptr",
                                                                       "in_bias_ptr", "C", "stride_xb", "stride_ob"))
            print(f"rms_norm_silu C={C} in_bias={in_bias}:", dict(ops))
        ops = memory_ops(_residual_add_kernel, add_sig, {**tile, "HAS_BIAS": True}, 4,
                         ("y_ptr", "s_ptr", "bias_ptr", "C", "stride_yb", "stride_sb"))
        print(f"residual_add C={C}:", dict(ops))

    for C, O, dtype, warps, stages in ((96, 96, "bf16", 4, 3), (96, 96, "bf16", 8, 4), (384, 384, "bf16", 8, 3),
                                       (96, 96, "fp32", 4, 3), (96, 96, "fp32", 8, 4), (96, 3, "fp32", 4, 3)):
        ptx = conv_ptx(C, O, dtype, warps, stages)
        print(f"causal_conv3d {dtype} {C}->{O} 3x3x3 warps={warps} stages={stages}:", dict(ptx_memory_ops(ptx)),
              dict(collections.Counter(re.findall(r"wgmma\.mma_async[\w.]*", ptx))))


def conv_ptx(C, O, dtype="bf16", warps=4, stages=3, inputs_tf32=False):
    """PTX of the causal conv kernel (3x3x3 with a cache, zeros padding; fp32: TF32 products, A rounded in the loop
    unless inputs_tf32: the input already rounded by its writer) as a launch
    at the decoder's 480x832 / 240x416 / 120x208 convs specializes it: the channel counts, frame sizes, every stride and
    the padded weight's sizes multiples of 16, and the packed weight's unit stride (vkern/triton/causal_conv.py's
    packed_weight: N in 16 bits, K in fp32) a constexpr."""
    import torch

    from vkern.triton.causal_conv import _causal_conv3d_kernel, block_sizes, packed_weight

    ints = ("C", "O", "T", "H", "W", "To", "Ho", "Wo", "M", "M_LOG2", "Tc", "n_cache", "swk", "swn")
    strides = ("sxb", "sxt", "sxh", "sxw", "scb", "sct", "sch", "scw", "sob")
    sig = {**{n: f"*{dtype}" for n in ("x_ptr", "cache_ptr", "w_ptr", "bias_ptr", "out_ptr")},
           **{n: "i32" for n in ints}, **{n: "i64" for n in strides}}
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    block_n, block_k = block_sizes(C, O, torch_dtype)
    packed = packed_weight(torch.zeros(O, C, 3, 3, 3, dtype=torch_dtype), block_k, block_n)
    unit = {(1, 0): "swk", (0, 1): "swn"}[(int(packed.stride(0) == 1), int(packed.stride(1) == 1))]
    sig[unit] = "constexpr"
    aligned = [n for n in sig if n.endswith("_ptr") or n in strides]
    aligned += [n for n, v in (("C", C), ("O", O)) if v % 16 == 0]
    aligned += ["H", "W", "Ho", "Wo", "swk" if unit == "swn" else "swn"]
    consts = dict(KT=3, KH=3, KW=3, ST=1, SH=1, SW=1, TP=2, HP=1, WP=1, PAD_MODE=0, HAS_BIAS=True, BLOCK_M=128,
                  BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=C % block_k == 0, UPCAST=False, DOT_PRECISION="tf32",
                  ROUND_TF32=dtype == "fp32" and not inputs_tf32, EMULATE_RNE=False, **{unit: 1})
    return compile_sm90(_causal_conv3d_kernel, sig, consts, warps, aligned, stages).asm["ptx"]


if __name__ == "__main__":
    main()
