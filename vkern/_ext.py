"""Loads the compiled extension vkern._C if it was built, and remembers why not otherwise."""
import importlib

_C = None
LOAD_ERROR = None
try:
    _C = importlib.import_module("vkern._C")
except ImportError as err:  # not built (no nvcc at install time) or built for another Python
    LOAD_ERROR = str(err)


def cuda_ext():
    """The compiled module, or None."""
    return _C
