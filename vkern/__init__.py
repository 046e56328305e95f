"""vkern: fused CUDA/Triton kernels for open video diffusion models, patched into diffusers.

    import vkern
    handle = vkern.patch(pipe)      # e.g. a WanPipeline; vkern.supported_models() lists the models it takes
    ...
    handle.undo()                   # the original modules, bit-identical outputs
    vkern.info()                    # versions, build, GPU, the backend each op would use
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402
from .info import info  # noqa: E402
from .patch import PatchConfig, SPConfig, patch, supported_models  # noqa: E402

__all__ = ["ops", "info", "patch", "PatchConfig", "SPConfig", "supported_models", "__version__"]
