"""LoRA adapters (PEFT, as diffusers' load_lora_weights / load_lora_adapter installs them) on patched models:
loaded before or after vkern.patch they give the unpatched model's output, the LoRA scale in attention_kwargs is
honoured on vkern's own forwards, fp8 layerwise casting quantizes the adapters' base layers only (the skip list
matched under the names without PEFT's ".base_layer") and keeps the adapters in their dtype, and undo() refuses where
PEFT moved a swapped-in layer. Every family vkern patches, in fp32 on the CPU; a few in bf16 on the CPU and on
vkern's GPU kernels."""
import copy
import re

import pytest
import torch

from peft.utils import get_peft_model_state_dict  # (peft: a test extra, pyproject's [test])

import vkern
from bench.lora import add_random_lora
from vkern import models

from . import test_model_families as families
from .tolerance import assert_within_torch_error, rel_l2

WAN = {"wan": (models.build_wan_transformer, models.transformer_inputs),
       "wan-vace": (models.build_wan_vace_transformer, models.wan_vace_transformer_inputs),
       "wan-animate": (models.build_wan_animate_transformer, models.wan_animate_transformer_inputs),
       "chronoedit": (models.build_chronoedit_transformer, models.chronoedit_transformer_inputs)}
NAMES = [*WAN, *families.FAMILIES]
SCALES = (None, 0.5)  # None: no attention_kwargs (the LoRA at its full weight)


def build(name):
    if name in WAN:
        torch.manual_seed(0)
        model = WAN[name][0]("tiny", torch.float32, "cpu")
        return model, WAN[name][1](model, "tiny", torch.float32, "cpu")
    model = families.build(name)
    return model, families.inputs_for(name, model)


def lora_state_dict(model, size=0.1, seed=1):
    """A rank-4 LoRA on every nn.Linear of `model` (each layer's B @ A `size` times its weight's norm), in the form
    diffusers' load_lora_adapter takes."""
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    source = add_random_lora(copy.deepcopy(model), 4, names, size, name="source", seed=seed)
    return get_peft_model_state_dict(source, adapter_name="source")


def load_lora(model, state_dict, name="lora"):
    model.load_lora_adapter(copy.deepcopy(state_dict), adapter_name=name, prefix=None)
    return model


def run(model, inputs, scale=None):
    kwargs = {} if scale is None else {"attention_kwargs": {"scale": scale}}
    with torch.no_grad():
        return model(**inputs, **kwargs).sample


@pytest.mark.parametrize("order", ["lora-then-patch", "patch-then-lora"])
@pytest.mark.parametrize("name", NAMES)
def test_lora_output_and_scale_match_the_unpatched_model(name, order):
    model, inputs = build(name)
    lora = lora_state_dict(model)
    want = load_lora(copy.deepcopy(model), lora)
    patched = copy.deepcopy(model)
    if order == "lora-then-patch":
        load_lora(patched, lora)
    vkern.patch(patched)
    if order == "patch-then-lora":
        load_lora(patched, lora)
    full, half = (run(want, inputs, scale) for scale in SCALES)
    # a LoRA the patched model dropped, or a scale it ignored, would be this far off
    assert rel_l2(full, run(model, inputs)) > 0.02 and rel_l2(half, full) > 0.01
    # fp32 on both sides: vkern's CPU paths differ from diffusers' ops by rounding only
    assert rel_l2(run(patched, inputs), full) < 1e-5
    assert rel_l2(run(patched, inputs, 0.5), half) < 1e-5


@pytest.mark.parametrize("name", list(WAN)[:2])
def test_the_lora_scale_runs_on_vkerns_forward_and_on_the_fallback(name, monkeypatch):
    """Wan's and VACE's model forwards are vkern's own: attention_kwargs' scale must not send the call to diffusers'
    forward (which would lose vkern's fused output norm and VACE's hint order), and where vkern does hand the call
    to diffusers' forward (gradient checkpointing, autograd) the scale must reach diffusers' LoRA-scale decorator."""
    model, inputs = build(name)
    lora = lora_state_dict(model)
    want = run(load_lora(copy.deepcopy(model), lora), inputs, 0.5)
    patched = load_lora(copy.deepcopy(model), lora)
    vkern.patch(patched)
    diffusers_forward = type(patched).forward
    with monkeypatch.context() as m:
        m.setattr(type(patched), "forward", lambda *a, **k: pytest.fail("diffusers' forward ran"))
        assert rel_l2(run(patched, inputs, 0.5), want) < 1e-5
    assert type(patched).forward is diffusers_forward
    patched.gradient_checkpointing = True  # (under no_grad diffusers checkpoints nothing: same output)
    assert rel_l2(run(patched, inputs, 0.5), want) < 1e-5


