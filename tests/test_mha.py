"""MultiHeadAttention: equal to torch.nn.MultiheadAttention with the same weights; grouped-query
attention against the same math spelled out in NumPy; argument errors."""

import copy

import numpy as np
import pytest

from fastattn.mha import MultiHeadAttention

from conftest import SEED, assert_within_naive_error, run_python

DTYPES = [np.float32, np.float64]
EMBED_DIM, NUM_HEADS, BATCH = 32, 4, 2


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def numpy_mha(layer, query, key, value, mask=None, is_causal=False, dtype=np.float64):
    """The layer's math in `dtype`, step by step: project, split heads, repeat each key/value head
    for its group of query heads, softmax (zeros for a row with no visible key), merge heads,
    project. mask: bool (True = visible) or float (added), broadcastable to (B, num_heads, L, S)."""

    def project(x, weight, bias):
        y = x.astype(dtype) @ weight.astype(dtype).T
        return y if bias is None else y + bias.astype(dtype)

    def split_heads(x, num_heads):
        return x.reshape(x.shape[0], x.shape[1], num_heads, layer.head_dim).transpose(0, 2, 1, 3)

    group = layer.num_heads // layer.num_kv_heads
    q = split_heads(project(query, layer.q_proj_weight, layer.q_proj_bias), layer.num_heads)
    k = split_heads(project(key, layer.k_proj_weight, layer.k_proj_bias), layer.num_kv_heads)
    v = split_heads(project(value, layer.v_proj_weight, layer.v_proj_bias), layer.num_kv_heads)
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # head h reads key/value head h // group
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(dtype(layer.head_dim))
    seqlen_q, seqlen_k = scores.shape[-2:]
    visible = np.ones((seqlen_q, seqlen_k), bool)
    if is_causal:
        visible = np.tril(visible)
    if mask is not None and mask.dtype == np.bool_:
        visible = visible & mask
    elif mask is not None:
        scores = scores + mask.astype(dtype)
    scores = np.where(visible, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    row_max = np.where(np.isneginf(row_max), 0, row_max)
    weights = np.exp(scores - row_max)
    row_sum = weights.sum(axis=-1, keepdims=True)
    weights = np.divide(weights, row_sum, out=np.zeros_like(weights), where=row_sum > 0)
    heads = (weights @ v).transpose(0, 2, 1, 3).reshape(query.shape[0], seqlen_q, layer.embed_dim)
    return project(heads, layer.out_proj_weight, layer.out_proj_bias)


def random_torch_module(torch, dtype, **kwargs):
    """A torch MultiheadAttention (batch_first) with every parameter random, biases included."""
    torch.manual_seed(SEED)
    module = torch.nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, batch_first=True, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.uniform_(-0.5, 0.5)
    return module.to({np.float32: torch.float32, np.float64: torch.float64}[dtype]).eval()


def torch_output(torch, module, query, key, value, **kwargs):
    tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in (query, key, value)]
    masks = {name: torch.from_numpy(mask) for name, mask in kwargs.items() if isinstance(mask, np.ndarray)}
    with torch.no_grad():
        return module(*tensors, need_weights=False, **{**kwargs, **masks})[0].numpy()


GEOMETRIES = {
    # id: (module kwargs, L, S, whether key and value are the query itself)
    "self": ({}, 8, 8, True),
    "self, no bias": ({"bias": False}, 8, 8, True),
    "cross, kdim and vdim": ({"kdim": 20, "vdim": 12}, 7, 11, False),
    "cross, L > S": ({}, 9, 4, False),
}


def padding(rng, seqlen_k):
    """key_padding_mask (B, S): batch element b keeps a random number (at least 1) of leading keys."""
    lengths = rng.integers(1, seqlen_k + 1, size=BATCH)
    return np.arange(seqlen_k) >= lengths[:, np.newaxis]


def visible_mask(rng, shape):
    """A random bool mask (True = may attend) in which every row sees key 0."""
    visible = rng.random(shape) >= 0.4
    visible[..., 0] = True
    return visible


def additive_mask(rng, shape, dtype):
    mask = rng.standard_normal(shape)
    mask[(rng.random(shape) < 0.3) & (np.arange(shape[-1]) > 0)] = -np.inf
    return mask.astype(dtype)


