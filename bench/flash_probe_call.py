"""One call of each CUDA attention form, for ncu and compute-sanitizer (bench/flash_ncu.sh):
    python -m bench.flash_probe_call [--small] [--int8pv]
default: wan1.3b-480p sizes (12 heads x 32760 tokens, D 128), e4m3 then bf16; --small: 2 heads, 300 queries x
700 keys with a key-padding mask (sanitizers are slow); --int8pv: the int8 P/V form (int8 Q/K, u8 V, smoothed, as
the Wan processor calls it) instead of e4m3, at wan14b-480p sizes (40 heads: 10240 tiles, whose last wave of 76 is
not split, so that the one kernel profiled is the default instantiation)."""
import argparse
import os

import torch

import vkern.ops


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--int8pv", action="store_true")
    args = parser.parse_args()
    H, Sq, Skv = (2, 300, 700) if args.small else (40 if args.int8pv else 12, 32760, 32760)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, S, H, 128, device="cuda", dtype=torch.bfloat16) for S in (Sq, Skv, Skv))
    mask = None
    if args.small:
        mask = torch.rand(1, Skv, device="cuda") > 0.2
    os.environ["VKERN_ATTENTION_8BIT_BACKEND"] = "cuda"
    os.environ["VKERN_ATTENTION_BACKEND"] = "cuda"
    if args.int8pv:
        q8, qs = vkern.ops.qk_norm_rope(q.flatten(2), None, 0.0, H, quant="int8")
        k8, ks = vkern.ops.k_to_8bit(k, "int8", mask)
        offset = vkern.ops.value_offset(v, mask)
        vt, vs = vkern.ops.v_to_8bit(v, "u8", mask, offset=offset)
        out8 = vkern.ops.attention_prequantized(q8, qs, k8, ks, vt, vs, key_padding_mask=mask, out_dtype=q.dtype,
                                                v_offset=offset)
    else:
        q8, qs = vkern.ops.qk_norm_rope(q.flatten(2), None, 0.0, H, quant="e4m3")
        k8, ks = vkern.ops.k_to_e4m3(k, mask)
        vt, vs = vkern.ops.v_to_e4m3(v, mask)
        out8 = vkern.ops.attention_prequantized(q8, qs, k8, ks, vt, vs, key_padding_mask=mask, out_dtype=q.dtype)
    out = vkern.ops.attention(q, k, v, key_padding_mask=mask)
    torch.cuda.synchronize()
    err = ((out8.float() - out.float()).norm() / out.float().norm()).item()
    print(f"H {H} Sq {Sq} Skv {Skv}: {'int8pv' if args.int8pv else 'fp8'} vs bf16 rel L2 {err:.4f}")


if __name__ == "__main__":
    main()
