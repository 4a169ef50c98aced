"""The step's arithmetic per family feature: RMSNorm, RoPE, soft-capping and the two attention paths
(ordinary, row-exact). Pure functions of tensors; export/step_model.py calls them with what the family
record (export/families.py) says. See step_model.py for why attention is written this way."""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    # `half` = D / 2 passed in: x.shape[-1] // 2 would be traced as Shape/Gather/Div nodes per layer
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, scale_fp32: bool = False) -> torch.Tensor:
    """transformers' RMSNorms: normalise in fp32; Llama's then casts back and scales in the weight's dtype,
    Gemma's (`scale_fp32`, weight already 1 + w in fp32) scales in fp32 and casts after."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if scale_fp32:
        return (x32 * weight).to(x.dtype)
    return weight * x32.to(x.dtype)


def apply_rope(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, head_dim: int) -> torch.Tensor:
    """qk [T, H, D], cos/sin [T, 1, rotary_dim] -> RoPE on the first rotary_dim dims of each head (all D of
    them but for partial rotary, e.g. Phi-3 variants), the rest passed through."""
    if rotary_dim == head_dim:
        return qk * cos + rotate_half(qk, rotary_dim // 2) * sin
    rot = qk[..., :rotary_dim]
    return torch.cat((rot * cos + rotate_half(rot, rotary_dim // 2) * sin, qk[..., rotary_dim:]), dim=-1)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma's score and logit soft-capping); x itself when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_mask: torch.Tensor,
              past_key: torch.Tensor, past_value: torch.Tensor, past_mask: torch.Tensor | None,
              t: torch.Tensor | int, heads: tuple[int, int, int], scale: float, cap: float | None = None,
              shape_free: bool = False) -> torch.Tensor:
    """q [T, Hq, D] after RoPE, k/v [T, Hkv, D], the cache [S, Hkv, D], additive tree_mask [T, T] and optional
    past_mask [T, S] -> [T, Hq D]. One softmax over two score blocks (past, new): the cache is never
    concatenated. `t` is T as the caller traced it (the layer input's x.shape[0], or -1) and `heads`
    (Hq, Hkv, D) Python ints, so tracing records no shape arithmetic of its own. `shape_free` (with t = -1):
    the softmax written out over the two blocks (one max, one sum), so S is never read either and the graph
    has no Shape/Gather/Slice nodes, which GPU execution providers would run on the host (onnxruntime's
    CUDA graphs need every node on the device)."""
    hq, hkv, d = heads
    # Grouped-query layout [Hkv, G, T, D]: query head kv_head*G + g shares kv head kv_head.
    qg = (q * scale).view(t, hkv, hq // hkv, d).permute(1, 2, 0, 3)
    past_scores = softcap(torch.matmul(qg, past_key.permute(1, 2, 0).unsqueeze(1)), cap)       # [Hkv, G, T, S]
    if past_mask is not None:
        past_scores = past_scores + past_mask                                                  # [T, S] additive
    new_scores = softcap(torch.matmul(qg, k.permute(1, 2, 0).unsqueeze(1)), cap) + tree_mask   # [Hkv, G, T, T]
    past_values, new_values = past_value.permute(1, 0, 2).unsqueeze(1), v.permute(1, 0, 2).unsqueeze(1)
    if shape_free:
        past_scores, new_scores = past_scores.float(), new_scores.float()
        # The max over both blocks in one reduction (the past block may be empty: S = 0 at the first step)
        top = torch.cat((past_scores, new_scores), dim=-1).amax(dim=-1, keepdim=True)            # [Hkv, G, T, 1]
        past_exp, new_exp = (past_scores - top).exp(), (new_scores - top).exp()
        # One sum over both blocks: onnxruntime's ReduceSum over an empty past keeps the empty axis
        total = torch.cat((past_exp, new_exp), dim=-1).sum(dim=-1, keepdim=True)                  # [Hkv, G, T, 1]
        out = (torch.matmul((past_exp / total).to(q.dtype), past_values)
               + torch.matmul((new_exp / total).to(q.dtype), new_values))                        # [Hkv, G, T, D]
    else:
        probs = torch.softmax(torch.cat((past_scores, new_scores), dim=-1).float(), dim=-1).to(q.dtype)
        s = past_key.shape[0]
        out = torch.matmul(probs[..., :s], past_values) + torch.matmul(probs[..., s:], new_values)  # [Hkv, G, T, D]
    return out.permute(2, 0, 1, 3).reshape(t, hq * d)


def row_exact_mask(tree_mask: torch.Tensor, past_mask: torch.Tensor | None, past_length: torch.Tensor | int,
                   group: int) -> torch.Tensor:
    """The additive mask of row_exact_attention, built once per step and attention kind (not per layer):
    [G T, S + T], the tree mask [T, T] after S visible past columns (or past_mask [T, S]), repeated for the
    G query heads of a kv head (row g T + t is head g's query t)."""
    t = tree_mask.shape[0]
    mask = nn.functional.pad(tree_mask, (past_length, 0))
    if past_mask is not None:
        mask = mask + nn.functional.pad(past_mask, (0, t))
    return mask.repeat(group, 1)


def row_exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        past_key: torch.Tensor, past_value: torch.Tensor, heads: tuple[int, int, int], scale: float,
                        cap: float | None = None) -> torch.Tensor:
    """The attention of `attention` with every sum's bits independent of T, of where the tree put a
    node's ancestors and of which earlier tokens were committed by which step (the past/new split):
    q [T, Hq, D] after RoPE, k, v [T, Hkv, D], mask from row_exact_mask -> [T, Hq D] in q's dtype.
    A score is one dot over D by one GEMM kernel, exp is per element; the softmax's sum and the sum
    over keys run in float64 (fp32 products are exact in fp64, and fp64 sums of a few thousand terms
    are ~1e-16 off, so the fp32 result no longer depends on how the sums are ordered or grouped)."""
    hq, hkv, d = heads
    group = hq // hkv
    wide = torch.float64
    # Query rows of a kv head stacked: [Hkv, G T, D], so the score GEMM has M = G T (never MLAS's
    # M = 1 kernel when G > 1). Past and new keys (and values) in one GEMM each: an empty past as a
    # GEMM of its own (K or N = 0) crashed onnxruntime 1.31 (SIGFPE) after its graph fusions. Each
    # score is one dot over D in the cache dtype, the same bits whatever T and the split.
    qg = (q * scale).view(-1, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, -1, d)
    keys = torch.cat((past_key, k), dim=0)                                                      # [S + T, Hkv, D]
    scores = softcap(torch.matmul(qg, keys.permute(1, 2, 0)), cap) + mask                       # [Hkv, G T, S + T]
    # Softmax spelled out, its sums in fp64: the max, the subtraction and exp are per element in the
    # cache dtype (the same bits wherever the element sits: checked for onnxruntime's vectorised exp),
    # widened exactly. onnxruntime's fp64 Softmax and fp64 Exp are scalar code, 3-5x slower.
    exps = (scores - scores.amax(dim=-1, keepdim=True)).exp().to(wide)                        # [Hkv, G T, S + T]
    values = torch.cat((past_value, v), dim=0).permute(1, 0, 2).to(wide)                       # [Hkv, S + T, D]
    out = torch.matmul(exps, values) / exps.sum(dim=-1, keepdim=True)                          # [Hkv, G T, D]
    return out.to(q.dtype).view(hkv, group, -1, d).permute(2, 0, 1, 3).reshape(-1, hq * d)