def build_masks(kind, rng, seqlen_q, seqlen_k, dtype):
    """(our keyword arguments, torch's) for one mask setup. Every row sees at least key 0, since
    torch gives NaN where fastattn gives zeros for a row with no visible key."""
    heads_shape = (BATCH * NUM_HEADS, seqlen_q, seqlen_k)
    causal_hidden = np.triu(np.ones((seqlen_q, seqlen_k), bool), k=1)  # torch MHA: True = may not attend
    if kind == "none":
        return {}, {}
    if kind == "causal":
        return {"is_causal": True}, {"is_causal": True, "attn_mask": causal_hidden}
    if kind == "causal, float mask to torch":
        causal_float = np.where(causal_hidden, -np.inf, 0).astype(dtype)
        return {"is_causal": True}, {"is_causal": True, "attn_mask": causal_float}
    if kind == "causal + padding":
        pad = padding(rng, seqlen_k)
        return ({"is_causal": True, "key_padding_mask": pad},
                {"is_causal": True, "attn_mask": causal_hidden, "key_padding_mask": pad})
    if kind == "padding":
        pad = padding(rng, seqlen_k)
        return {"key_padding_mask": pad}, {"key_padding_mask": pad}
    if kind in ("bool", "bool 3-D + padding"):
        visible = visible_mask(rng, (seqlen_q, seqlen_k) if kind == "bool" else heads_shape)
        ours, theirs = {"attn_mask": visible}, {"attn_mask": ~visible}  # opposite bool conventions
    else:
        mask = additive_mask(rng, (seqlen_q, seqlen_k) if kind == "float" else heads_shape, dtype)
        ours, theirs = {"attn_mask": mask}, {"attn_mask": mask}
    if kind.endswith("padding"):
        pad = padding(rng, seqlen_k)
        ours["key_padding_mask"] = pad
        # torch deprecates mixing a bool key_padding_mask with a float attn_mask
        theirs["key_padding_mask"] = pad if kind.startswith("bool") else np.where(pad, -np.inf, 0).astype(dtype)
    return ours, theirs


def reference_mask(ours, num_heads=NUM_HEADS):
    """Our attn_mask and key_padding_mask as one mask broadcastable to (B, num_heads, L, S)."""
    mask = ours.get("attn_mask")
    if mask is not None and mask.ndim == 3:
        mask = mask.reshape(BATCH, num_heads, *mask.shape[1:])
    if "key_padding_mask" not in ours:
        return mask
    visible = ~ours["key_padding_mask"][:, np.newaxis, np.newaxis, :]
    if mask is None or mask.dtype == np.bool_:
        return visible if mask is None else mask & visible
    return np.where(visible, mask, -np.inf)


MASK_KINDS = ["none", "causal", "causal, float mask to torch", "padding", "causal + padding", "bool", "float",
              "bool 3-D + padding", "float 3-D + padding"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_equals_torch(torch, geometry, mask_kind, dtype):
    """fastattn must be at most twice as far from the exact answer as torch in the same dtype, plus
    8 eps of the output's magnitude (conftest.assert_within_naive_error). Both round through the
    same projections, softmax and sums, so their errors are alike: a fixed rtol would either be
    loose for float64 or flaky for float32. The exact answer is torch in float64 for float32, and
    numpy_mha in np.longdouble for float64."""
    module_kwargs, seqlen_q, seqlen_k, is_self = geometry
    module = random_torch_module(torch, dtype, **module_kwargs)
    layer = MultiHeadAttention.from_torch(module)
    rng = np.random.default_rng(SEED)
    query = rng.standard_normal((BATCH, seqlen_q, EMBED_DIM)).astype(dtype)
    key = query if is_self else rng.standard_normal((BATCH, seqlen_k, layer.kdim)).astype(dtype)
    value = query if is_self else rng.standard_normal((BATCH, seqlen_k, layer.vdim)).astype(dtype)
    ours, theirs = build_masks(mask_kind, rng, seqlen_q, seqlen_k, dtype)

    out = layer(query, **ours) if is_self else layer(query, key, value, **ours)
    naive = torch_output(torch, module, query, key, value, **theirs)
    if dtype == np.float32:
        as_float64 = {name: x.astype(np.float64) if x.dtype == np.float32 else x for name, x in theirs.items()
                      if isinstance(x, np.ndarray)}
        inputs = (x.astype(np.float64) for x in (query, key, value))
        exact = torch_output(torch, copy.deepcopy(module).double(), *inputs, **{**theirs, **as_float64})
    else:
        mask = reference_mask(ours)
        exact = numpy_mha(layer, query, key, value, mask, ours.get("is_causal", False), np.longdouble)
    assert out.shape == naive.shape == (BATCH, seqlen_q, EMBED_DIM)
    assert out.dtype == dtype
    assert_within_naive_error(out, exact, naive)


def test_from_torch_ignores_batch_first(torch):
    """torch's batch_first only changes the input layout: the same weights give the same result."""
    module = random_torch_module(torch, np.float64)
    seq_first = torch.nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, batch_first=False, dtype=torch.float64).eval()
    seq_first.load_state_dict(module.state_dict())
    layer = MultiHeadAttention.from_torch(seq_first)
    query = np.random.default_rng(SEED).standard_normal((BATCH, 5, EMBED_DIM))
    with torch.no_grad():
        expected = seq_first(*[torch.from_numpy(query.transpose(1, 0, 2).copy())] * 3, need_weights=False)[0]
    # float64 outputs of magnitude ~5 differ by ~1e-15 in rounding; a layout mistake is O(1)
    np.testing.assert_allclose(layer(query), expected.numpy().transpose(1, 0, 2), rtol=0, atol=1e-12)