def dequantized_copy(model, patched):
    """`model` with each Linear that `patched` turned into an Fp8Linear given that layer's dequantized fp8 weight:
    what fp8 storage computes, in plain PyTorch."""
    from vkern.patch.fp8 import logical_name

    reference = copy.deepcopy(model)
    layers = dict(reference.named_modules())
    for fqn, module in patched.named_modules():
        if type(module).__name__ == "Fp8Linear":
            weight = module.weight.float() * module.weight_scale
            fqn = logical_name(fqn)
            layers[fqn].weight.data = weight.to(layers[fqn].weight.dtype)
    return reference


def fp8_names(model):
    from vkern.patch.fp8 import logical_name

    return sorted(logical_name(n) for n, m in model.named_modules() if type(m).__name__ == "Fp8Linear")


@pytest.mark.parametrize("name", ["wan", "wan-animate", "hunyuan", "ltx2"])
def test_fp8_storage_quantizes_the_base_layers_and_keeps_the_adapters(name):
    model, inputs = build(name)
    lora = lora_state_dict(model)
    plain = copy.deepcopy(model)
    vkern.patch(plain, vkern.PatchConfig(fp8="storage"))
    patched = load_lora(copy.deepcopy(model), lora)
    handle = vkern.patch(patched, vkern.PatchConfig(fp8="storage"))
    # The same layers as without the LoRA (PEFT's lora_A / lora_B stay nn.Linear, in fp32 here), named alike
    assert fp8_names(patched) == fp8_names(plain)
    adapters = [m for n, m in patched.named_modules() if re.search(r"\.lora_[AB]\.lora$", n)]
    assert adapters and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in adapters)
    # = the model with the fp8 weights dequantized, plus the same LoRA in fp32, at every scale
    reference = load_lora(dequantized_copy(model, patched), lora)
    for scale in SCALES:
        assert rel_l2(run(patched, inputs, scale), run(reference, inputs, scale)) < 1e-5, scale
    handle.undo()  # the adapters stay; the base layers are the original Linears again
    assert rel_l2(run(patched, inputs), run(load_lora(copy.deepcopy(model), lora), inputs)) == 0


def test_fp8_patched_layers_take_no_new_lora_and_unloading_blocks_undo():
    """After an fp8 patch PEFT refuses to wrap an Fp8Linear (load LoRAs before patching, or fuse them first); a LoRA
    unloaded after the patch leaves the Fp8Linears where the LoRA layers were, where undo() cannot reach them: it
    says so and changes nothing."""
    model, inputs = build("wan")
    lora = lora_state_dict(model)
    quantized = copy.deepcopy(model)
    vkern.patch(quantized, vkern.PatchConfig(fp8="storage"))
    with pytest.raises(ValueError, match="Fp8Linear"):
        load_lora(quantized, lora)

    patched = load_lora(copy.deepcopy(model), lora)
    handle = vkern.patch(patched, vkern.PatchConfig(fp8="storage"))
    before = run(patched, inputs, 0.0)
    patched.unload_lora()
    assert type(patched.blocks[0].attn1.to_q).__name__ == "Fp8Linear"
    with pytest.raises(RuntimeError, match=r"moved or replaced since \(first: blocks\.0\.[\w.]+\.base_layer"):
        handle.undo()
    assert handle.active and torch.equal(run(patched, inputs), before)


@pytest.mark.parametrize("fp8", [None, "compute"])
@pytest.mark.parametrize("name", ["wan", "wan-vace", "hunyuan", "ltx"])
def test_lora_in_bf16(name, fp8, device):
    """bf16 (on a GPU at head dim 128 or the family's: vkern's CUDA kernels): the patched model with a LoRA within 2x
    of PyTorch's own bf16 error against the fp32 LoRA model, at both scales; with fp8 compute GEMMs under the base
    layers (activations quantized too), fp8's own error on the model without the LoRA, within 1.5x."""
    overrides = {} if device == "cpu" else dict(attention_head_dim=128) if name in WAN else \
        families.FAMILIES[name].gpu_overrides
    if name in WAN:
        torch.manual_seed(0)
        model32 = WAN[name][0]("tiny", torch.float32, device, **overrides)
        inputs = WAN[name][1](model32, "tiny", torch.float32, device)
    else:
        model32 = families.build(name, torch.float32, device, **overrides)
        inputs = families.inputs_for(name, model32, torch.float32, device)
    # (fp8: a LoRA of 30% of each weight's norm, so that its effect stands above fp8's own error on these models)
    lora, base = lora_state_dict(model32, size=0.3 if fp8 else 0.1), run(model32, inputs)
    model16 = models.cast_like_from_pretrained(copy.deepcopy(model32), torch.bfloat16)
    inputs16 = families.to_dtype(inputs, torch.bfloat16)
    if fp8:  # fp8's own error on this model, without the LoRA
        plain = copy.deepcopy(model16)
        vkern.patch(plain, vkern.PatchConfig(fp8=fp8))
        fp8_error = rel_l2(run(plain, inputs16).float(), base)
    oracle, torch16 = load_lora(model32, lora), load_lora(copy.deepcopy(model16), lora)
    patched = load_lora(model16, lora)
    vkern.patch(patched, vkern.PatchConfig(fp8=fp8))
    for scale in SCALES:
        want, got = run(oracle, inputs, scale), run(patched, inputs16, scale).float()
        if fp8 is None:
            assert_within_torch_error(got, want, run(torch16, inputs16, scale).float())
        else:  # fp8's error as without the LoRA (a LoRA lost on the way would add its whole effect)
            assert rel_l2(got, want) < 1.5 * fp8_error < rel_l2(want, base), (rel_l2(got, want), fp8_error)


