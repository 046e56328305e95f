"""bench.timing.param_bytes, the weight memory of bench rows (param_gib): the bytes of a model's parameter
and buffer storages, each storage once, fp8 scales included; on the tiny Wan, bf16 vs vkern fp8 storage."""
import pytest
import torch

import vkern
from bench.timing import param_bytes
from vkern import models
from vkern.modules.fp8_linear import Fp8Linear


def tensors(module):
    return list(module.parameters()) + list(module.buffers())


def test_tiny_wan_bf16_vs_fp8_storage():
    """Unpatched: the sum of every parameter's and buffer's bytes (the tiny Wan shares no storage).
    Patched (fp8 storage, originals dropped): less by exactly each quantized Linear's bf16 weight, plus
    its e4m3 weight (1 byte an element) and its fp32 scales."""
    torch.manual_seed(0)
    model = models.build_wan_transformer("tiny", torch.bfloat16)
    ts = tensors(model)
    assert len({t.untyped_storage().data_ptr() for t in ts}) == len(ts)
    bf16 = param_bytes(model)
    assert bf16 == sum(t.numel() * t.element_size() for t in ts)
    vkern.patch(model, vkern.PatchConfig(fp8="storage", fp8_keep_original="drop"))
    linears = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert linears
    expected = bf16
    for m in linears:
        assert m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32
        expected += -2 * m.weight.numel() + m.weight.numel() + 4 * m.weight_scale.numel()
    fp8 = param_bytes(model)
    assert fp8 == expected
    # The tiny model is mostly what the fp8 skip list keeps in bf16/fp32 (embeddings, norms, proj_out),
    # so its ratio is far above the real models' ~52% (bench/NOTES.md); only the direction is general.
    assert 0.5 < fp8 / bf16 < 0.8, fp8 / bf16


def test_shared_storage_counts_once():
    lin = torch.nn.Linear(16, 8, bias=False)  # fp32: 512 bytes
    module = torch.nn.Module()
    module.a = lin
    module.b = torch.nn.Linear(16, 8, bias=False)
    module.b.weight = lin.weight  # tied: the same Parameter
    module.register_buffer("view", lin.weight.detach()[:4])  # another tensor on the same storage
    module.c = torch.nn.Linear(16, 8, bias=False)
    module.c.weight = torch.nn.Parameter(lin.weight.detach().view(8, 16))  # another Parameter, same storage
    assert param_bytes(module) == 512
    big = torch.zeros(1000)
    module.register_buffer("part", big[10:20])  # a slice: its storage counts whole
    assert param_bytes(module) == 512 + 4000
    module.register_buffer("empty", torch.empty(0))
    assert param_bytes(module) == 512 + 4000


def test_meta_tensors_are_an_error():
    with torch.device("meta"):
        module = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta"):
        param_bytes(module)
