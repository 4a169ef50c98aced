"""The step function: one forward pass over a token tree on top of a committed KV cache.

    step(input_ids [T], position_ids [T], tree_mask [T, T], past_keys[l] [S, Hkv, D], past_values[l]
         [, sliding_tree_mask [T, T], sliding_past_mask [T, S]])
        -> logits [T, V], new_keys [L, T, Hkv, D], new_values [L, T, Hkv, D]

Batch is 1 and implicit. `past_*` are the S committed entries (on global layers every tree node
may see all of them); `tree_mask` is additive (0 = visible, the dtype's lowest finite value =
hidden) and only covers the T new tokens. The step never writes the cache: it returns the new
entries and the runtime commits the accepted ones. This is the exact signature the ONNX exporter
traces; only training passes the optional additive `past_mask` [T, S] (PPD prompt groups attached
after different positions of one cached sequence), the traced step leaves it None.

One step serves every supported family (export/families.py): the family record read from the
checkpoint's config says which biases, norms, activation, embedding scale, RoPE per layer type,
window and soft-capping the layers use; nothing here looks at `model_type`. A family with
sliding-window layers (Mistral, Gemma 3, Qwen with use_sliding_window, Phi-3 with sliding_window)
takes two more additive masks, used on its sliding layers: the tree mask and the committed entries
restricted to the window, built on the host by export/masks.py (a node at position p sees positions
> p - window). The graph takes the elementwise minimum of tree_mask and sliding_tree_mask (the latter
itself when built from the former), so tree_mask stays an input where every layer slides. The KV
cache keeps its full length for sliding layers too: every layer's cache is [S, Hkv, D] and the
window is only a mask, so one cache layout and one commit serve every family.

Token ids >= vocab_size are method slots, so every backend takes plain int64 ids; the LM head
keeps the vocabulary size. With an extra embedding table (PPD prompt tokens) they select its rows
(layer-0 inputs as they are: Gemma's embedding scale applies to vocabulary rows only); with HT
transfer maps (export/ht.py) id vocab_size + j is a pseudo slot whose row is replaced, right after
layer l, by map j applied to its source node's layer-l state (`HiddenTransfer`). The two are
mutually exclusive.

Why a compact forward instead of transformers' own model with a 4-D mask (measured on the 2-core
CPU, see README): the weights are stored pre-transposed ([in, out]) and q/k/v and gate/up fused
(phi3 checkpoints store them fused already), which makes MKL's small-M GEMMs of tree steps 1.5-2x
faster than nn.Linear's [out, in] layout; and attention over past and new keys is one softmax over
two score blocks, so the cache is never concatenated (no copy of the cache per layer per step). The
Llama graph is node for node the one exported before families existed (tests/export/
test_onnx_export.py pins it): features a family lacks add no node.

`shape_free=True` (GPU exports) writes the softmax out over the two score blocks, one max and one sum,
so the traced graph never reads S and has no shape arithmetic at all: every node runs on a GPU execution
provider, which onnxruntime's CUDA graphs require.

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

from dataclasses import dataclass

import torch
from torch import nn

from export.attention import apply_rope, attention, rms_norm, row_exact_attention, row_exact_mask, softcap
from export.families import SLIDING, FamilyRecord, RopeSpec, family_record
from export.ht import HiddenTransfer, TransferMaps
from export.masks import lowest_mask_value, sliding_window_masks

__all__ = ["DecoderLayer", "HiddenTransfer", "LayerInputs", "StepInputs", "StepModel", "lowest_mask_value"]


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().contiguous(), requires_grad=False)


def _norm_weight(weight: torch.Tensor, family: FamilyRecord) -> nn.Parameter:
    """An RMSNorm's scale as the step multiplies it: Llama's w in the model dtype, Gemma's 1 + w in fp32
    (exactly what Gemma3RMSNorm computes every call, so the same bits)."""
    if family.norm_scale_fp32:
        return _frozen(family.norm_offset + weight.float())
    return _frozen(weight + family.norm_offset if family.norm_offset else weight)


def _bias(*linears: nn.Module) -> nn.Parameter:
    return _frozen(torch.cat([linear.bias for linear in linears]))


class DecoderLayer(nn.Module):
    """One decoder block with fused, pre-transposed projection weights, and the family's biases and norms
    (None where the family has none). `kind` is its attention: full or sliding window."""

    def __init__(self, hf_layer: nn.Module, family: FamilyRecord, kind: str) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.kind = kind
        norm = lambda module: _norm_weight(module.weight, family)  # noqa: E731
        self.input_norm = norm(hf_layer.input_layernorm)
        # post_norm is the norm before the MLP (its HF name differs: Gemma's post_attention_layernorm
        # normalises the attention output, its pre_feedforward_layernorm is the MLP's input norm).
        self.attn_out_norm = self.mlp_out_norm = None
        if family.sandwich_norms:
            self.attn_out_norm = norm(hf_layer.post_attention_layernorm)
            self.post_norm = norm(hf_layer.pre_feedforward_layernorm)
            self.mlp_out_norm = norm(hf_layer.post_feedforward_layernorm)
        else:
            self.post_norm = norm(hf_layer.post_attention_layernorm)
        if family.fused_weights:   # phi3: already q | k | v and gate | up
            qkv, gate_up = (attn.qkv_proj,), (mlp.gate_up_proj,)
        else:
            qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
        # [H, (Hq + 2 Hkv) D]: columns are q | k | v
        self.qkv_t = _frozen(torch.cat([linear.weight for linear in qkv]).t())
        self.o_t = _frozen(attn.o_proj.weight.t())                                   # [Hq D, H]
        self.gate_up_t = _frozen(torch.cat([linear.weight for linear in gate_up]).t())  # [H, 2I]
        self.down_t = _frozen(mlp.down_proj.weight.t())                             # [I, H]
        self.intermediate = int(mlp.down_proj.weight.shape[1])   # I, a Python int: constant slices when traced
        self.qkv_bias = _bias(*qkv) if family.qkv_bias else None                    # [(Hq + 2 Hkv) D]
        self.o_bias = _bias(attn.o_proj) if family.o_bias else None                 # [H]
        self.gate_up_bias = _bias(*gate_up) if family.mlp_bias else None            # [2I]
        self.down_bias = _bias(mlp.down_proj) if family.mlp_bias else None          # [H]
        self.qk_norm = None
        if family.qk_norm:   # [Hq + Hkv, D]: q's norm on each query head, k's on each kv head (one norm of qk)
            hq, hkv = family.num_heads, family.num_kv_heads
            q_norm, k_norm = attn.q_norm.weight.expand(hq, -1), attn.k_norm.weight.expand(hkv, -1)
            self.qk_norm = _norm_weight(torch.cat([q_norm, k_norm]), family)


@dataclass
class LayerInputs:
    """What every layer of one attention kind takes in a step, built once per step (not per layer)."""

    cos: torch.Tensor                  # [T, 1, rotary_dim] in the model dtype
    sin: torch.Tensor
    rotary_dim: int
    tree_mask: torch.Tensor            # [T, T] additive; row_exact: the [G T, S + T] mask with the past folded in
    past_mask: torch.Tensor | None     # [T, S] additive, or None: every committed entry visible


@dataclass
class StepInputs:
    """What a step's layers take besides their cache, built once per step by StepModel.step_inputs."""

    tree_mask: torch.Tensor            # [T, T] additive in the model dtype (HT finds pseudo rows' sources with it)
    layers: dict[str, LayerInputs]     # per attention kind the model has (full, sliding)


