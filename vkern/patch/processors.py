"""The adapters of the families beyond Wan: which model class a family's adapter takes, which of diffusers' processors
it replaces with which of vkern's, and (where vkern has one) which block class gets a fused forward
(PatchConfig.fused_block); the checks and fp8 layerwise casting first."""
import functools
import importlib

from .fp8 import quantize_linears
from .handle import refuse_context_parallel, refuse_wan_only


def _load(path):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class ProcessorAdapter:
    """models: the diffusers model classes' dotted paths (one, or a tuple); processors: diffusers' processor classes'
    paths; make(the PatchConfig, original processor) -> vkern's processor; kind: the handle's summary key; blocks:
    (a block class's path, its fused forward(block, *args, **kwargs)) pairs, each forward installed on each such
    block under fused_block (fused_by_default: the family's choice when fused_block is None). Offers what
    vkern.patch asks of an adapter: MODELS, supports(obj), apply(model, config, handle)."""

    def __init__(self, models, processors, make, kind, blocks=(), fused_by_default=True):
        self.models = (models,) if isinstance(models, str) else tuple(models)
        self.processors, self.make, self.kind, self.blocks = processors, make, kind, tuple(blocks)
        self.fused_by_default = fused_by_default
        self.MODELS = tuple(m.rpartition(".")[2] for m in self.models)

    def supports(self, obj):
        return isinstance(obj, tuple(_load(m) for m in self.models))

    def apply(self, model, config, handle):
        refuse_wan_only(model, config)
        refuse_context_parallel(model)
        if config.fp8 is not None:
            quantize_linears(model, config, handle)
        originals = tuple(_load(p) for p in self.processors)
        for fqn, module in model.named_modules():
            processor = getattr(module, "processor", None)
            if isinstance(processor, originals) and config.accepts(module, fqn):
                handle.set_processor(module, self.make(config, processor), self.kind)
        for path, fused in self.blocks if config.fused_blocks(self.fused_by_default) else ():
            block_class, kind = _load(path), f"{path.rpartition('.')[2]}.forward -> fused glue"
            for fqn, module in model.named_modules():
                # type(), not isinstance: a subclass may have a forward of its own
                if type(module) is block_class and config.accepts(module, fqn):
                    # An instance forward, as for Wan: diffusers' features that match the class name
                    # (compile_repeated_blocks, _no_split_modules) keep working.
                    handle.override_forward(module, functools.partial(fused, module), kind)
