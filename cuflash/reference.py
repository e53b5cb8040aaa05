"""Ground truth and the readable specification of the kernels (NumPy, or CuPy for the reference).

- attention_reference: plain softmax(Q K^T * scale [+ causal mask]) V, in float64 (upcast=True),
  or emulating the input's precision (upcast=False: every stage rounded to the input dtype), which
  is what "the same computation in the input's precision" means in the tests' 2x error rule.
- flash_forward_model: the tiled FlashAttention forward in the loop order, tile skipping, masking
  and running statistics of cuda_src/flash_fwd.cu.
- attention_reference_backward: plain gradients (dq, dk, dv) of the same attention, with the same
  upcast switch (upcast=False rounds S, P, O, dP, dS and dq, dk, dv to the input dtype).
- flash_backward_model: the tiled FlashAttention-2 backward the CUDA kernel runs: one pass per
  K/V tile, dK and dV accumulated on chip, dQ accumulated in a float32 buffer (red.global from
  the portable kernel, one bulk reduction per dQ tile from the sm_90a one).
- Dropout of P: philox4x32_10 (Random123's Philox4x32-10), dropout_keep (the keep bit of any
  (seed, offset, batch * nheads + head, row, col), so every tile regenerates its own) and
  dropout_mask (all of them). The references take the mask (dropout_mask=...), the models the
  (seed, offset) and draw each tile's bits themselves; both give O = (P * keep / (1 - p)) V with
  lse of the undropped P, and the gradients of that for the fixed mask.

- Softcap (softcap > 0, Gemma-2's logit soft-capping as flash-attn defines it): the scores
  S = Q K^T * scale become S' = softcap * tanh(S / softcap) before the mask and the softmax, and
  lse is that of S'; the backward multiplies dS' = P * (dP - D) by dS'/dS = 1 - tanh(S / softcap)^2.
  softcap = 0 is off. The models run the softmax on t = tanh(S * scale / softcap) with
  scale_log2 = softcap * log2(e), as the kernels do.

Layout as in the API: q (batch, seqlen_q, nheads, d); k, v (batch, seqlen_k, nheads_k, d);
lse (batch, nheads, seqlen_q), natural log; a row that sees no key has o = 0 and lse = -inf.
Gradients have the layout of what they differentiate: dout and dq like q; dk, dv like k, v.
"""
import math
import numbers

import numpy as np

from .dropout import dropout_threshold, philox_key  # noqa: F401 (part of the specification's API)

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


