"""cuflash: exact FlashAttention for CuPy, PyTorch and JAX arrays, compiled at run time by NVRTC."""
from .api import (backward, dropout_mask, flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, forward,
                  warmup)
from .compile import cache_dir
from .merge import merge_states
from .plan import BwdTile, FwdTile, HopperBwdTile, HopperFwdTile

__version__ = "0.4.0"


def cuda_available():
    """True if CuPy can see a CUDA GPU."""
    try:
        import cupy

        return cupy.cuda.is_available()
    except Exception:
        return False


__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "forward", "backward",
           "dropout_mask", "merge_states", "warmup", "cache_dir", "FwdTile", "HopperFwdTile", "BwdTile", "HopperBwdTile", "cuda_available",
           "__version__"]