def test_from_torch_copies_the_weights(torch):
    module = random_torch_module(torch, np.float32)
    layer = MultiHeadAttention.from_torch(module)
    query = np.random.default_rng(SEED).standard_normal((BATCH, 5, EMBED_DIM)).astype(np.float32)
    before = layer(query)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(1.0)
    np.testing.assert_array_equal(layer(query), before)


def test_from_torch_converts_other_dtypes_only_when_asked(torch):
    module = random_torch_module(torch, np.float32).half()
    with pytest.raises(TypeError, match=r"torch.float16.*dtype="):
        MultiHeadAttention.from_torch(module)
    layer = MultiHeadAttention.from_torch(module, dtype=np.float32)
    assert layer.dtype == np.float32
    np.testing.assert_array_equal(layer.out_proj_weight, module.out_proj.weight.detach().float().numpy())


@pytest.mark.parametrize(
    "module_kwargs, error, message",
    [({"add_bias_kv": True}, ValueError, "add_bias_kv"), ({"add_zero_attn": True}, ValueError, "add_zero_attn")],
    ids=["bias_k and bias_v", "add_zero_attn"],
)
def test_from_torch_refuses_unsupported_modules(torch, module_kwargs, error, message):
    with pytest.raises(error, match=message):
        MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, **module_kwargs))


def test_from_torch_refuses_other_modules(torch):
    with pytest.raises(TypeError, match=r"module.*Linear"):
        MultiHeadAttention.from_torch(torch.nn.Linear(4, 4))


def random_layer(dtype, num_heads=8, num_kv_heads=2, kdim=20, vdim=12):
    """A layer with random biases as well as weights, so that the biases are tested too."""
    layer = MultiHeadAttention(EMBED_DIM, num_heads, num_kv_heads=num_kv_heads, kdim=kdim, vdim=vdim, dtype=dtype,
                               seed=SEED)
    rng = np.random.default_rng(SEED + 1)
    for name in ("q_proj_bias", "k_proj_bias", "v_proj_bias", "out_proj_bias"):
        setattr(layer, name, rng.uniform(-0.5, 0.5, getattr(layer, name).shape).astype(dtype))
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool 3-D + padding", "causal + float 3-D + padding"])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
def test_grouped_query_attention(num_kv_heads, mask_kind, dtype):
    """Query head h reads key/value head h // (num_heads // num_kv_heads), as numpy_mha's np.repeat
    spells out. Held to the naive error bound: the exact answer is numpy_mha in extended precision,
    the naive one numpy_mha in the layer's dtype."""
    layer = random_layer(dtype, num_kv_heads=num_kv_heads)
    kv_features = num_kv_heads * layer.head_dim
    assert layer.k_proj_weight.shape == (kv_features, 20) and layer.v_proj_weight.shape == (kv_features, 12)
    rng = np.random.default_rng(SEED)
    seqlen_q, seqlen_k = 7, 10
    query = rng.standard_normal((BATCH, seqlen_q, EMBED_DIM)).astype(dtype)
    key = rng.standard_normal((BATCH, seqlen_k, 20)).astype(dtype)
    value = rng.standard_normal((BATCH, seqlen_k, 12)).astype(dtype)
    ours = {"is_causal": mask_kind.startswith("causal")}
    if mask_kind.endswith("padding"):
        shape = (BATCH * layer.num_heads, seqlen_q, seqlen_k)
        mask = visible_mask(rng, shape) if mask_kind.startswith("bool") else additive_mask(rng, shape, dtype)
        ours.update(attn_mask=mask, key_padding_mask=padding(rng, seqlen_k))
    mask = reference_mask(ours, layer.num_heads)

    out = layer(query, key, value, **ours)
    exact = numpy_mha(layer, query, key, value, mask, ours.get("is_causal", False), np.longdouble)
    naive = numpy_mha(layer, query, key, value, mask, ours.get("is_causal", False), dtype)
    assert out.dtype == dtype
    assert_within_naive_error(out, exact, naive)