FAST = "PEFT LoRA Linear.forward -> LoRA accumulated in place"


def peft_forward_calls(monkeypatch):
    """Counts the calls of PEFT's own LoRA Linear forward (vkern's falls back to it)."""
    from peft.tuners.lora import Linear

    calls, peft_forward = [], Linear.forward
    monkeypatch.setattr(Linear, "forward", lambda *a, **k: calls.append(1) or peft_forward(*a, **k))
    return calls


def test_lora_layers_loaded_before_the_patch_run_vkerns_forward(monkeypatch):
    """Every LoRA Linear present at the patch gets vkern's forward (PEFT's is not called); a LoRA added after the
    patch, in the same layers, is run by it too (it reads the active adapters each call), with adapter weights, and
    disabling the LoRA or merging it goes to PEFT's forward; undo() gives PEFT's forward back."""
    model, inputs = build("wan")
    first, second = lora_state_dict(model), lora_state_dict(model, seed=2)
    want = load_lora(copy.deepcopy(model), first)
    patched = load_lora(copy.deepcopy(model), first)
    handle = vkern.patch(patched)
    layers = sum(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in patched.modules())
    assert handle.summary[FAST] == layers > 0
    calls = peft_forward_calls(monkeypatch)

    def patched_run(expected):  # -> PEFT forward calls in the patched model's run
        calls.clear()
        assert rel_l2(run(patched, inputs), expected) < 1e-5
        return len(calls)
    assert patched_run(run(want, inputs)) == 0
    for m in (want, patched):
        load_lora(m, second, "second")
        m.set_adapters(["lora", "second"], weights=[0.7, 0.4])
    assert patched_run(run(want, inputs)) == 0
    for m in (want, patched):
        m.fuse_lora()
    assert patched_run(run(want, inputs)) == layers
    for m in (want, patched):
        m.unfuse_lora()
        m.disable_lora()
    assert patched_run(run(model, inputs)) == layers
    handle.undo()
    assert all("forward" not in m.__dict__ for m in patched.modules() if hasattr(m, "lora_A"))


@pytest.mark.parametrize("case", ["dora", "hook", "autograd", "fp32-adapter"])
def test_what_vkerns_lora_forward_leaves_to_peft(case, monkeypatch):
    """DoRA, a hook on the base layer (it must see the base output unchanged: vkern's forward adds in place), autograd
    recording and adapters in another dtype than the result run PEFT's forward, with PEFT's output."""
    from peft import LoraConfig

    model, inputs = build("wan")
    if case == "fp32-adapter":
        model = models.cast_like_from_pretrained(model, torch.bfloat16)
        inputs = families.to_dtype(inputs, torch.bfloat16)
    targets = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and ".ffn." in n]
    torch.manual_seed(3)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False,
                                 use_dora=case == "dora"), "lora")
    if case == "fp32-adapter":
        for m in model.modules():
            if hasattr(m, "lora_A"):
                m.lora_A.float(), m.lora_B.float()
    seen = []
    if case == "hook":  # it keeps the base layer's output itself, not a copy
        model.blocks[0].ffn.net[2].base_layer.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
    want = run(model, inputs)
    patched = copy.deepcopy(model)
    vkern.patch(patched)
    calls = peft_forward_calls(monkeypatch)
    if case == "autograd":
        patched.requires_grad_(True)
        got = patched(**inputs).sample.detach()
    else:
        got = run(patched, inputs)
    assert len(calls) == (1 if case == "hook" else len(targets))  # (hook: only the hooked layer's)
    # (bf16: vkern's kernels and diffusers' ops round differently; the check here is the count above)
    assert rel_l2(got, want) < (1e-5 if case != "fp32-adapter" else 1e-2)
    if case == "hook":  # the patched model's base layer output as it left the layer, not added to in place
        base, x, out = seen[-1]
        assert len(seen) == 2 and torch.equal(out, torch.nn.functional.linear(x, base.weight, base.bias))
