"""FP8 layerwise casting for any diffusers model: nn.Linear -> Fp8Linear, with diffusers' own
layerwise-casting skip list as the default filter."""
import re

import torch
from torch import nn

from ..modules.fp8_linear import Fp8Linear
from .handle import refuse_wrapped


def default_skip_patterns(model):
    """What diffusers' enable_layerwise_casting skips for this model class: its default patterns,
    the class's _keep_in_fp32_modules and _skip_layerwise_casting_patterns (matched with re.search)."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN)
    patterns += tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    patterns += tuple(getattr(model, "_skip_layerwise_casting_patterns", None) or ())
    return tuple(sorted(set(patterns)))


def fp8_targets(model, config):
    """[(fqn, nn.Linear)] that patch(model, config) turns into Fp8Linear layers, in module order: plain
    nn.Linear modules, not a PEFT adapter's own, accepted by config.filter_fn and by config.fp8_filter_fn (default:
    not matching default_skip_patterns), both given logical_name(fqn). Also what bench.fp8_accuracy measures, so the
    two cannot drift apart."""
    patterns = default_skip_patterns(model)

    def wanted(module, fqn):
        if config.fp8_filter_fn is not None:
            return bool(config.fp8_filter_fn(module, fqn))
        return not any(re.search(p, fqn) for p in patterns)

    adapters = _adapter_layers(model)
    return [(fqn, m) for fqn, m in model.named_modules()
            if type(m) is nn.Linear and id(m) not in adapters
            and config.accepts(m, logical_name(fqn)) and wanted(m, logical_name(fqn))]


def logical_name(fqn):
    """fqn without PEFT's ".base_layer" steps: a LoRA-wrapped Linear is matched by the skip list and filters under
    the name it has without the adapter (blocks.0.attn1.to_q, not blocks.0.attn1.to_q.base_layer)."""
    return ".".join(part for part in fqn.split(".") if part != "base_layer")


def _adapter_layers(model):
    """ids of the Linears that belong to PEFT adapters (a LoRA's lora_A / lora_B): they stay in their dtype, as
    small as they are; the adapter's base_layer is quantized like any Linear and the adapter adds its term on top."""
    ids = set()
    for module in model.modules():
        names = getattr(module, "adapter_layer_names", None)  # peft's BaseTunerLayer
        if names is not None and hasattr(module, "base_layer"):
            for name in names:
                child = getattr(module, name, None)
                if isinstance(child, nn.Module):
                    ids.update(id(m) for m in child.modules())
    return ids


def to_fp8(linear, fqn, config):
    """The Fp8Linear that patch(model, config) installs in place of `linear` (named fqn)."""
    return Fp8Linear.from_linear(linear, config.fp8, name=fqn, fast_accum=config.fp8_fast_accum)


def quantize_linears(model, config, handle):
    targets = fp8_targets(model, config)  # collected first: swapping while iterating would visit the new layers
    modules = dict(model.named_modules())
    for _, linear in targets:  # all before the first swap (with "drop", a swapped layer's weights are gone)
        refuse_wrapped(linear, "replace it")  # (e.g. diffusers' layerwise casting: its weight is stored in fp8)
    if config.fp8_keep_original == "drop" and targets:
        handle.forbid_undo("this patch dropped the original weights (PatchConfig.fp8_keep_original='drop'); reload "
                           "the model instead")
    for fqn, linear in targets:
        parent_name, _, name = fqn.rpartition(".")
        fp8 = to_fp8(linear, fqn, config)
        handle.swap_module(modules[parent_name], name, fp8, f"Linear -> Fp8Linear ({config.fp8})",
                           park=_park_original(linear, fp8, config.fp8_keep_original), fqn=fqn)


def _park_original(linear, fp8, keep):
    """Move the original bf16 weight off the GPU (the point of fp8 storage) and return the step that
    brings it back on undo, to wherever the fp8 layer lives then ("drop": none; the handle forbids undo())."""
    if keep == "drop":
        linear.weight = None
        return None
    linear.weight.data = linear.weight.data.to("cpu")

    def restore():  # where the fp8 layer lives now, in the dtype the model was cast to meanwhile (param_dtype)
        linear.weight.data = linear.weight.data.to(device=fp8.weight.device, dtype=fp8.param_dtype)
    return restore
