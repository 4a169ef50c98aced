"""The step function: one forward pass over a token tree on top of a committed KV cache.

    step(input_ids [T], position_ids [T], tree_mask [T, T], past_keys[l] [S, Hkv, D], past_values[l])
        -> logits [T, V], new_keys [L, T, Hkv, D], new_values [L, T, Hkv, D]

Batch is 1 and implicit. `past_*` are the S committed entries (every tree node may see all of
them); `tree_mask` is additive (0 = visible, the dtype's lowest finite value = hidden) and only
covers the T new tokens. The step never writes the cache: it returns the new entries and the
runtime commits the accepted ones. This is the exact signature the ONNX exporter traces; only
training passes the optional additive `past_mask` [T, S] (PPD prompt groups attached after
different positions of one cached sequence), the traced step leaves it None.

Token ids >= vocab_size are method slots, so every backend takes plain int64 ids; the LM head
keeps the vocabulary size. With an extra embedding table (PPD prompt tokens) they select its rows;
with HT transfer maps (export/ht.py) id vocab_size + j is a pseudo slot whose row is replaced,
right after layer l, by map j applied to its source node's layer-l state (`HiddenTransfer`). The
two are mutually exclusive.

Why a compact forward instead of transformers' LlamaModel with a 4-D mask (measured on the 2-core
CPU, see README): the weights are stored pre-transposed ([in, out]) and q/k/v and gate/up fused,
which makes MKL's small-M GEMMs of tree steps 1.5-2x faster than nn.Linear's [out, in] layout;
and attention over past and new keys is one softmax over two score blocks, so the cache is never
concatenated (no copy of the cache per layer per step).

`row_exact=True` computes the same attention with every sum's bits independent of how the step was
cut: not of T, of where a tree put a node's ancestors, or of which earlier tokens were committed by
which step (the split between past and new keys). Each score is one dot over D by the same GEMM kernel
(the query rows of a kv head stacked, M = G T, so never MLAS's M = 1 kernel when G > 1; past and new keys
in one GEMM); the max, the subtraction and exp are per element; the softmax's sum and the sum over
keys run in float64 (fp32 products are exact in fp64 and fp64 sums of a few thousand terms are ~1e-16
off, so the fp32 result no longer depends on their order or grouping). Graphs that quantize activations
per row (MatMulNBits accuracy level 4, export/quantize.py) need this: an int8 rounding flipped by a 1e-7
difference grows to 0.3-1.0 logits over 30 layers, so with the ordinary attention tree decoding stops
matching one-token decoding (measured: a near-tie flips within 32 tokens on HumanEval). Every quantized
build checks it bitwise (export/row_independence.py). Measured (onnxruntime 1.31 MLAS, x86, int4, T = 1
at 300 cached tokens, the graph alone, median of 7 interleaved): the all-fp64 attention it replaces
8.6 ms, this formulation 6.5 ms (with fewer traced nodes: views by -1 and constant slices instead of
traced shape arithmetic; it concatenates the cache, the ordinary attention does not). Tried and
refused: one M = 1 matmul per query row (bitwise across T, not across the split); fp32 scores with
fp64 sums while the score GEMM had M = T; onnxruntime's fp64 Softmax and Exp (scalar code, 3-5x
slower than these ops).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from export.ht import TransferMaps


def lowest_mask_value(dtype: torch.dtype) -> float:
    """Additive mask value for hidden entries: finite, so fp16 never produces NaN."""
    return torch.finfo(dtype).min


def rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    # `half` = D / 2 passed in: x.shape[-1] // 2 would be traced as Shape/Gather/Div nodes per layer
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as transformers' LlamaRMSNorm: normalise in fp32, scale in the weight's dtype.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().contiguous(), requires_grad=False)


class DecoderLayer(nn.Module):
    """One Llama block with fused, pre-transposed projection weights."""

    def __init__(self, hf_layer: nn.Module) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.input_norm = _frozen(hf_layer.input_layernorm.weight)
        self.post_norm = _frozen(hf_layer.post_attention_layernorm.weight)
        # [H, (Hq + 2 Hkv) D]: columns are q | k | v
        self.qkv_t = _frozen(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).t())
        self.o_t = _frozen(attn.o_proj.weight.t())                                   # [Hq D, H]
        self.gate_up_t = _frozen(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t())  # [H, 2I]
        self.down_t = _frozen(mlp.down_proj.weight.t())                             # [I, H]
        self.intermediate = int(mlp.down_proj.weight.shape[1])   # I, a Python int: constant slices when traced


class HiddenTransfer(nn.Module):
    """HT's transfer maps inside the step: after layer `layer`, each pseudo row (id vocab_size + j)
    becomes `h_src @ weight[j] + bias[j]`, h_src the layer-`layer` state of the row's source node.

    The source is found in-graph from the step's own inputs, with no data-dependent Python control
    flow (so torch.onnx.export traces it): among the rows a pseudo row may see (tree_mask == 0) that
    hold real tokens, the one with the largest position id. Pseudo slots hang off a node as a chain,
    so the visible real rows are that node and its ancestors, whose positions (depths) all differ:
    the largest is the node itself, never a node of another branch. Pseudo rows' K/V at layers
    <= l are junk, but only later pseudo rows of the same chain see them and pseudo KV is never
    committed."""

    def __init__(self, maps: TransferMaps, vocab_size: int) -> None:
        super().__init__()
        self.layer = maps.layer
        self.vocab_size = vocab_size
        self.num_maps = maps.num_maps
        self.weight = _frozen(maps.weight)     # [k, H, H] ([in, out])
        self.bias = _frozen(maps.bias)         # [k, H]

    def source_rows(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    tree_mask: torch.Tensor) -> torch.Tensor:
        """[T] index of each row's source: the nearest real (non-pseudo) row it sees; a real row's is itself."""
        is_real = input_ids < self.vocab_size                                       # [T]
        visible_real = (tree_mask == 0) & is_real.unsqueeze(0)                      # [T, T]
        score = torch.where(visible_real, position_ids.to(torch.float32).unsqueeze(0), -1.0)
        return score.argmax(dim=-1)

    def forward(self, h: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                tree_mask: torch.Tensor) -> torch.Tensor:
        # h: [T, H] output of layer `layer` -> same, pseudo rows replaced by their transferred state
        t = h.shape[0]
        source = h.index_select(0, self.source_rows(input_ids, position_ids, tree_mask))      # [T, H]
        mapped = torch.matmul(source, self.weight.to(h.dtype)) + self.bias.to(h.dtype).unsqueeze(1)  # [k, T, H]
        slot = (input_ids - self.vocab_size).clamp(min=0, max=self.num_maps - 1)             # [T] map j
        pseudo = mapped.gather(0, slot.view(1, t, 1).expand(1, t, h.shape[1])).squeeze(0)   # [T, H]
        return torch.where((input_ids >= self.vocab_size).unsqueeze(-1), pseudo, h)

    def transfer(self, source: torch.Tensor) -> torch.Tensor:
        """[G, H] layer-l states of G source positions -> [G, k, H] pseudo states (training)."""
        return (torch.matmul(source, self.weight) + self.bias.unsqueeze(1)).transpose(0, 1)


class StepModel(nn.Module):
    def __init__(self, hf_model: LlamaForCausalLM, extra_embeddings: torch.Tensor | None = None,
                 transfer_maps: TransferMaps | None = None, row_exact: bool = False) -> None:
        super().__init__()
        self.row_exact = row_exact
        if extra_embeddings is not None and transfer_maps is not None:
            raise ValueError("a step model takes PPD prompt-token rows or HT transfer maps, not both: "
                             "build it for one method")
        config: LlamaConfig = hf_model.config
        for name in ("attention_bias", "mlp_bias"):
            if getattr(config, name, False):
                raise ValueError(f"checkpoints with {name}=True are not supported yet")
        self.config = config
        self.vocab_size = config.vocab_size
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.layers = nn.ModuleList(DecoderLayer(layer) for layer in hf_model.model.layers)
        self.final_norm = _frozen(hf_model.model.norm.weight)
        self.lm_head_t = _frozen(hf_model.lm_head.weight.t())                   # [H, V]
        # Tied checkpoints look embeddings up in the head's columns: no second [V, H] copy.
        self.tied = bool(config.tie_word_embeddings)
        self.embed_weight = None if self.tied else _frozen(hf_model.model.embed_tokens.weight)
        rotary = LlamaRotaryEmbedding(config)
        self.register_buffer("inv_freq", rotary.inv_freq.float().clone(), persistent=False)
        self.rope_scaling = float(rotary.attention_scaling)
        # [E, H] rows for ids vocab_size .. vocab_size + E - 1 (PPD prompt tokens), or None.
        self.extra_embeddings = None if extra_embeddings is None else _frozen(extra_embeddings)
        self.transfer = None
        if transfer_maps is not None:
            if transfer_maps.hidden_size != config.hidden_size:
                raise ValueError(f"transfer maps of hidden size {transfer_maps.hidden_size} do not fit a model of "
                                 f"hidden size {config.hidden_size}: use maps trained for this model")
            if transfer_maps.layer >= self.num_layers:
                raise ValueError(f"transfer maps read layer {transfer_maps.layer}, but the model has layers "
                                 f"0..{self.num_layers - 1}: use maps trained for this model")
            self.transfer = HiddenTransfer(transfer_maps, self.vocab_size)

    @property
    def num_extra_tokens(self) -> int:
        if self.transfer is not None:
            return self.transfer.num_maps
        return 0 if self.extra_embeddings is None else int(self.extra_embeddings.shape[0])

    def embed_vocab(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] in 0..V-1 -> [T, H]
        if self.tied:
            return self.lm_head_t.t()[input_ids]
        return self.embed_weight[input_ids]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.transfer is not None:  # pseudo slots: any harmless row (token 0); replaced after layer l
            return self.embed_vocab(torch.where(input_ids < self.vocab_size, input_ids, 0))
        if self.extra_embeddings is None:
            return self.embed_vocab(input_ids)
        is_extra = (input_ids >= self.vocab_size).unsqueeze(-1)
        vocab = self.embed_vocab(input_ids.clamp(max=self.vocab_size - 1))
        extra = self.extra_embeddings[(input_ids - self.vocab_size).clamp(min=0, max=self.num_extra_tokens - 1)]
        return torch.where(is_extra, extra.to(vocab.dtype), vocab)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [T] -> cos, sin: [T, 1, D] (broadcast over heads)
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(dtype).unsqueeze(1)
        sin = (emb.sin() * self.rope_scaling).to(dtype).unsqueeze(1)
        return cos, sin

    def attention(self, layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  tree_mask: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                  past_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = x.shape[0]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        group = hq // hkv
        qkv = x @ layer.qkv_t                                                   # [T, (Hq + 2 Hkv) D]
        qk = qkv[:, : (hq + hkv) * d].view(-1, hq + hkv, d)          # -1, not t: no shape arithmetic traced
        qk = qk * cos + rotate_half(qk, d // 2) * sin                                   # RoPE on q and k at once
        q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, (hq + hkv) * d :].view(-1, hkv, d)
        if self.row_exact:   # tree_mask is the step's row_exact_mask [G T, S + T], past_mask folded in
            return self.row_exact_attention(q, k, v, tree_mask, past_key, past_value) @ layer.o_t, k, v
        # Grouped-query layout [Hkv, G, T, D]: query head kv_head*G + g shares kv head kv_head.
        qg = (q * d ** -0.5).view(t, hkv, group, d).permute(1, 2, 0, 3)
        past_scores = torch.matmul(qg, past_key.permute(1, 2, 0).unsqueeze(1))       # [Hkv, G, T, S]
        if past_mask is not None:
            past_scores = past_scores + past_mask                                    # [T, S] additive
        new_scores = torch.matmul(qg, k.permute(1, 2, 0).unsqueeze(1)) + tree_mask   # [Hkv, G, T, T]
        probs = torch.softmax(torch.cat((past_scores, new_scores), dim=-1).float(), dim=-1).to(x.dtype)
        s = past_key.shape[0]
        out = (torch.matmul(probs[..., :s], past_value.permute(1, 0, 2).unsqueeze(1))
               + torch.matmul(probs[..., s:], v.permute(1, 0, 2).unsqueeze(1)))           # [Hkv, G, T, D]
        out = out.permute(2, 0, 1, 3).reshape(t, hq * d)
        return out @ layer.o_t, k, v

    def row_exact_mask(self, tree_mask: torch.Tensor, past_mask: torch.Tensor | None,
                       past_length: torch.Tensor | int) -> torch.Tensor:
        """The additive mask of row_exact_attention, built once per step (not per layer): [G T, S + T],
        the tree mask [T, T] after S visible past columns (or past_mask [T, S]), repeated for the G
        query heads of a kv head (row g T + t is head g's query t)."""
        t = tree_mask.shape[0]
        mask = nn.functional.pad(tree_mask, (past_length, 0))
        if past_mask is not None:
            mask = mask + nn.functional.pad(past_mask, (0, t))
        return mask.repeat(self.num_heads // self.num_kv_heads, 1)

    def row_exact_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            past_key: torch.Tensor, past_value: torch.Tensor) -> torch.Tensor:
        """The attention of `attention` with every sum's bits independent of T, of where the tree put a
        node's ancestors and of which earlier tokens were committed by which step (the past/new split):
        q [T, Hq, D] after RoPE, k, v [T, Hkv, D], mask from row_exact_mask -> [T, Hq D] in q's dtype.
        A score is one dot over D by one GEMM kernel, exp is per element; the softmax's sum and the sum
        over keys run in float64 (fp32 products are exact in fp64, and fp64 sums of a few thousand terms
        are ~1e-16 off, so the fp32 result no longer depends on how the sums are ordered or grouped)."""
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        group = hq // hkv
        wide = torch.float64
        # Query rows of a kv head stacked: [Hkv, G T, D], so the score GEMM has M = G T (never MLAS's
        # M = 1 kernel when G > 1). Past and new keys (and values) in one GEMM each: an empty past as a
        # GEMM of its own (K or N = 0) crashed onnxruntime 1.31 (SIGFPE) after its graph fusions. Each
        # score is one dot over D in the cache dtype, the same bits whatever T and the split.
        qg = (q * d ** -0.5).view(-1, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, -1, d)
        keys = torch.cat((past_key, k), dim=0)                                                   # [S + T, Hkv, D]
        scores = torch.matmul(qg, keys.permute(1, 2, 0)) + mask                                  # [Hkv, G T, S + T]
        # Softmax spelled out, its sums in fp64: the max, the subtraction and exp are per element in the
        # cache dtype (the same bits wherever the element sits: checked for onnxruntime's vectorised exp),
        # widened exactly. onnxruntime's fp64 Softmax and fp64 Exp are scalar code, 3-5x slower.
        exps = (scores - scores.amax(dim=-1, keepdim=True)).exp().to(wide)                     # [Hkv, G T, S + T]
        values = torch.cat((past_value, v), dim=0).permute(1, 0, 2).to(wide)                    # [Hkv, S + T, D]
        out = torch.matmul(exps, values) / exps.sum(dim=-1, keepdim=True)                       # [Hkv, G T, D]
        return out.to(q.dtype).view(hkv, group, -1, d).permute(2, 0, 1, 3).reshape(-1, hq * d)

    def mlp(self, layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        gate_up = x @ layer.gate_up_t                                             # [T, 2I]
        gate, up = gate_up[:, : layer.intermediate], gate_up[:, layer.intermediate :]
        return (nn.functional.silu(gate) * up) @ layer.down_t

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor,
                      past_keys: list[torch.Tensor], past_values: list[torch.Tensor],
                      past_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step without the LM head: final-normed hidden states [T, H] and the new KV.
        `past_mask` [T, S] (additive, optional) hides committed entries from some rows."""
        h = self.embed(input_ids)
        cos, sin = self.rope(position_ids, h.dtype)
        tree_mask = tree_mask.to(h.dtype)
        past_mask = None if past_mask is None else past_mask.to(h.dtype)
        layer_mask, layer_past_mask = tree_mask, past_mask        # what each layer's attention takes
        if self.row_exact:
            layer_mask, layer_past_mask = self.row_exact_mask(tree_mask, past_mask, past_keys[0].shape[0]), None
        split = self.num_layers if self.transfer is None else self.transfer.layer + 1
        h, keys, values = self.run_layers(h, cos, sin, layer_mask, past_keys, past_values, layer_past_mask, 0, split)
        if self.transfer is not None:
            h = self.transfer(h, input_ids, position_ids, tree_mask)
            h, upper_keys, upper_values = self.run_layers(h, cos, sin, layer_mask, past_keys, past_values,
                                                          layer_past_mask, split, self.num_layers)
            keys, values = keys + upper_keys, values + upper_values
        return self.final_hidden(h), torch.stack(keys), torch.stack(values)

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.final_norm, self.eps)

    def run_layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tree_mask: torch.Tensor,
                   past_keys: list[torch.Tensor], past_values: list[torch.Tensor], past_mask: torch.Tensor | None,
                   start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Decoder layers start..stop-1 on the residual stream h [T, H] (past_* indexed by absolute
        layer); returns h after layer stop-1 and the new K/V of those layers."""
        new_keys, new_values = [], []
        for i in range(start, stop):
            layer = self.layers[i]
            a, k, v = self.attention(layer, rms_norm(h, layer.input_norm, self.eps), cos, sin, tree_mask,
                                     past_keys[i], past_values[i], past_mask)
            h = h + a
            h = h + self.mlp(layer, rms_norm(h, layer.post_norm, self.eps))
            new_keys.append(k)
            new_values.append(v)
        return h, new_keys, new_values

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor,
                past_keys: list[torch.Tensor], past_values: list[torch.Tensor],
                past_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, new_keys, new_values = self.hidden_states(input_ids, position_ids, tree_mask, past_keys, past_values,
                                                          past_mask)
        return hidden @ self.lm_head_t, new_keys, new_values
