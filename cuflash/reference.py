"""Ground truth and the readable specification of the kernels (NumPy, or CuPy for the reference).

- attention_reference: plain softmax(Q K^T * scale [+ causal mask]) V, in float64 (upcast=True),
  or emulating the input's precision (upcast=False: every stage rounded to the input dtype), which
  is what "the same computation in the input's precision" means in the tests' 2x error rule.
- flash_forward_model: the tiled FlashAttention forward in the loop order, tile skipping, masking
  and running statistics of cuda_src/flash_fwd.cu.

Layout as in the API: q (batch, seqlen_q, nheads, d); k, v (batch, seqlen_k, nheads_k, d);
lse (batch, nheads, seqlen_q), natural log; a row that sees no key has o = 0 and lse = -inf.
"""
import math

import numpy as np

LOG2E = 1.4426950408889634


def _xp(a):
    try:
        import cupy

        return cupy.get_array_module(a)
    except ImportError:
        return np


def round_to(x, dtype_name):
    """float32 x rounded to the nearest float16 / bfloat16 value (ties to even), kept in float32."""
    xp = _xp(x)
    if dtype_name == "float16":
        return x.astype(xp.float16).astype(xp.float32)
    if dtype_name == "bfloat16":
        bits = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & xp.uint32(0xFFFF0000)
        return bits.view(xp.float32)
    return x


def _upcast(x, dtype):
    """x as `dtype`; bfloat16 is widened through its bits, which NumPy and CuPy both support."""
    if x.dtype.name == "bfloat16":
        xp = _xp(x)
        x = (xp.ascontiguousarray(x).view(xp.uint16).astype(xp.uint32) << 16).view(xp.float32)
    return x.astype(dtype)


def from_float32(x, dtype_name):
    """float32 x as an array of dtype_name (float16, bfloat16 or a NumPy float), rounded to nearest."""
    xp = _xp(x)
    if dtype_name == "bfloat16":
        import ml_dtypes

        bits = round_to(x, "bfloat16").view(xp.uint32) >> 16
        return bits.astype(xp.uint16).view(ml_dtypes.bfloat16)
    return x.astype(dtype_name)


def visible(seqlen_q, seqlen_k, causal, xp=np):
    """(seqlen_q, seqlen_k) bool: query i sees key j iff not causal or j <= i + seqlen_k - seqlen_q."""
    if not causal:
        return xp.ones((seqlen_q, seqlen_k), dtype=bool)
    rows = xp.arange(seqlen_q)[:, None]
    cols = xp.arange(seqlen_k)[None, :]
    return cols <= rows + (seqlen_k - seqlen_q)


def default_scale(head_dim, softmax_scale):
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale


def attention_reference(q, k, v, softmax_scale=None, causal=False, upcast=True):
    """(o, lse) of plain attention; float64 if upcast, else float32 rounded to q's dtype per stage."""
    xp = _xp(q)
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    scale = default_scale(head_dim, softmax_scale)
    lowp = q.dtype.name if not upcast else None
    compute = xp.float64 if upcast else xp.float32
    q_, k_, v_ = (_upcast(x, compute) for x in (q, k, v))
    group = nheads // nheads_k
    k_ = xp.repeat(k_, group, axis=2)
    v_ = xp.repeat(v_, group, axis=2)
    # S = Q K^T * scale   (batch, nheads, seqlen_q, seqlen_k)
    s = xp.einsum("bqhd,bkhd->bhqk", q_, k_) * compute(scale)
    if lowp:
        s = round_to(s, lowp)
    s = xp.where(visible(seqlen_q, seqlen_k, causal, xp), s, -xp.inf)
    m = s.max(axis=-1, keepdims=True) if seqlen_k else xp.full(s.shape[:-1] + (1,), -xp.inf, compute)
    m_safe = xp.where(xp.isfinite(m), m, 0)
    e = xp.exp(s - m_safe)
    l = e.sum(axis=-1, keepdims=True)
    p = e / xp.where(l > 0, l, 1)
    if lowp:
        p = round_to(p, lowp)
    o = xp.einsum("bhqk,bkhd->bqhd", p, v_)
    if lowp:
        o = round_to(o, lowp)
    lse = xp.where(l > 0, xp.log(xp.where(l > 0, l, 1)) + m_safe, -xp.inf)[..., 0]
    return o, lse


