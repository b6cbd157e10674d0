"""Language-model losses: the next-token cross entropy, from full logits (``lm_loss``) or, without
materialising them, chunked over tokens together with the head GEMM (``chunked_cross_entropy``;
its vocabulary-parallel form passes a ``VocabShard`` of TP collectives, parallel/vocab_parallel.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..linear import CollectiveHooks, linear_dtypes
from ..linear.linear_fn import high_precision_gemm

DEFAULT_CE_CHUNK_TOKENS = 1024  # tokens per chunk of the chunked cross entropy


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy of one micro-batch in FP32 (labels -100 ignored): the mean,
    or with ``reduction="none"`` the per-token losses (B, T).  Needs the full logits;
    ``chunked_lm_loss`` computes the same from the hidden states and the head weight without them."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


# -- chunked cross entropy: head GEMM + softmax cross entropy, a chunk of tokens at a time ----
class VocabShard(CollectiveHooks):
    """How a head weight relates to the full vocabulary, for ``chunked_cross_entropy``: it
    holds rows [start, start + rows) and its logits are combined over ranks with
    ``all_max`` / ``all_sum`` (plus the column-parallel ``gather_input`` /
    ``reduce_input_grad`` of ``CollectiveHooks``).  The identity here: one process holds the
    whole vocabulary.  parallel/vocab_parallel.py passes the TP collectives."""

    start = 0

    def all_max(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x


WHOLE_VOCAB = VocabShard()


def _acc_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """The loss dtype: FP32, or wider for a wider head (float64 references in tests)."""
    return torch.promote_types(out_dtype, torch.float32)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, out_dtype, hp_dtype) -> torch.Tensor:
    """FP32 logits of one chunk, rounded exactly as the high-precision head's output
    (linear_fn's ``finish``: to the GEMM dtype, then the output dtype) and then ``.float()``,
    as the unchunked path (``head(h).float()``) computes them."""
    z = high_precision_gemm(h, weight, hp_dtype)
    acc = _acc_dtype(out_dtype)
    if z.dtype != acc or hp_dtype != acc or out_dtype != acc:
        z = z.to(hp_dtype).to(out_dtype).to(acc)
    return z


def _accumulate_wgrad(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, hp_dtype) -> None:
    """``acc += high_precision_gemm(a, b, hp_dtype)`` (inputs rounded to ``hp_dtype``, FP32 or
    wider products) without a temporary the size of ``acc``, the whole [V_local, H] weight
    gradient: an in-place addmm (bf16 / fp16 inputs widened first, their products are exact
    in FP32); a CUDA half GEMM with an FP32 result goes through row blocks of <= 2^24 elements."""
    a, b = a.to(hp_dtype), b.to(hp_dtype)
    if hp_dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        rows = max(1, (1 << 24) // max(1, b.shape[0]))
        for r in range(0, a.shape[0], rows):
            acc[r:r + rows] += high_precision_gemm(a[r:r + rows], b, hp_dtype)
        return
    if a.dtype != acc.dtype:
        a, b = a.to(acc.dtype), b.to(acc.dtype)
    acc.addmm_(a, b.t())


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of ``hidden @ weight.T`` without the full logits.

    Forward, per chunk of ``chunk`` tokens: the chunk's FP32 logits z [c, V_local], the row
    maximum m (all-reduced MAX over the shard group), s = sum exp(z - m) and the target's
    z_y - m (one stacked SUM all-reduce), loss = log s - (z_y - m); only m and s (2 floats per
    token) are kept.  Backward recomputes each chunk's logits (one more head GEMM), forms
    dz = (exp(z - m) / s - onehot(y)) g, rounds it to the head's output dtype (what the
    unchunked ``.float()`` backward hands the head) and accumulates dH = dz W and
    dW += dz^T h in FP32; dH is reduced over the group (column-parallel input gradient),
    both are rounded once at the end like linear_fn's.  Peak: a few [c, V_local] FP32
    buffers instead of [N, V_local] ones.  The rounding points are the unchunked head +
    cross entropy's; what differs is FP32 summation order (dW over tokens in chunk partial
    sums, the reductions of the mean) -- see tests/test_chunked_ce.py for the bound."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, shard, chunk, ignore_index, out_dtype, hp_dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            x = shard.gather_input(hidden)
            x2, y = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
            if x2.shape[0] != y.shape[0]:
                raise ValueError(f"hidden {tuple(x.shape)} and labels {tuple(labels.shape)} disagree on the tokens")
            v_local = weight.shape[0]
            n = y.shape[0]
            loss = torch.empty(n, dtype=_acc_dtype(out_dtype), device=hidden.device)
            m_all = torch.empty_like(loss)
            s_all = torch.empty_like(loss)
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                z = _chunk_logits(x2[a:b], weight, out_dtype, hp_dtype)
                yc = y[a:b]
                m = shard.all_max(z.amax(dim=-1))
                z.sub_(m.unsqueeze(-1))
                outside = (yc < shard.start) | (yc >= shard.start + v_local)
                local = (yc - shard.start).masked_fill(outside, 0)
                picked = z.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
                both = shard.all_sum(torch.stack([picked, z.exp_().sum(dim=-1)]))
                del z
                loss[a:b] = both[1].log() - both[0]
                m_all[a:b], s_all[a:b] = m, both[1]
            ignored = y == ignore_index
            loss.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(hidden, weight, labels, m_all, s_all)
        ctx.shard, ctx.chunk, ctx.ignore_index, ctx.dtypes = shard, chunk, ignore_index, (out_dtype, hp_dtype)
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, g):
        hidden, weight, labels, m_all, s_all = ctx.saved_tensors
        shard, chunk = ctx.shard, ctx.chunk
        out_dtype, hp_dtype = ctx.dtypes
        with torch.autocast(hidden.device.type, enabled=False):
            x = shard.gather_input(hidden)
            x2, y = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
            g = g.reshape(-1).to(m_all.dtype).masked_fill(y == ctx.ignore_index, 0.0)
            v_local, n = weight.shape[0], y.shape[0]
            need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            acc = m_all.dtype
            dx = torch.empty(x2.shape, dtype=acc, device=x2.device) if need_x else None
            dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                z = _chunk_logits(x2[a:b], weight, out_dtype, hp_dtype)
                yc = y[a:b]
                p = z.sub_(m_all[a:b].unsqueeze(-1)).exp_().div_(s_all[a:b].unsqueeze(-1))
                inside = (yc >= shard.start) & (yc < shard.start + v_local)
                rows = inside.nonzero().squeeze(-1)
                p[rows, yc[rows] - shard.start] -= 1.0
                dz = p.mul_(g[a:b].unsqueeze(-1)).to(out_dtype)
                del z, p
                if need_x:
                    dx[a:b] = high_precision_gemm(dz, weight.t(), hp_dtype)
                if need_w:
                    _accumulate_wgrad(dw, dz.t(), x2[a:b].t(), hp_dtype)
                del dz
            dh = dw_out = None
            if need_x:
                dh = shard.reduce_input_grad(dx.view(*x.shape))
                dh = (dh.to(hp_dtype) if hp_dtype is not None else dh).to(hidden.dtype)
            if need_w:
                dw_out = dw.to(hp_dtype).to(weight.dtype)
        return dh, dw_out, None, None, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          shard: VocabShard = WHOLE_VOCAB, chunk_tokens: int = DEFAULT_CE_CHUNK_TOKENS,
                          ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of the high-precision head ``hidden @ weight.T`` (no bias) against
    ``labels``, ``chunk_tokens`` tokens at a time, so the FP32 logits [tokens, vocab] never
    exist at once, in forward or backward.  ``hidden`` [B, T, H] (T local under sequence
    parallelism, see ``shard``), ``labels`` [B, T_full].  Same semantics as
    ``F.cross_entropy(head(hidden).float(), labels)``: ``ignore_index``, reductions "mean"
    (over non-ignored labels), "sum", "none"; same dtype rule as the head's linear (autocast:
    GEMM inputs in the autocast dtype, FP32 products, logits rounded to the output dtype)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none' (got {reduction!r})")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer (got {chunk_tokens!r})")
    if hidden.dim() != 3 or labels.dim() != 2:
        raise ValueError(f"hidden must be [B, T, H] and labels [B, T] (got {tuple(hidden.shape)}, "
                         f"{tuple(labels.shape)})")
    out_dtype, hp_dtype = linear_dtypes(hidden, weight, quantized=False)
    loss = _ChunkedCrossEntropy.apply(hidden, weight, labels, shard, chunk_tokens, ignore_index, out_dtype,
                                      hp_dtype)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (labels != ignore_index).sum().clamp_min(1)


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    chunk_tokens: int = DEFAULT_CE_CHUNK_TOKENS) -> torch.Tensor:
    """``lm_loss(head(hidden).float(), labels)`` for a bias-free high-precision head of
    weight ``weight`` [V, H], without materialising the logits (``chunked_cross_entropy``)."""
    return chunked_cross_entropy(hidden, weight, labels, chunk_tokens=chunk_tokens)


# -- parameter counts ------------------------------------------------------------------------