# ---------------------------------------------------------------------------------------------
# Dropout: keep mask from a counter-based RNG, so that any tile can regenerate its own bits.
#
# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; the
# Random123 library, whose known-answer vectors tests/test_dropout_spec.py checks) is a keyed
# bijection of a 128-bit counter: the same (counter, key) gives the same four words in any thread,
# any tile, any launch order. Here key = the 64-bit seed and counter = (key column // 4, query row,
# batch * nheads + head, offset); the forward and the backward both evaluate it, so the backward
# needs no stored mask and the mask does not depend on tile sizes.
# ---------------------------------------------------------------------------------------------

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57          # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85          # Weyl key bumps: golden ratio, sqrt(3) - 1
_MASK32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox4x32 with 10 rounds. counter: 4 uint32 values or arrays (broadcast together); key: 2
    uint32 values or arrays. Returns the 4 output words as uint32 arrays of the broadcast shape.
    32-bit arithmetic is done in uint64 (a 32x32 product fits) and masked back to 32 bits."""
    c0, c1, c2, c3 = (np.asarray(c).astype(np.uint64) & np.uint64(_MASK32) for c in counter)
    k0, k1 = (np.asarray(k).astype(np.uint64) & np.uint64(_MASK32) for k in key)
    m0, m1, w0, w1 = (np.uint64(x) for x in (PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1))
    low, shift = np.uint64(_MASK32), np.uint64(32)
    for round_ in range(10):
        if round_:
            # key += (W0, W1) mod 2^32, between rounds
            k0, k1 = (k0 + w0) & low, (k1 + w1) & low
        # (hi0, lo0) = M0 * c0; (hi1, lo1) = M1 * c2   (64-bit products)
        prod0, prod1 = m0 * c0, m1 * c2
        # c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
        c0, c1, c2, c3 = (prod1 >> shift) ^ c1 ^ k0, prod1 & low, (prod0 >> shift) ^ c3 ^ k1, prod0 & low
    return tuple(c.astype(np.uint32) for c in np.broadcast_arrays(c0, c1, c2, c3))


def dropout_words(seed, offset, batch_head, rows, cols):
    """The random uint32 word of each (batch_head, row, col), broadcast together (numbers or
    integer arrays): batch_head = batch * nheads + head (query heads), rows the query index, cols
    the key index. Word cols % 4 of Philox4x32-10 with key = philox_key(seed) and counter =
    (cols // 4, rows, batch_head, offset). Every counter word is 32 bits: offset wraps modulo
    2^32 (offset and offset + 2^32 give the same mask), and batch * nheads, seqlen_q and
    seqlen_k / 4 must stay below 2^32."""
    cols = np.asarray(cols)
    # Design: 4 consecutive key columns share one Philox call. In the kernel's mma layout (the
    # m16n8k16 accumulator) lane l holds rows l / 4 and l / 4 + 8 and columns 2t, 2t + 1 (t = l % 4)
    # of each n8 tile; 2t and 2t + 1 lie in one group of 4, so a thread calls Philox once per
    # (row, group of 4) and uses 2 of its 4 words (lane l ^ 1 uses the other 2). The bits never
    # depend on which thread, tile or launch asks.
    words = philox4x32_10((cols // 4, rows, batch_head, int(offset) & _MASK32), philox_key(seed))
    return np.choose(cols % 4, words)


def dropout_keep(seed, offset, batch_head, rows, cols, dropout_p):
    """bool keep mask of each (batch_head, row, col), broadcast together: word >= threshold,
    with the word of dropout_words and the threshold of dropout_threshold, so each element is
    kept with probability 1 - dropout_p (up to 2^-32), independently of tiling and launch order."""
    words = dropout_words(seed, offset, batch_head, rows, cols)
    return words >= np.uint32(dropout_threshold(dropout_p))


def dropout_mask(seed, offset, batch, nheads, seqlen_q, seqlen_k, dropout_p):
    """bool (batch, nheads, seqlen_q, seqlen_k): the whole keep mask, the NumPy twin of the GPU
    debugging helper that materialises it. Written the way a kernel thread draws it (one Philox
    call per (row, group of 4 keys), its word w for key 4 * group + w), so that its agreement with
    dropout_keep, element by element, checks that layout."""
    groups = -(-seqlen_k // 4)
    batch_head = np.arange(batch * nheads).reshape(batch, nheads, 1, 1)
    rows = np.arange(seqlen_q)[:, None]
    words = philox4x32_10((np.arange(groups)[None, :], rows, batch_head, int(offset) & _MASK32), philox_key(seed))
    # (b, h, sq, groups, 4) -> (b, h, sq, 4 * groups): word w of group g is key 4 * g + w
    words = np.stack(words, axis=-1).reshape(batch, nheads, seqlen_q, 4 * groups)[..., :seqlen_k]
    return words >= np.uint32(dropout_threshold(dropout_p))


def _check_dropout(dropout_p):
    """1 / (1 - p), the scale of the kept values; p must lie in [0, 1)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    return 1.0 / (1.0 - dropout_p)


def _check_softcap(softcap):
    """softcap as a float; it must be a finite real number >= 0 (0: off)."""
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite real number >= 0 (0: off), got {softcap!r}")
    return float(softcap)


def attention_reference(q, k, v, softmax_scale=None, causal=False, upcast=True, *, dropout_p=0.0, dropout_mask=None, softcap=0.0):
    """(o, lse) of plain attention; float64 if upcast, else float32 rounded to q's dtype per stage.

    With dropout_mask (bool, broadcast to (batch, nheads, seqlen_q, seqlen_k), e.g. from
    reference.dropout_mask): O = (P * keep / (1 - dropout_p)) V, the dropped P rounded like P when
    not upcast; lse stays that of the undropped P. dropout_p > 0 needs the mask.

    With softcap > 0: the scores S = Q K^T * scale become S' = softcap * tanh(S / softcap) before
    the mask (when not upcast, S rounded, then S' computed in float32 and rounded too); P and lse
    are those of S'."""
    xp = _xp(q)
    nheads, head_dim, nheads_k = q.shape[2], q.shape[3], k.shape[2]
    scale = default_scale(head_dim, softmax_scale)
    softcap = _check_softcap(softcap)
    lowp = q.dtype.name if not upcast else None
    compute = xp.float64 if upcast else xp.float32
    q_, k_, v_ = (_upcast(x, compute) for x in (q, k, v))
    group = nheads // nheads_k
    k_ = xp.repeat(k_, group, axis=2)
    v_ = xp.repeat(v_, group, axis=2)
    p, lse, _ = _probabilities(q_, k_, scale, causal, lowp, softcap=softcap)
    p = _dropped(p, dropout_p, dropout_mask, lowp)
    o = xp.einsum("bhqk,bkhd->bqhd", p, v_)
    if lowp:
        o = round_to(o, lowp)
    return o, lse


def _probabilities(q_, k_, scale, causal, lowp, *, softcap=0.0):
    """(P, lse, dcap) of q_ (b, sq, h, d) against k_ (b, sk, h, d), both upcast, K already repeated
    per query head; P (b, h, sq, sk) rounded to lowp when set (S and S' too); masked keys and rows
    that see no key have P = 0, the latter lse = -inf. With softcap > 0, P and lse are those of
    S' = softcap * tanh(S / softcap) and dcap = dS'/dS = 1 - tanh(S / softcap)^2 (unrounded, over
    every key, masked or not); None without softcap."""
    xp = _xp(q_)
    compute = q_.dtype.type
    seqlen_q, seqlen_k = q_.shape[1], k_.shape[1]
    # S = Q K^T * scale   (batch, nheads, seqlen_q, seqlen_k)
    s = xp.einsum("bqhd,bkhd->bhqk", q_, k_) * compute(scale)
    if lowp:
        s = round_to(s, lowp)
    dcap = None
    if softcap:
        # S' = softcap * tanh(S / softcap); the derivative from the same t, before the mask makes S' = -inf
        t = xp.tanh(s / compute(softcap))
        dcap = 1 - t * t
        s = compute(softcap) * t
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
    lse = xp.where(l > 0, xp.log(xp.where(l > 0, l, 1)) + m_safe, -xp.inf)[..., 0]
    return p, lse, dcap


def _dropped(p, dropout_p, dropout_mask, lowp):
    """P * keep / (1 - dropout_p), rounded to lowp when set; P itself when there is no mask."""
    rp_dropout = _check_dropout(dropout_p)
    if dropout_mask is None:
        if dropout_p > 0:
            raise ValueError("dropout_p > 0 needs dropout_mask (reference.dropout_mask(seed, offset, ...))")
        return p
    xp = _xp(p)
    p = xp.where(xp.asarray(dropout_mask), p * p.dtype.type(rp_dropout), 0)
    return round_to(p, lowp) if lowp else p


def _sum_groups(x, nheads_k):
    """(b, s, nheads, d) -> (b, s, nheads_k, d): the sum over each group of query heads that
    shares a K/V head (query head h uses K/V head h // group)."""
    batch, seqlen, nheads, head_dim = x.shape
    return x.reshape(batch, seqlen, nheads_k, nheads // nheads_k, head_dim).sum(axis=3)


def attention_reference_backward(dout, q, k, v, softmax_scale=None, causal=False, upcast=True, *, dropout_p=0.0, dropout_mask=None,
                                 softcap=0.0):
    """(dq, dk, dv) of plain attention for the upstream gradient dout (shaped like q); float64 if
    upcast, else float32 rounded to q's dtype after S, P, O (which D = rowsum(dO * O) reads), dP,
    dS and the final dq, dk, dv (what a framework stores in the input dtype). dk, dv sum over the
    query heads of a group; rows that see no key have P = 0 and dq = 0.

    With dropout_mask (as in attention_reference), the gradient of O = P_drop V with
    P_drop = P * keep / (1 - p) for that fixed mask: dV = P_drop^T dO, dP_drop = dO V^T,
    dP = dP_drop * keep / (1 - p), dS = P * (dP - D).

    With softcap > 0 (as in attention_reference), P is that of the capped scores S' and
    dS = P * (dP - D) * (1 - tanh(S / softcap)^2), rounded once when not upcast."""
    xp = _xp(q)
    head_dim, nheads_k = q.shape[3], k.shape[2]
    scale = default_scale(head_dim, softmax_scale)
    softcap = _check_softcap(softcap)
    lowp = q.dtype.name if not upcast else None
    compute = xp.float64 if upcast else xp.float32
    q_, k_, v_, do_ = (_upcast(x, compute) for x in (q, k, v, dout))
    group = q.shape[2] // nheads_k
    k_ = xp.repeat(k_, group, axis=2)
    v_ = xp.repeat(v_, group, axis=2)
    rnd = (lambda x: round_to(x, lowp)) if lowp else (lambda x: x)
    p, _, dcap = _probabilities(q_, k_, scale, causal, lowp, softcap=softcap)   # (b, h, sq, sk)
    # P_drop = P * keep / (1 - p)   (P itself without dropout)
    p_drop = _dropped(p, dropout_p, dropout_mask, lowp)
    # dV = P_drop^T dO
    dv = _sum_groups(xp.einsum("bhqk,bqhd->bkhd", p_drop, do_), nheads_k)
    # dP_drop = dO V^T; dP = dP_drop * keep / (1 - p)   (dP = dO V^T without dropout)
    dp = xp.einsum("bqhd,bkhd->bhqk", do_, v_)
    if dropout_mask is not None:
        dp = xp.where(xp.asarray(dropout_mask), dp * compute(_check_dropout(dropout_p)), 0)
    dp = rnd(dp)
    # D = rowsum(dO * O) (= rowsum(P * dP)) from O as the forward stores it: when P is nearly
    # one-hot, dP - D cancels and the rounding of O sets the error of dS, as it does in the kernel
    # (rowsum(P * dP) from the rounded P and dP, or a rounded D, would cancel exactly instead).
    # With dropout D is unchanged, since keep * keep = keep:
    #   rowsum(dO * O) = rowsum(dO * (P_drop V)) = rowsum(P_drop * (dO V^T)) = rowsum(P_drop * dP_drop)
    #                  = rowsum(P * keep / (1 - p) * dP_drop) = rowsum(P * dP).
    o = rnd(xp.einsum("bhqk,bkhd->bqhd", p_drop, v_))
    d_row = xp.einsum("bqhd,bqhd->bhq", do_, o)[..., None]
    # dS' = P * (dP - D): the gradient of the scores the softmax saw
    ds = p * (dp - d_row)
    if softcap:
        # dS = dS' * dS'/dS = dS' * (1 - tanh(S / softcap)^2)
        ds = ds * dcap
    ds = rnd(ds)
    # dQ = scale * dS K; dK = scale * dS^T Q
    dq = xp.einsum("bhqk,bkhd->bqhd", ds, k_) * compute(scale)
    dk = _sum_groups(xp.einsum("bhqk,bqhd->bkhd", ds, q_), nheads_k) * compute(scale)
    return rnd(dq), rnd(dk), rnd(dv)


def n_block_max(m_block, block_m, block_n, seqlen_q, seqlen_k, causal, row_shift=0):
    """Number of K/V tiles the Q tile m_block (rows from m_block * block_m - row_shift) visits
    (tiles n_block_max.. are fully masked)."""
    n_max = -(-seqlen_k // block_n)
    if causal:
        last_key = (m_block + 1) * block_m - row_shift - 1 + seqlen_k - seqlen_q  # the tile's last row sees up to here
        n_max = min(n_max, 0 if last_key < 0 else last_key // block_n + 1)
    return n_max


def tile_needs_mask(m_block, n_block, block_m, block_n, seqlen_q, seqlen_k, causal, row_shift=0):
    """True if some key of K/V tile n_block is invisible to some row of Q tile m_block (rows from
    m_block * block_m - row_shift)."""
    n_end = (n_block + 1) * block_n
    first_row_last_key = m_block * block_m - row_shift + seqlen_k - seqlen_q
    return n_end > seqlen_k or (causal and n_end - 1 > first_row_last_key)


def flash_forward_model(q, k, v, softmax_scale=None, causal=False, block_m=64, block_n=64, *, dropout_p=0.0, seed=0, offset=0,
                        fold_output_scale=False, row_shift=0, softcap=0.0):
    """The kernel's algorithm in NumPy: for each Q tile, K/V tiles from last to first, masking only
    tiles that need it; S in float32; online softmax in log2 units; P rounded to the input dtype
    before P V; O and lse from the final m and l. Returns (o, lse) like attention_reference.

    Dropout (dropout_p > 0; the kernel's IS_DROPOUT switch): each tile regenerates the keep bits
    of its own (rows, cols) with dropout_keep(seed, offset, ...) and zeroes the dropped entries of
    the rounded P that feeds P V; m and l (hence lse) follow the undropped P; the 1 / (1 - p) of
    the kept values is folded into the final normalisation O = acc_o / l / (1 - p), so P is
    rounded exactly as without dropout and no element is rescaled. Equals attention_reference
    with dropout_mask(seed, offset, batch, nheads, seqlen_q, seqlen_k, dropout_p).

    fold_output_scale (the sm_90a kernel without causal: kFoldScale) moves that normalisation
    onto the last K/V tile: there alpha and P (before its rounding) take (1 / (1 - p)) / l, so that
    the last P V leaves O normalised. row_shift (the causal sm_90a kernel: schedule.causal_row_shift)
    moves the Q tiles up: tile m holds rows [m * block_m - row_shift, (m + 1) * block_m - row_shift),
    those below 0 computed by the kernel and thrown away (here: left out).

    Softcap (softcap > 0; the kernel's IS_SOFTCAP switch): each tile's S becomes
    t = tanh(S * (scale / softcap)) before the mask, and the online softmax runs on t with
    scale_log2 = softcap * log2(e), so that t * scale_log2 = S' * log2(e) for the capped
    S' = softcap * t; lse stays in natural log. Equals attention_reference with the same softcap."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    dtype = q.dtype.name
    acc = np.float64 if dtype == "float64" else np.float32
    softcap = _check_softcap(softcap)
    # scale folds into the exponent, or with softcap into tanh's argument (softcap_scale)
    scale_log2 = acc((softcap if softcap else default_scale(head_dim, softmax_scale)) * LOG2E)
    softcap_scale = acc(default_scale(head_dim, softmax_scale) / softcap) if softcap else None
    rp_dropout = acc(_check_dropout(dropout_p))
    batch_head = np.arange(batch * nheads).reshape(batch, nheads, 1, 1)     # Philox counter word 2
    group = nheads // nheads_k
    # (batch, nheads, seqlen, d): K/V head h // group serves query head h.
    q_ = _upcast(q, acc).transpose(0, 2, 1, 3)
    k_ = np.repeat(_upcast(k, acc), group, axis=2).transpose(0, 2, 1, 3)
    v_ = np.repeat(_upcast(v, acc), group, axis=2).transpose(0, 2, 1, 3)
    o = np.zeros((batch, nheads, seqlen_q, head_dim), acc)
    lse = np.full((batch, nheads, seqlen_q), -np.inf, acc)
    for m_block in range(-(-seqlen_q // block_m)):
        first_row = m_block * block_m - row_shift
        rows = slice(max(first_row, 0), first_row + block_m)
        q_tile = q_[:, :, rows]                                   # (b, h, Br, d)
        row_ids = np.arange(seqlen_q)[rows]
        m_i = np.full(q_tile.shape[:-1], -np.inf, acc)            # running max of S * scale_log2
        l_i = np.zeros(q_tile.shape[:-1], acc)                    # running sum of P
        acc_o = np.zeros(q_tile.shape, acc)                       # unnormalised O
        for n_block in reversed(range(n_block_max(m_block, block_m, block_n, seqlen_q, seqlen_k, causal, row_shift))):
            cols = slice(n_block * block_n, (n_block + 1) * block_n)
            col_ids = np.arange(seqlen_k)[cols]
            # S = Q K_j^T   (b, h, Br, Bc)
            s = q_tile @ k_[:, :, cols].transpose(0, 1, 3, 2)
            if softcap:
                # S = tanh(S * scale / softcap), before the mask (cap_scores)
                s = np.tanh(s * softcap_scale)
            if tile_needs_mask(m_block, n_block, block_m, block_n, seqlen_q, seqlen_k, causal, row_shift):
                seen = (col_ids[None, :] < seqlen_k) & (not causal or col_ids[None, :] <= row_ids[:, None] + seqlen_k - seqlen_q)
                s = np.where(seen, s, -np.inf)
            # m_new = max(m_i, rowmax(S) * scale_log2); P = exp2(S * scale_log2 - m_new)
            m_new = np.maximum(m_i, s.max(axis=-1) * scale_log2)
            m_use = np.where(m_new == -np.inf, 0, m_new)
            alpha = np.exp2(m_i - m_use)
            p = np.exp2(s * scale_log2 - m_use[..., None])
            l_i = l_i * alpha + p.sum(axis=-1)
            if fold_output_scale and n_block == 0:                # the last tile: O leaves normalised
                inv_l = np.where(l_i > 0, rp_dropout / np.where(l_i > 0, l_i, 1), 0).astype(acc)
                alpha, p = alpha * inv_l, p * inv_l[..., None]
            p_in = round_to(p.astype(acc), dtype)                 # P as the GEMM reads it
            if dropout_p > 0:
                # P_in = P_in * keep, keep of exactly this tile's (rows, cols); l_i above saw all of P
                keep = dropout_keep(seed, offset, batch_head, row_ids[:, None], col_ids[None, :], dropout_p)
                p_in = np.where(keep, p_in, 0)
            acc_o = acc_o * alpha[..., None] + p_in @ v_[:, :, cols]
            m_i = m_new
        safe_l = np.where(l_i > 0, l_i, 1)
        # O = acc_o / l   (/ (1 - p) with dropout: the kept values' scale, applied once per row)
        o_tile = acc_o
        if not fold_output_scale:
            o_tile = acc_o / safe_l[..., None]
            if dropout_p > 0:
                o_tile = o_tile * rp_dropout
        o[:, :, rows] = np.where(l_i[..., None] > 0, o_tile, 0)
        lse[:, :, rows] = np.where(l_i > 0, m_i / LOG2E + np.log(safe_l), -np.inf)
    o = round_to(o.transpose(0, 2, 1, 3).astype(acc), dtype)
    return o, lse


def m_block_min(n_block, block_m, block_n, seqlen_q, seqlen_k, causal):
    """First Q tile that K/V tile n_block must visit (tiles before it see none of its keys); the
    number of Q tiles when no row sees the tile, so that range(m_block_min, n_m_blocks) is empty."""
    if not causal:
        return 0
    # Row i sees key j iff j <= i + seqlen_k - seqlen_q: the first row that sees the tile's first key.
    first_row = max(0, n_block * block_n - (seqlen_k - seqlen_q))
    if first_row >= seqlen_q:
        return -(-seqlen_q // block_m)
    return first_row // block_m


def flash_backward_model(dout, q, k, v, out, lse, softmax_scale=None, causal=False, block_m=64, block_n=64, *, dropout_p=0.0, seed=0, offset=0,
                         softcap=0.0):
    """The backward kernel's algorithm in NumPy (FlashAttention-2, K/V-tile outer loop): for each
    (batch, K/V head, K/V tile), dK and dV accumulate on chip over the group's query heads and the
    Q tiles from m_block_min; P is recomputed from the forward's lse; P and dS are rounded to the
    input dtype before their GEMMs; dQ accumulates in a float32 buffer (atomic additions in the
    kernels, in no fixed order).
    out and lse are the forward's. Returns (dq, dk, dv) in q's dtype.

    Dropout (dropout_p, seed, offset as the forward got them): each (Q tile, K/V tile) pair
    regenerates the forward's keep bits of its (rows, cols) and zeroes the dropped entries of the
    rounded P that feeds dV and of dP_drop = dO V^T. The 1 / (1 - p) of every kept value is
    factored out of the tile loop, as in the forward:
        dV = P_drop^T dO = (1 / (1 - p)) (P * keep)^T dO
        dS = P * (dP_drop * keep / (1 - p) - D) = (1 / (1 - p)) P * (dP_drop * keep - D'),
             D' = (1 - p) D = (1 - p) rowsum(dO * O)
    so the loop accumulates (P * keep)^T dO and dS' = P * (dP_drop * keep - D'), and the scales
    1 / (1 - p) (dV) and softmax_scale / (1 - p) (dK, dQ) are applied where softmax_scale already is.

    Softcap (softcap > 0, as the forward got it): S becomes t = tanh(S * (scale / softcap)) and
    P = exp2(t * softcap * log2(e) - lse * log2(e)), as in the forward; dS = P * (dP - D) * (1 - t * t),
    with 1 - t * t taken before the mask (t = -inf there), then scaled by softmax_scale as without it."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    dtype = q.dtype.name
    acc = np.float64 if dtype == "float64" else np.float32
    rp_dropout = _check_dropout(dropout_p)                                 # 1 / (1 - p)
    softcap = _check_softcap(softcap)
    # dQ and dK scale dS' by softmax_scale / (1 - p) (by softmax_scale without dropout)
    scale = acc(default_scale(head_dim, softmax_scale) * rp_dropout)
    # as in the forward: with softcap, scale moves into tanh's argument and softcap into the exponent
    scale_log2 = acc((softcap if softcap else default_scale(head_dim, softmax_scale)) * LOG2E)
    softcap_scale = acc(default_scale(head_dim, softmax_scale) / softcap) if softcap else None
    group = nheads // nheads_k
    q_, k_, v_, do_, o_ = (_upcast(x, acc) for x in (q, k, v, dout, out))
    # A row that sees no key has lse = -inf: use +inf so that P = exp2(S * scale_log2 - inf) = 0.
    lse_log2 = np.where(np.isneginf(lse), np.inf, _upcast(lse, acc) * acc(LOG2E)).astype(acc)
    # D = rowsum(dO * O)   (b, h, sq);  D' = (1 - p) D with dropout
    d_rows = (do_ * o_).sum(axis=-1).transpose(0, 2, 1)
    if dropout_p > 0:
        d_rows = d_rows * acc(1.0 - dropout_p)
    dq_accum = np.zeros((batch, seqlen_q, nheads, head_dim), acc)      # float32 buffer, atomic adds
    dk = np.zeros((batch, seqlen_k, nheads_k, head_dim), acc)
    dv = np.zeros((batch, seqlen_k, nheads_k, head_dim), acc)
    n_m_blocks = -(-seqlen_q // block_m)
    for b in range(batch):
        for h_k in range(nheads_k):
            for n_block in range(-(-seqlen_k // block_n)):
                cols = slice(n_block * block_n, (n_block + 1) * block_n)
                col_ids = np.arange(seqlen_k)[cols]
                k_tile, v_tile = k_[b, cols, h_k], v_[b, cols, h_k]             # (Bc, d)
                acc_dk = np.zeros(k_tile.shape, acc)                           # (Bc, d)
                acc_dv = np.zeros(v_tile.shape, acc)                           # (Bc, d)
                for h in range(h_k * group, (h_k + 1) * group):
                    for m_block in range(m_block_min(n_block, block_m, block_n, seqlen_q, seqlen_k, causal), n_m_blocks):
                        rows = slice(m_block * block_m, (m_block + 1) * block_m)
                        row_ids = np.arange(seqlen_q)[rows]
                        q_tile, do_tile = q_[b, rows, h], do_[b, rows, h]       # (Br, d)
                        # S = Q_i K_j^T   (Br, Bc)
                        s = q_tile @ k_tile.T
                        if softcap:
                            # S = t = tanh(S * scale / softcap); dS'/dS = 1 - t * t, before the mask
                            s = np.tanh(s * softcap_scale)
                            dcap = 1 - s * s
                        if tile_needs_mask(m_block, n_block, block_m, block_n, seqlen_q, seqlen_k, causal):
                            seen = (col_ids[None, :] < seqlen_k) & (not causal or col_ids[None, :] <= row_ids[:, None] + seqlen_k - seqlen_q)
                            s = np.where(seen, s, -np.inf)
                        # P = exp2(S * scale_log2 - lse_i * log2e)   (S = t with softcap)
                        p = np.exp2(s * scale_log2 - lse_log2[b, h, rows][:, None]).astype(acc)
                        p_in = round_to(p, dtype)                               # P as the GEMMs read it
                        # dP = dO_i V_j^T   (dP_drop with dropout)
                        dp = do_tile @ v_tile.T
                        if dropout_p > 0:
                            # the forward's keep bits of this tile: P_in = P_in * keep; dP' = dP_drop * keep
                            keep = dropout_keep(seed, offset, b * nheads + h, row_ids[:, None], col_ids[None, :], dropout_p)
                            p_in = np.where(keep, p_in, 0)
                            dp = np.where(keep, dp, 0)
                        # dV_j += P^T dO_i   ((P * keep)^T dO_i with dropout)
                        acc_dv += p_in.T @ do_tile
                        # dS = P * (dP - D_i)   (dS' = P * (dP_drop * keep - D'_i) with dropout)
                        ds = p * (dp - d_rows[b, h, rows][:, None])
                        if softcap:
                            # dS = dS * (1 - t * t): the gradient through the cap
                            ds = ds * dcap
                        ds = round_to(ds.astype(acc), dtype)
                        # dK_j += dS^T Q_i
                        acc_dk += ds.T @ q_tile
                        # dQ_i += scale * dS K_j   (atomicAdd into the float32 buffer)
                        dq_accum[b, rows, h] += scale * (ds @ k_tile)
                # dK_j = scale * dK_acc; dV_j = dV_acc   (dV_j = dV_acc / (1 - p) with dropout)
                dk[b, cols, h_k] = scale * acc_dk
                dv[b, cols, h_k] = acc_dv * acc(rp_dropout) if dropout_p > 0 else acc_dv
    # dQ, dK, dV rounded to the input dtype
    return tuple(from_float32(x, dtype) for x in (dq_accum, dk, dv))
