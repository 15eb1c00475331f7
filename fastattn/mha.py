"""Multi-head attention layer (projections around fastattn.attention), loadable from PyTorch."""

from numbers import Integral

import numpy as np

from .api import attention

__all__ = ["MultiHeadAttention"]

_SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _linear(x, weight, bias):
    """x @ weight^T + bias, with weight (out_features, in_features) as in torch.nn.Linear."""
    y = x @ weight.T
    return y if bias is None else y + bias


class MultiHeadAttention:
    """Inference-only multi-head attention on batch-first NumPy arrays, like
    torch.nn.MultiheadAttention(batch_first=True) with need_weights=False, plus grouped-query
    attention (num_kv_heads < num_heads).

    Weights follow torch.nn.Linear's (out_features, in_features) layout: q_proj_weight
    (embed_dim, embed_dim), k_proj_weight (num_kv_heads * head_dim, kdim), v_proj_weight
    (num_kv_heads * head_dim, vdim), out_proj_weight (embed_dim, embed_dim), and the biases
    q_proj_bias, k_proj_bias, v_proj_bias, out_proj_bias (None when bias=False). Query head h reads
    key/value head h // (num_heads // num_kv_heads).

    Weights start xavier-uniform and biases zero, drawn from np.random.default_rng(seed): `seed`
    is an int or a numpy.random.Generator, and the default 0 makes every new instance the same.
    Use from_torch to load trained weights.
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, bias=True, kdim=None, vdim=None,
                 dtype=np.float32, seed=0):
        self.embed_dim = _positive_int(embed_dim, "embed_dim")
        self.num_heads = _positive_int(num_heads, "num_heads")
        self.num_kv_heads = _positive_int(self.num_heads if num_kv_heads is None else num_kv_heads,
                                          "num_kv_heads")
        self.kdim = _positive_int(embed_dim if kdim is None else kdim, "kdim")
        self.vdim = _positive_int(embed_dim if vdim is None else vdim, "vdim")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads} "
                             f"(each key/value head serves an equal group of query heads)")
        if np.dtype(dtype) not in _SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
        self.dtype = np.dtype(dtype)
        self.head_dim = self.embed_dim // self.num_heads

        rng = np.random.default_rng(seed)
        kv_dim = self.num_kv_heads * self.head_dim

        def xavier_uniform(out_features, in_features):
            bound = np.sqrt(6.0 / (in_features + out_features))
            return rng.uniform(-bound, bound, (out_features, in_features)).astype(self.dtype)

        def zeros_if_bias(size):
            return np.zeros(size, self.dtype) if bias else None

        self.q_proj_weight = xavier_uniform(self.embed_dim, self.embed_dim)
        self.k_proj_weight = xavier_uniform(kv_dim, self.kdim)
        self.v_proj_weight = xavier_uniform(kv_dim, self.vdim)
        self.out_proj_weight = xavier_uniform(self.embed_dim, self.embed_dim)
        self.q_proj_bias = zeros_if_bias(self.embed_dim)
        self.k_proj_bias = zeros_if_bias(kv_dim)
        self.v_proj_bias = zeros_if_bias(kv_dim)
        self.out_proj_bias = zeros_if_bias(self.embed_dim)

    @classmethod
    def from_torch(cls, module, *, dtype=None):
        """A copy of a torch.nn.MultiheadAttention's weights, in `dtype` (default: the module's,
        which must then be float32 or float64).

        The module's batch_first flag does not change its weights; call the result with batch-first
        inputs either way. Dropout is ignored (inference only). Modules with add_bias_kv=True or
        add_zero_attn=True are refused.
        """
        import torch  # only callers converting a torch module pay for importing torch

        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.bias_v is not None:
            raise ValueError("module has bias_k/bias_v (add_bias_kv=True), which MultiHeadAttention does not "
                             "support")
        if module.add_zero_attn:
            raise ValueError("module has add_zero_attn=True, which MultiHeadAttention does not support")
        if dtype is None:
            torch_dtype = module.out_proj.weight.dtype
            dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(torch_dtype)
            if dtype is None:
                raise TypeError(f"module has dtype {torch_dtype}; pass dtype=np.float32 or np.float64 to convert "
                                f"its weights")

        def array(tensor):
            # float64 holds every torch float exactly, and numpy() has no bfloat16
            return None if tensor is None else tensor.detach().cpu().to(torch.float64).numpy().astype(dtype)

        layer = cls(module.embed_dim, module.num_heads, bias=module.in_proj_bias is not None,
                    kdim=module.kdim, vdim=module.vdim, dtype=dtype)
        if module.in_proj_weight is not None:  # kdim == vdim == embed_dim: torch packs q, k, v weights
            packed = array(module.in_proj_weight)  # (3 * embed_dim, embed_dim)
            layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight = np.split(packed, 3)
        else:
            layer.q_proj_weight = array(module.q_proj_weight)
            layer.k_proj_weight = array(module.k_proj_weight)
            layer.v_proj_weight = array(module.v_proj_weight)
        if module.in_proj_bias is not None:
            layer.q_proj_bias, layer.k_proj_bias, layer.v_proj_bias = np.split(array(module.in_proj_bias), 3)
        layer.out_proj_weight = array(module.out_proj.weight)
        layer.out_proj_bias = array(module.out_proj.bias)
        return layer

    def __call__(self, query, key=None, value=None, *, attn_mask=None, key_padding_mask=None, is_causal=False):
        """Attention of query (B, L, embed_dim) over key (B, S, kdim) and value (B, S, vdim).

        key defaults to query and value to key (self-attention). All three must have the module's
        dtype; nothing is converted. Returns a new (B, L, embed_dim) array.

        attn_mask (L, S) or (B * num_heads, L, S) follows scaled_dot_product_attention: bool True
        = may attend (the opposite of torch.nn.MultiheadAttention's bool attn_mask), or a float
        mask of the module's dtype added to the scaled scores. key_padding_mask, bool (B, S), has
        torch's meaning: True marks a padding key to ignore. is_causal=True hides key j from query
        i when j > i, together with attn_mask if given (unlike torch, no mask is needed with it).
        A query row that sees no key gets zero attention output, so its result is out_proj_bias.
        """
        key = query if key is None else key
        value = key if value is None else value
        self._check_input(query, "query", "embed_dim", self.embed_dim)
        self._check_input(key, "key", "kdim", self.kdim)
        self._check_input(value, "value", "vdim", self.vdim)
        batch, seqlen_q, _ = query.shape
        for x, name in ((key, "key"), (value, "value")):
            if x.shape[0] != batch:
                raise ValueError(f"{name} has batch size {x.shape[0]} but query has {batch}")
        seqlen_k = key.shape[1]
        if value.shape[1] != seqlen_k:
            raise ValueError(f"value has {value.shape[1]} positions (dim 1) but key has {seqlen_k}")
        if not isinstance(is_causal, (bool, np.bool_)):
            raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
        mask = self._combined_mask(attn_mask, key_padding_mask, batch, seqlen_q, seqlen_k)

        q = self._split_heads(_linear(query, self.q_proj_weight, self.q_proj_bias), self.num_heads)
        k = self._split_heads(_linear(key, self.k_proj_weight, self.k_proj_bias), self.num_kv_heads)
        v = self._split_heads(_linear(value, self.v_proj_weight, self.v_proj_bias), self.num_kv_heads)
        heads = attention(q, k, v, mask, causal=bool(is_causal))  # (B, num_heads, L, head_dim)
        merged = heads.transpose(0, 2, 1, 3).reshape(batch, seqlen_q, self.embed_dim)
        return _linear(merged, self.out_proj_weight, self.out_proj_bias)

    def _check_input(self, x, name, dim_name, last_dim):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
        if x.ndim != 3:
            raise ValueError(f"{name} must have 3 dims (batch, positions, features), got shape {x.shape}")
        if x.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the module has {self.dtype}; convert it "
                            f"explicitly with astype, or build the module with dtype={x.dtype}")
        if x.shape[-1] != last_dim:
            raise ValueError(f"{name} has {x.shape[-1]} features (last dim) but the module's {dim_name} is "
                             f"{last_dim}")

    def _split_heads(self, x, num_heads):
        """(B, L, num_heads * head_dim) -> a (B, num_heads, L, head_dim) view."""
        batch, seqlen, _ = x.shape
        return x.reshape(batch, seqlen, num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def _combined_mask(self, attn_mask, key_padding_mask, batch, seqlen_q, seqlen_k):
        """One mask broadcastable to (B, num_heads, L, S) for fastattn.attention, or None."""
        if attn_mask is not None:
            if not isinstance(attn_mask, np.ndarray):
                raise TypeError(f"attn_mask must be a NumPy array or None, got {type(attn_mask).__name__}")
            if attn_mask.dtype not in (np.dtype(np.bool_), self.dtype):
                raise TypeError(f"attn_mask has dtype {attn_mask.dtype}; use bool or the module's dtype "
                                f"{self.dtype}")
            shapes = ((seqlen_q, seqlen_k), (batch * self.num_heads, seqlen_q, seqlen_k))
            if attn_mask.shape not in shapes:
                raise ValueError(f"attn_mask has shape {attn_mask.shape}; expected (L, S) = {shapes[0]} "
                                 f"or (batch * num_heads, L, S) = {shapes[1]}")
            if attn_mask.ndim == 3:
                attn_mask = attn_mask.reshape(batch, self.num_heads, seqlen_q, seqlen_k)
        if key_padding_mask is None:
            return attn_mask

        if not isinstance(key_padding_mask, np.ndarray):
            raise TypeError(f"key_padding_mask must be a NumPy array or None, "
                            f"got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != np.bool_:
            raise TypeError(f"key_padding_mask has dtype {key_padding_mask.dtype}; use bool "
                            f"(True = a padding key to ignore)")
        if key_padding_mask.shape != (batch, seqlen_k):
            raise ValueError(f"key_padding_mask has shape {key_padding_mask.shape}; expected (batch, S) = "
                             f"{(batch, seqlen_k)}")
        visible_keys = ~key_padding_mask[:, np.newaxis, np.newaxis, :]  # (B, 1, 1, S)
        if attn_mask is None:
            return visible_keys
        if attn_mask.dtype == np.bool_:
            return attn_mask & visible_keys
        return np.where(visible_keys, attn_mask, attn_mask.dtype.type(-np.inf))
