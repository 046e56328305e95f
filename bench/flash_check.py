"""Quick look at the CUDA attention kernel before the tests: relative L2 against an fp32 oracle at a few
sizes (partial blocks on both sides), one line each; --crossover: its time against cuDNN's as the key count
grows. python -m bench.flash_check [--crossover]"""
import sys

import torch
import torch.nn.functional as F

import vkern.ops
from vkern.reference import attention as ref

for B, H, Sq, Skv in [(1, 1, 128, 128), (1, 1, 64, 128), (1, 1, 128, 256), (1, 1, 200, 300), (2, 3, 4097, 4097)]:
    q, k, v = (torch.randn(B, S, H, 128, device="cuda", dtype=torch.bfloat16) for S in (Sq, Skv, Skv))
    out, lse = vkern.ops.attention(q, k, v, return_lse=True, backend="cuda")
    torch.cuda.synchronize()
    oracle, lse_ref = ref.attention_lse(q, k, v, dtype=torch.float32)
    err = ((out.float() - oracle).norm() / oracle.norm()).item()
    lse_err = (lse - lse_ref).abs().max().item()
    print(f"B{B} H{H} {Sq}x{Skv}: rel L2 {err:.3g}, lse max err {lse_err:.3g}, backend "
          f"{vkern.ops._backend.last_choice['attention']}", flush=True)

if __name__ == "__main__" and "--crossover" in sys.argv:
    # CUDA kernel vs cuDNN as the key count grows (Wan-14B 480p queries, 40 heads): where auto should switch.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    q = torch.randn(1, 32760, 40, 128, device="cuda", dtype=torch.bfloat16)
    for kv in (512, 1024, 2048, 4096, 8192, 16384):
        k, v = (torch.randn(1, kv, 40, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cuda = do_bench(lambda: vkern.ops.attention(q, k, v, backend="cuda"), return_mode="median")
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            cudnn = do_bench(lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))),
                             return_mode="median")
        print(f"keys {kv:6d}: cuda {cuda:.3f} ms, cudnn {cudnn:.3f} ms, cuda/cudnn speed {cudnn / cuda:.3f}x")