def n_block_max(m_block, block_m, block_n, seqlen_q, seqlen_k, causal):
    """Number of K/V tiles the Q tile m_block visits (tiles n_block_max.. are fully masked)."""
    n_max = -(-seqlen_k // block_n)
    if causal:
        last_key = (m_block + 1) * block_m - 1 + seqlen_k - seqlen_q  # the tile's last row sees up to here
        n_max = min(n_max, 0 if last_key < 0 else last_key // block_n + 1)
    return n_max


def tile_needs_mask(m_block, n_block, block_m, block_n, seqlen_q, seqlen_k, causal):
    """True if some key of K/V tile n_block is invisible to some row of Q tile m_block."""
    n_end = (n_block + 1) * block_n
    first_row_last_key = m_block * block_m + seqlen_k - seqlen_q
    return n_end > seqlen_k or (causal and n_end - 1 > first_row_last_key)


def flash_forward_model(q, k, v, softmax_scale=None, causal=False, block_m=64, block_n=64):
    """The kernel's algorithm in NumPy: for each Q tile, K/V tiles from last to first, masking only
    tiles that need it; S in float32; online softmax in log2 units; P rounded to the input dtype
    before P V; O and lse from the final m and l. Returns (o, lse) like attention_reference."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    dtype = q.dtype.name
    acc = np.float64 if dtype == "float64" else np.float32
    scale_log2 = acc(default_scale(head_dim, softmax_scale) * LOG2E)
    group = nheads // nheads_k
    # (batch, nheads, seqlen, d): K/V head h // group serves query head h.
    q_ = _upcast(q, acc).transpose(0, 2, 1, 3)
    k_ = np.repeat(_upcast(k, acc), group, axis=2).transpose(0, 2, 1, 3)
    v_ = np.repeat(_upcast(v, acc), group, axis=2).transpose(0, 2, 1, 3)
    o = np.zeros((batch, nheads, seqlen_q, head_dim), acc)
    lse = np.full((batch, nheads, seqlen_q), -np.inf, acc)
    for m_block in range(-(-seqlen_q // block_m)):
        rows = slice(m_block * block_m, (m_block + 1) * block_m)
        q_tile = q_[:, :, rows]                                   # (b, h, Br, d)
        row_ids = np.arange(seqlen_q)[rows]
        m_i = np.full(q_tile.shape[:-1], -np.inf, acc)            # running max of S * scale_log2
        l_i = np.zeros(q_tile.shape[:-1], acc)                    # running sum of P
        acc_o = np.zeros(q_tile.shape, acc)                       # unnormalised O
        for n_block in reversed(range(n_block_max(m_block, block_m, block_n, seqlen_q, seqlen_k, causal))):
            cols = slice(n_block * block_n, (n_block + 1) * block_n)
            # S = Q K_j^T   (b, h, Br, Bc)
            s = q_tile @ k_[:, :, cols].transpose(0, 1, 3, 2)
            if tile_needs_mask(m_block, n_block, block_m, block_n, seqlen_q, seqlen_k, causal):
                col_ids = np.arange(seqlen_k)[cols]
                seen = (col_ids[None, :] < seqlen_k) & (not causal or col_ids[None, :] <= row_ids[:, None] + seqlen_k - seqlen_q)
                s = np.where(seen, s, -np.inf)
            # m_new = max(m_i, rowmax(S) * scale_log2); P = exp2(S * scale_log2 - m_new)
            m_new = np.maximum(m_i, s.max(axis=-1) * scale_log2)
            m_use = np.where(m_new == -np.inf, 0, m_new)
            alpha = np.exp2(m_i - m_use)
            p = np.exp2(s * scale_log2 - m_use[..., None])
            l_i = l_i * alpha + p.sum(axis=-1)
            acc_o = acc_o * alpha[..., None] + round_to(p.astype(acc), dtype) @ v_[:, :, cols]
            m_i = m_new
        safe_l = np.where(l_i > 0, l_i, 1)
        o[:, :, rows] = np.where(l_i[..., None] > 0, acc_o / safe_l[..., None], 0)
        lse[:, :, rows] = np.where(l_i > 0, m_i / LOG2E + np.log(safe_l), -np.inf)
    o = round_to(o.transpose(0, 2, 1, 3).astype(acc), dtype)
    return o, lse
