"""The adapters that swap attention processors only (the families beyond Wan): which model class a family's adapter
takes, which of diffusers' processors it replaces with which of vkern's; the checks and fp8 layerwise casting first."""
import importlib

from .fp8 import quantize_linears
from .handle import refuse_context_parallel, refuse_wan_only


def _load(path):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class ProcessorAdapter:
    """model: the diffusers model class's dotted path; processors: diffusers' processor classes' paths;
    make(attention mode, original processor) -> vkern's processor; kind: the handle's summary key. Offers what
    vkern.patch asks of an adapter: MODELS, supports(obj), apply(model, config, handle)."""

    def __init__(self, model, processors, make, kind):
        self.model, self.processors, self.make, self.kind = model, processors, make, kind
        self.MODELS = (model.rpartition(".")[2],)

    def supports(self, obj):
        return isinstance(obj, _load(self.model))

    def apply(self, model, config, handle):
        refuse_wan_only(model, config)
        refuse_context_parallel(model)
        if config.fp8 is not None:
            quantize_linears(model, config, handle)
        originals = tuple(_load(p) for p in self.processors)
        for fqn, module in model.named_modules():
            processor = getattr(module, "processor", None)
            if isinstance(processor, originals) and config.accepts(module, fqn):
                handle.set_processor(module, self.make(config.attention, processor), self.kind)
