"""fastattn: fused, tiled attention kernels for NumPy arrays."""

from . import reference
from .api import (attention, cpu_info, get_num_threads, scaled_dot_product_attention, set_isa,
                  set_num_threads)
from .merge import merge_states
from .mha import MultiHeadAttention

__all__ = ["attention", "scaled_dot_product_attention", "merge_states", "MultiHeadAttention",
           "set_num_threads", "get_num_threads", "cpu_info", "set_isa", "reference"]
__version__ = "0.1.0"
