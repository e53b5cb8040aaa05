"""dK and dV when each key gathers the gradient of very many query rows: seqlen_q = 2^20 queries,
512 keys, 16 query heads over 4 kv heads (each dK/dV row sums 4 x 2^20 terms), fp16. Prints the
max error of dq, dk, dv against float64, beside the error of the same computation done in fp16
with float32 accumulation by cuBLAS (torch), for each kernel family.

The float64 and fp16 references are computed in chunks of query rows on the GPU: P, dP, dS of a
chunk, its dQ rows, and its contribution to dK and dV added in float64 (the fp16 yardstick adds
its chunks' float32 partial sums in float32)."""
import os
import sys

import torch

import cuflash

SEQLEN_Q, SEQLEN_K, NHEADS, NHEADS_K = 2**20, 512, 16, 4
CHUNK = 2**15


def reference(q, k, v, do, o, lse_unused, dtype):
    """(dq, dk, dv) computed chunk by chunk in `dtype` (torch.float64, or torch.float16 with
    float32 accumulation as torch's fp16 math gives)."""
    group = NHEADS // NHEADS_K
    scale = q.shape[-1] ** -0.5
    kk, vv = (x.to(dtype).repeat_interleave(group, dim=2) for x in (k, v))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dk, dv = (torch.zeros(kk.shape, dtype=acc, device="cuda") for _ in range(2))
    dq = torch.empty(q.shape, dtype=dtype, device="cuda")
    for start in range(0, q.shape[1], CHUNK):
        rows = slice(start, start + CHUNK)
        qc, doc = q[:, rows].to(dtype), do[:, rows].to(dtype)
        s = torch.einsum("bqhd,bkhd->bhqk", qc, kk) * scale
        p = torch.softmax(s.float() if dtype != torch.float64 else s, dim=-1).to(dtype)
        oc = torch.einsum("bhqk,bkhd->bqhd", p, vv)
        dp = torch.einsum("bqhd,bkhd->bhqk", doc, vv)
        d_row = (doc.to(acc) * oc.to(acc)).sum(-1).transpose(1, 2)[..., None]
        ds = (p.to(acc) * (dp.to(acc) - d_row)).to(dtype)
        dq[:, rows] = torch.einsum("bhqk,bkhd->bqhd", ds, kk) * scale
        dk += torch.einsum("bhqk,bqhd->bkhd", ds, qc).to(acc) * scale
        dv += torch.einsum("bhqk,bqhd->bkhd", p, doc).to(acc)
    fold = lambda x: x.reshape(*x.shape[:2], NHEADS_K, group, x.shape[-1]).sum(3)  # noqa: E731
    return dq, fold(dk), fold(dv)


def main(head_dim):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, SEQLEN_Q, NHEADS, head_dim, generator=gen, device="cuda").half()
    k, v = (torch.randn(1, SEQLEN_K, NHEADS_K, head_dim, generator=gen, device="cuda").half() for _ in range(2))
    do = torch.randn(q.shape, generator=gen, device="cuda").half()
    ref = reference(q, k, v, do, None, None, torch.float64)
    low = reference(q, k, v, do, None, None, torch.float16)
    err = lambda a, b: float((a.double() - b.double()).abs().max())  # noqa: E731
    yard = [err(x, r) for x, r in zip(low, ref)]
    print(f"d{head_dim} fp16 computation (torch, fp32 accumulation): dq {yard[0]:.4f} dk {yard[1]:.4f} "
          f"dv {yard[2]:.4f}; max |dk| {float(ref[1].abs().max()):.1f} |dv| {float(ref[2].abs().max()):.1f}")
    for family in ("default", "portable"):
        os.environ["CUFLASH_PORTABLE"] = "1" if family == "portable" else "0"
        o, lse = cuflash.forward(q, k, v)
        grads = cuflash.backward(do, q, k, v, o, lse)
        ours = [err(x, r) for x, r in zip(grads, ref)]
        print(f"d{head_dim} cuflash {family:8s}: dq {ours[0]:.4f} dk {ours[1]:.4f} dv {ours[2]:.4f} "
              f"(ratio to fp16: {ours[1] / yard[1]:.1f} {ours[2] / yard[2]:.1f})", flush=True)


if __name__ == "__main__":
    for head_dim in map(int, sys.argv[1:] or ["64"]):
        main(head_dim)