def test_rows_with_no_visible_key_give_the_output_bias():
    """fastattn.attention gives zeros for such a row (torch gives NaN), so only out_proj_bias remains."""
    layer = random_layer(np.float64)
    rng = np.random.default_rng(SEED)
    query = rng.standard_normal((BATCH, 4, EMBED_DIM))
    key = rng.standard_normal((BATCH, 6, 20))
    value = rng.standard_normal((BATCH, 6, 12))
    key_padding_mask = np.zeros((BATCH, 6), bool)
    key_padding_mask[1] = True
    attn_mask = np.ones((4, 6), bool)
    attn_mask[2] = False
    out = layer(query, key, value, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
    np.testing.assert_array_equal(out[1], np.broadcast_to(layer.out_proj_bias, (4, EMBED_DIM)))
    np.testing.assert_array_equal(out[0, 2], layer.out_proj_bias)
    assert np.all(out[0, [0, 1, 3]] != layer.out_proj_bias)


def test_key_and_value_default_to_query_then_key():
    layer = random_layer(np.float64, kdim=None, vdim=None)
    rng = np.random.default_rng(SEED)
    query = rng.standard_normal((BATCH, 5, EMBED_DIM))
    key = rng.standard_normal((BATCH, 7, EMBED_DIM))
    np.testing.assert_array_equal(layer(query), layer(query, query, query))
    np.testing.assert_array_equal(layer(query, key), layer(query, key, key))


def test_initial_weights_are_reproducible_xavier_uniform():
    layer = MultiHeadAttention(EMBED_DIM, NUM_HEADS, num_kv_heads=2, kdim=20, vdim=12)
    same = MultiHeadAttention(EMBED_DIM, NUM_HEADS, num_kv_heads=2, kdim=20, vdim=12, seed=0)
    from_generator = MultiHeadAttention(EMBED_DIM, NUM_HEADS, num_kv_heads=2, kdim=20, vdim=12,
                                        seed=np.random.default_rng(0))
    other = MultiHeadAttention(EMBED_DIM, NUM_HEADS, num_kv_heads=2, kdim=20, vdim=12, seed=1)
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj_weight"):
        weight = getattr(layer, name)
        assert weight.dtype == np.float32
        np.testing.assert_array_equal(weight, getattr(same, name))
        np.testing.assert_array_equal(weight, getattr(from_generator, name))
        assert not np.array_equal(weight, getattr(other, name))
        bound = np.sqrt(6 / sum(weight.shape))
        assert np.abs(weight).max() <= bound and np.abs(weight).max() > 0.9 * bound
    for name in ("q_proj_bias", "k_proj_bias", "v_proj_bias", "out_proj_bias"):
        np.testing.assert_array_equal(getattr(layer, name), 0)
    no_bias = MultiHeadAttention(EMBED_DIM, NUM_HEADS, bias=False)
    assert no_bias.q_proj_bias is None and no_bias.out_proj_bias is None


def test_inputs_and_weights_are_not_modified():
    layer = random_layer(np.float32)
    rng = np.random.default_rng(SEED)
    arguments = {
        "query": rng.standard_normal((BATCH, 5, EMBED_DIM)).astype(np.float32),
        "key": rng.standard_normal((BATCH, 6, 20)).astype(np.float32),
        "value": rng.standard_normal((BATCH, 6, 12)).astype(np.float32),
        "attn_mask": additive_mask(rng, (5, 6), np.float32),
        "key_padding_mask": padding(rng, 6),
    }
    weights = {name: value for name, value in vars(layer).items() if isinstance(value, np.ndarray)}
    copies = {name: x.copy() for name, x in {**arguments, **weights}.items()}
    query, key, value = arguments.pop("query"), arguments.pop("key"), arguments.pop("value")
    out = layer(query, key, value, is_causal=True, **arguments)
    assert not any(np.shares_memory(out, x) for x in copies.values())
    for name, x in {"query": query, "key": key, "value": value, **arguments, **weights}.items():
        np.testing.assert_array_equal(x, copies[name], err_msg=f"{name} was modified")


def test_import_does_not_import_torch():
    code = "import sys, fastattn.mha; assert 'torch' not in sys.modules, 'fastattn.mha imported torch'"
    run_python(code)


def ones(*shape, dtype=np.float32):
    return np.ones(shape, dtype)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"embed_dim": 30}, ValueError, r"embed_dim 30.*num_heads 4"),
        ({"num_kv_heads": 3}, ValueError, r"num_heads 4.*num_kv_heads 3"),
        ({"num_heads": 0}, ValueError, r"num_heads.*positive"),
        ({"embed_dim": 32.0}, ValueError, r"embed_dim.*positive integer"),
        ({"kdim": 0}, ValueError, r"kdim.*positive"),
        ({"dtype": np.float16}, TypeError, r"dtype.*float16"),
    ],
    ids=["heads do not divide embed_dim", "kv heads do not divide heads", "no heads", "float embed_dim", "kdim 0",
         "float16"],
)
def test_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        MultiHeadAttention(**{"embed_dim": EMBED_DIM, "num_heads": NUM_HEADS, **kwargs})


