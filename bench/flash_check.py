"""Quick look at the CUDA attention kernel before the tests: relative L2 against an fp32 oracle at a few
sizes (partial blocks on both sides), one line each. python -m bench.flash_check"""
import torch

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
