"""Quick look at the CUDA attention kernel before the tests: relative L2 against an fp32 oracle at a few
sizes (partial blocks on both sides), one line each, head dims 64 and 128; --crossover: its time against
the other backends as the key count grows, to place auto's switch points. python -m bench.flash_check
[--crossover] (with it, also a masked joint attention per backend)"""
import sys

import torch
import torch.nn.functional as F

import vkern.ops
from vkern.reference import attention as ref

for D in (128, 64):
    for B, H, Sq, Skv in [(1, 1, 128, 128), (1, 1, 64, 128), (1, 1, 128, 256), (1, 1, 200, 300), (2, 3, 4097, 4097)]:
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for S in (Sq, Skv, Skv))
        out, lse = vkern.ops.attention(q, k, v, return_lse=True, backend="cuda")
        torch.cuda.synchronize()
        oracle, lse_ref = ref.attention_lse(q, k, v, dtype=torch.float32)
        err = ((out.float() - oracle).norm() / oracle.norm()).item()
        lse_err = (lse - lse_ref).abs().max().item()
        print(f"D{D} B{B} H{H} {Sq}x{Skv}: rel L2 {err:.3g}, lse max err {lse_err:.3g}, backend "
              f"{vkern.ops._backend.last_choice['attention']}", flush=True)


def crossover(heads, queries, D, key_counts, backends):
    """Median ms of each backend per key count (triton.testing.do_bench), printed with the CUDA kernel's speed
    relative to each."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    sdpa = {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION}
    q = torch.randn(1, queries, heads, D, device="cuda", dtype=torch.bfloat16)
    for kv in key_counts:
        k, v = (torch.randn(1, kv, heads, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ms = {}
        for name in backends:
            if name in sdpa:
                def run(b=sdpa[name]):
                    with sdpa_kernel([b]):
                        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
            else:
                def run(name=name):
                    return vkern.ops.attention(q, k, v, backend=name)
            ms[name] = do_bench(run, return_mode="median")
        rel = ", ".join(f"{b} {ms[b]:.3f} ms ({ms[b] / ms['cuda']:.3f}x)" for b in backends if b != "cuda")
        print(f"D{D} {heads} heads x {queries} queries, keys {kv:6d}: cuda {ms['cuda']:.3f} ms; {rel}", flush=True)


def masked(heads, video, text, valid_text, D=128):
    """Joint attention with padded text (HunyuanVideo): keys = video tokens + text tokens of which the first
    valid_text are real; median ms per backend of vkern.ops.attention with that key-padding mask."""
    from triton.testing import do_bench

    S = video + text
    q, k, v = (torch.randn(1, S, heads, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.arange(S, device="cuda")[None, :] < video + valid_text
    ms = {b: do_bench(lambda b=b: vkern.ops.attention(q, k, v, key_padding_mask=mask, backend=b), return_mode="median")
          for b in ("cuda", "triton", "sdpa")}
    flops = 4 * heads * S * (video + valid_text) * D
    print(f"masked D{D} {heads} heads x {S} tokens ({valid_text} of {text} text keys real): " +
          ", ".join(f"{b} {t:.3f} ms ({flops / t / 1e9:.0f} TFLOP/s)" for b, t in ms.items()), flush=True)


if __name__ == "__main__" and "--crossover" in sys.argv:
    # Wan-14B 480p queries (40 heads, D = 128): where auto should switch from cuDNN to the CUDA kernel.
    crossover(40, 32760, 128, (512, 1024, 2048, 4096, 8192, 16384), ("cuda", "cudnn"))
    # Head dim 64 (LTX-Video: 32 heads x 7392 tokens, 128 text keys; CogVideoX: 48 x 17776 joint tokens).
    crossover(32, 7392, 64, (128, 512, 2048, 7392, 17776), ("cuda", "cudnn", "fa2", "triton"))
    # Key-padding mask (HunyuanVideo's padded text): the CUDA kernel's mask bits against the Triton kernel's mask
    # and SDPA with the mask as attn_mask.
    masked(24, 32768, 256, 200)