class StepModel(nn.Module):
    def __init__(self, hf_model: nn.Module, extra_embeddings: torch.Tensor | None = None,
                 transfer_maps: TransferMaps | None = None, row_exact: bool = False, shape_free: bool = False) -> None:
        """`hf_model`: a transformers causal LM of a supported family (export/families.py), e.g. from
        export.checkpoint.load_checkpoint; its weights are copied into the step's layout. `row_exact` and
        `shape_free` pick the attention's formulation (export/attention.py): one of them at most."""
        super().__init__()
        if row_exact and shape_free:
            raise ValueError("row_exact and shape_free attention are two formulations: pick one")
        self.row_exact, self.shape_free = row_exact, shape_free
        if extra_embeddings is not None and transfer_maps is not None:
            raise ValueError("a step model takes PPD prompt-token rows or HT transfer maps, not both: "
                             "build it for one method")
        family = family_record(hf_model.config)
        self.family = family
        self.vocab_size = family.vocab_size
        self.hidden_size = family.hidden_size
        self.num_layers = family.num_layers
        self.num_heads = family.num_heads
        self.num_kv_heads = family.num_kv_heads
        self.head_dim = family.head_dim
        self.eps = family.rms_norm_eps
        self.layers = nn.ModuleList(DecoderLayer(layer, family, kind)
                                    for layer, kind in zip(hf_model.model.layers, family.layer_types))
        self.final_norm = _norm_weight(hf_model.model.norm.weight, family)
        self.lm_head_t = _frozen(hf_model.lm_head.weight.t())                   # [H, V]
        # Tied checkpoints look embeddings up in the head's columns: no second [V, H] copy.
        self.tied = family.tied_head
        self.embed_weight = None if self.tied else _frozen(hf_model.model.embed_tokens.weight)
        # Gemma: sqrt(H) as an fp32 scalar, cast to the model dtype where it is applied (as transformers does).
        self.register_buffer("embed_scale", None if family.embed_scale is None else torch.tensor(family.embed_scale),
                             persistent=False)
        # One inv_freq buffer per distinct RoPE (Gemma: one for global, one for sliding layers); the first
        # is `inv_freq`, the name a one-RoPE graph has always had.
        self.ropes: dict[str, int] = {}        # layer kind -> index of its RoPE in rope_specs
        self.rope_specs: list[RopeSpec] = []
        for kind, spec in family.rope:
            if spec not in self.rope_specs:
                name = "inv_freq" if not self.rope_specs else f"inv_freq_{len(self.rope_specs)}"
                self.register_buffer(name, torch.tensor(spec.inv_freq, dtype=torch.float32), persistent=False)
                self.rope_specs.append(spec)
            self.ropes[kind] = self.rope_specs.index(spec)
        # [E, H] rows for ids vocab_size .. vocab_size + E - 1 (PPD prompt tokens), or None.
        self.extra_embeddings = None if extra_embeddings is None else _frozen(extra_embeddings)
        self.transfer = None
        if transfer_maps is not None:
            if transfer_maps.hidden_size != family.hidden_size:
                raise ValueError(f"transfer maps of hidden size {transfer_maps.hidden_size} do not fit a model of "
                                 f"hidden size {family.hidden_size}: use maps trained for this model")
            if transfer_maps.layer >= self.num_layers:
                raise ValueError(f"transfer maps read layer {transfer_maps.layer}, but the model has layers "
                                 f"0..{self.num_layers - 1}: use maps trained for this model")
            self.transfer = HiddenTransfer(transfer_maps, self.vocab_size, shape_free)

    @property
    def num_extra_tokens(self) -> int:
        if self.transfer is not None:
            return self.transfer.num_maps
        return 0 if self.extra_embeddings is None else int(self.extra_embeddings.shape[0])

    def embed_vocab(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] in 0..V-1 -> [T, H], the input of layer 0 (Gemma: scaled by sqrt(H))
        rows = self.lm_head_t.t()[input_ids] if self.tied else self.embed_weight[input_ids]
        return rows if self.embed_scale is None else rows * self.embed_scale.to(rows.dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] ids -> [T, H] layer-0 inputs; PPD rows (ids >= vocab_size) are layer-0 inputs as they are."""
        if self.transfer is not None:  # pseudo slots: any harmless row (token 0); replaced after layer l
            return self.embed_vocab(torch.where(input_ids < self.vocab_size, input_ids, 0))
        if self.extra_embeddings is None:
            return self.embed_vocab(input_ids)
        is_extra = (input_ids >= self.vocab_size).unsqueeze(-1)
        vocab = self.embed_vocab(input_ids.clamp(max=self.vocab_size - 1))
        extra = self.extra_embeddings[(input_ids - self.vocab_size).clamp(min=0, max=self.num_extra_tokens - 1)]
        return torch.where(is_extra, extra.to(vocab.dtype), vocab)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [T] -> cos, sin: [T, 1, rotary_dim] (broadcast over heads), of RoPE `index`
        spec = self.rope_specs[index]
        inv_freq = getattr(self, "inv_freq" if index == 0 else f"inv_freq_{index}")
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * spec.attention_scaling).to(dtype).unsqueeze(1)
        sin = (emb.sin() * spec.attention_scaling).to(dtype).unsqueeze(1)
        return cos, sin

    def sliding_masks(self, tree_mask: torch.Tensor, position_ids: torch.Tensor, past_positions: torch.Tensor | int,
                      past_mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(sliding_tree_mask [T, T], sliding_past_mask [T, S]) for a step of this model (export/masks.py),
        or (None, None) when no layer slides, so callers pass `*model.sliding_masks(...)` for any family.
        `past_positions` [S], or S for committed entries at positions 0..S-1."""
        if not self.family.has_sliding_layers:
            return None, None
        if isinstance(past_positions, int):
            past_positions = torch.arange(past_positions, device=tree_mask.device)
        return sliding_window_masks(tree_mask, position_ids, past_positions, self.family.sliding_window, past_mask)

    def step_inputs(self, position_ids: torch.Tensor, dtype: torch.dtype, tree_mask: torch.Tensor,
                    past_key: torch.Tensor, past_mask: torch.Tensor | None = None,
                    sliding_tree_mask: torch.Tensor | None = None, sliding_past_mask: torch.Tensor | None = None
                    ) -> StepInputs:
        """RoPE and masks of each attention kind the model has, once per step. Sliding layers take the
        sliding masks (required when the model has them: StepModel.sliding_masks builds them). `past_key`
        is any layer's cache [S, Hkv, D]: row_exact's masks read S from it."""
        ropes = [self.rope(position_ids, dtype, i) for i in range(len(self.rope_specs))]
        tree_mask = tree_mask.to(dtype)     # each mask cast once (a traced .to is a Cast node even when a no-op)
        past_mask = None if past_mask is None else past_mask.to(dtype)
        layers = {}
        for kind in dict.fromkeys(self.family.layer_types):
            tree, past = tree_mask, past_mask
            if kind == SLIDING:
                if sliding_tree_mask is None or sliding_past_mask is None:
                    raise ValueError("this model has sliding-window layers: pass sliding_tree_mask and "
                                     "sliding_past_mask (StepModel.sliding_masks or export.masks.sliding_window_masks)")
                # The minimum of two additive masks hides what either hides: sliding_tree_mask itself when it
                # was built from this tree mask (export/masks.py). It also keeps tree_mask an input of a graph
                # whose every layer slides (Mistral, Phi-3), so every graph takes the same inputs.
                tree, sliding_past = torch.minimum(tree, sliding_tree_mask.to(dtype)), sliding_past_mask.to(dtype)
                # Likewise the past: sliding_past_mask already hides what past_mask hides (export/masks.py).
                past = sliding_past if past is None else torch.minimum(past, sliding_past)
            if self.row_exact:   # S read here, after the casts: the order the Llama graph was always traced in
                tree, past = row_exact_mask(tree, past, past_key.shape[0], self.num_heads // self.num_kv_heads), None
            cos, sin = ropes[self.ropes[kind]]
            layers[kind] = LayerInputs(cos, sin, self.rope_specs[self.ropes[kind]].rotary_dim, tree, past)
        return StepInputs(tree_mask, layers)

    def attention(self, layer: DecoderLayer, x: torch.Tensor, inputs: LayerInputs, past_key: torch.Tensor,
                  past_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # T as traced: x.shape[0] keeps the CPU graph node for node the one its profiles were measured on
        t = -1 if self.shape_free else x.shape[0]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = x @ layer.qkv_t                                                   # [T, (Hq + 2 Hkv) D]
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        qk = qkv[:, : (hq + hkv) * d].view(-1, hq + hkv, d)          # -1, not t: no shape arithmetic traced
        if layer.qk_norm is not None:
            qk = rms_norm(qk, layer.qk_norm, self.eps, self.family.norm_scale_fp32)
        qk = apply_rope(qk, inputs.cos, inputs.sin, inputs.rotary_dim, d)      # RoPE on q and k at once
        q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, (hq + hkv) * d :].view(-1, hkv, d)
        scale, cap = self.family.attention_scale, self.family.attn_softcap
        if self.row_exact:   # inputs.tree_mask is the [G T, S + T] row_exact_mask, past_mask folded in
            out = row_exact_attention(q, k, v, inputs.tree_mask, past_key, past_value, (hq, hkv, d), scale, cap)
        else:
            out = attention(q, k, v, inputs.tree_mask, past_key, past_value, inputs.past_mask, t, (hq, hkv, d),
                            scale, cap, self.shape_free)
        out = out @ layer.o_t
        return (out if layer.o_bias is None else out + layer.o_bias), k, v

    def mlp(self, layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        gate_up = x @ layer.gate_up_t                                             # [T, 2I]
        if layer.gate_up_bias is not None:
            gate_up = gate_up + layer.gate_up_bias
        gate, up = gate_up[:, : layer.intermediate], gate_up[:, layer.intermediate :]
        if self.family.activation == "gelu_tanh":
            act = nn.functional.gelu(gate, approximate="tanh")
        else:
            act = nn.functional.silu(gate)
        out = (act * up) @ layer.down_t
        return out if layer.down_bias is None else out + layer.down_bias

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.eps, self.family.norm_scale_fp32)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor,
                      past_keys: list[torch.Tensor], past_values: list[torch.Tensor],
                      past_mask: torch.Tensor | None = None, sliding_tree_mask: torch.Tensor | None = None,
                      sliding_past_mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step without the LM head: final-normed hidden states [T, H] and the new KV.
        `past_mask` [T, S] (additive, optional) hides committed entries from some rows on global layers;
        the sliding masks (required when the model has sliding layers) replace tree_mask and past_mask
        on sliding layers."""
        h = self.embed(input_ids)
        inputs = self.step_inputs(position_ids, h.dtype, tree_mask, past_keys[0], past_mask,
                                  sliding_tree_mask, sliding_past_mask)
        split = self.num_layers if self.transfer is None else self.transfer.layer + 1
        h, keys, values = self.run_layers(h, inputs, past_keys, past_values, 0, split)
        if self.transfer is not None:
            h = self.transfer(h, input_ids, position_ids, inputs.tree_mask)
            h, upper_keys, upper_values = self.run_layers(h, inputs, past_keys, past_values, split, self.num_layers)
            keys, values = keys + upper_keys, values + upper_values
        return self.final_hidden(h), torch.stack(keys), torch.stack(values)

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h, self.final_norm)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] final hidden states -> [T, V] (Gemma 2-style final soft-capping where the family has it)."""
        return softcap(hidden @ self.lm_head_t, self.family.final_softcap)

    def run_layers(self, h: torch.Tensor, inputs: StepInputs, past_keys: list[torch.Tensor],
                   past_values: list[torch.Tensor], start: int, stop: int
                   ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Decoder layers start..stop-1 on the residual stream h [T, H] (past_* indexed by absolute
        layer, `inputs` from step_inputs); returns h after layer stop-1 and the new K/V of those layers."""
        new_keys, new_values = [], []
        for i in range(start, stop):
            layer = self.layers[i]
            a, k, v = self.attention(layer, self.norm(h, layer.input_norm), inputs.layers[layer.kind],
                                     past_keys[i], past_values[i])
            h = h + (a if layer.attn_out_norm is None else self.norm(a, layer.attn_out_norm))
            m = self.mlp(layer, self.norm(h, layer.post_norm))
            h = h + (m if layer.mlp_out_norm is None else self.norm(m, layer.mlp_out_norm))
            new_keys.append(k)
            new_values.append(v)
        return h, new_keys, new_values

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor,
                past_keys: list[torch.Tensor], past_values: list[torch.Tensor],
                past_mask: torch.Tensor | None = None, sliding_tree_mask: torch.Tensor | None = None,
                sliding_past_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, new_keys, new_values = self.hidden_states(input_ids, position_ids, tree_mask, past_keys, past_values,
                                                          past_mask, sliding_tree_mask, sliding_past_mask)
        return self.logits(hidden), new_keys, new_values