QUERY, KEY, VALUE = ones(2, 5, EMBED_DIM), ones(2, 6, 20), ones(2, 6, 12)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"query": QUERY.tolist()}, TypeError, r"query must be a NumPy array"),
        ({"query": QUERY[0]}, ValueError, r"query must have 3 dims"),
        ({"query": QUERY.astype(np.float64)}, TypeError, r"query has dtype float64.*float32"),
        ({"query": ones(2, 5, 16)}, ValueError, r"query has 16 features.*embed_dim is 32"),
        ({"key": ones(2, 6, 12)}, ValueError, r"key has 12 features.*kdim is 20"),
        ({"value": ones(2, 6, 20)}, ValueError, r"value has 20 features.*vdim is 12"),
        ({"key": ones(3, 6, 20)}, ValueError, r"key has batch size 3 but query has 2"),
        ({"value": ones(1, 6, 12)}, ValueError, r"value has batch size 1"),
        ({"value": ones(2, 7, 12)}, ValueError, r"value has 7 positions.*key has 6"),
        ({"value": ones(2, 6, 12, dtype=np.float64)}, TypeError, r"value has dtype float64"),
        ({"is_causal": 1}, TypeError, r"is_causal must be a bool"),
        ({"attn_mask": np.ones((6, 5), bool)}, ValueError, r"attn_mask has shape \(6, 5\).*\(5, 6\).*\(8, 5, 6\)"),
        ({"attn_mask": np.ones((2, 5, 6), bool)}, ValueError, r"attn_mask has shape \(2, 5, 6\)"),
        ({"attn_mask": ones(5, 6, dtype=np.float64)}, TypeError, r"attn_mask has dtype float64.*bool.*float32"),
        ({"attn_mask": ones(5, 6, dtype=np.int32)}, TypeError, r"attn_mask has dtype int32"),
        ({"attn_mask": [[True] * 6] * 5}, TypeError, r"attn_mask must be a NumPy array"),
        ({"key_padding_mask": np.zeros((2, 6))}, TypeError, r"key_padding_mask has dtype float64.*bool"),
        ({"key_padding_mask": np.zeros((2, 5), bool)}, ValueError, r"key_padding_mask has shape \(2, 5\).*2, 6"),
        ({"key_padding_mask": np.zeros(6, bool)}, ValueError, r"key_padding_mask has shape \(6,\)"),
        ({"key_padding_mask": [[False] * 6] * 2}, TypeError, r"key_padding_mask must be a NumPy array"),
    ],
    ids=["list query", "2-D query", "float64 query", "query features", "key features", "value features",
         "key batch", "value batch", "value length", "float64 value", "int is_causal", "attn_mask transposed",
         "attn_mask 3-D of batch size", "float64 attn_mask", "int attn_mask", "list attn_mask",
         "float key_padding_mask", "key_padding_mask length", "1-D key_padding_mask", "list key_padding_mask"],
)
def test_call_errors_name_the_argument(arguments, error, message):
    layer = MultiHeadAttention(EMBED_DIM, NUM_HEADS, kdim=20, vdim=12)
    arguments = {"query": QUERY, "key": KEY, "value": VALUE, **arguments}
    with pytest.raises(error, match=message):
        layer(arguments.pop("query"), arguments.pop("key"), arguments.pop("value"), **arguments)
