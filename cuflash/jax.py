"""cuflash for JAX code written against jax.nn.dot_product_attention: the same signature, layout
(B, T, N, H) and masking convention, so that swapping the function is the only change.

    import cuflash.jax
    out = cuflash.jax.dot_product_attention(query, key, value, is_causal=True)

Differentiable (jax.grad) and traceable (jax.jit, vmap) through cuflash.flash_attn_func. What
jax.nn offers and cuflash does not compute yet (bias, boolean masks, sequence lengths, local
windows) raises NotImplementedError instead of running a different computation.
"""
from . import api


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                          query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                          implementation=None, return_residual=False):
    """softmax(query key^T * scale [+ causal mask]) value, as jax.nn.dot_product_attention.

    query (B, T, N, H), key and value (B, S, K, H) with N a multiple of K (GQA/MQA), or the same
    without B; float16 or bfloat16 on a CUDA device. scale defaults to 1/sqrt(H). is_causal
    masks as jax.nn does, aligned to the top-left corner: query i sees keys j <= i (for T != S
    this differs from flash_attn_func's bottom-right alignment). `implementation` is accepted
    and ignored (cuflash is the implementation). With return_residual=True also returns the
    float32 log-sum-exp of each query row, (B, T, N).
    """
    unsupported = {"bias": bias, "mask": mask, "query_seq_lengths": query_seq_lengths,
                   "key_value_seq_lengths": key_value_seq_lengths, "local_window_size": local_window_size}
    for name, value_ in unsupported.items():
        if value_ is not None:
            raise NotImplementedError(f"cuflash.jax.dot_product_attention: {name} is not supported yet; "
                                      "use jax.nn.dot_product_attention for it")
    if implementation not in (None, "xla", "cudnn"):
        raise ValueError(f"implementation must be None, 'xla' or 'cudnn'; got {implementation!r}")
    unbatched = getattr(query, "ndim", None) == 3
    if unbatched:
        query, key, value = (x[None] for x in (query, key, value))
    out, lse = _top_left_attention(query, key, value, scale, bool(is_causal))
    if unbatched:
        out, lse = out[0], lse[0]
    if return_residual:
        return out, lse.swapaxes(-1, -2)  # (B, N, T) -> (B, T, N)
    return out


def _top_left_attention(q, k, v, scale, causal):
    """(o, lse) of attention with the causal mask aligned to the top-left corner, from
    flash_attn_func, whose mask is aligned to the bottom-right: the two agree when T == S. For
    T < S no query sees the keys past T, which are left out; for T > S the first S rows are a
    square causal block and the rest see every key."""
    import jax.numpy as jnp

    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if not causal or seqlen_q == seqlen_k:
        return api.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_lse=True)
    if seqlen_q < seqlen_k:
        return api.flash_attn_func(q, k[:, :seqlen_q], v[:, :seqlen_q], softmax_scale=scale, causal=True,
                                   return_lse=True)
    head = api.flash_attn_func(q[:, :seqlen_k], k, v, softmax_scale=scale, causal=True, return_lse=True)
    tail = api.flash_attn_func(q[:, seqlen_k:], k, v, softmax_scale=scale, causal=False, return_lse=True)
    return jnp.concatenate([head[0], tail[0]], axis=1), jnp.concatenate([head[1], tail[1]], axis=2)
