"""The one record of each supported model family, and what a checkpoint's config says through it.

transformers keeps each family's facts in its config class and modeling file; what a tree step needs of
them is small. `FamilySpec` says, per family, where those facts live (a config attribute, or a constant
of the family's modeling file); `family_record(config)` reads one checkpoint's config through its
family's spec into a `FamilyRecord`, the frozen record the step (export/step_model.py), the exporter,
the validator, the manifest and the trainers take. Nothing else looks at `model_type`.

Read from transformers 5.23's modeling files:

    llama    q/k/v/o biases and MLP biases when config.attention_bias / mlp_bias
    qwen2    q/k/v biases always, o_proj without; sliding layers from config.layer_types
    qwen3    RMSNorm on each head of q and k (before RoPE); sliding layers from config.layer_types
    mistral  every layer sliding when config.sliding_window is set
    gemma3   (Gemma3ForCausalLM, model_type gemma3_text) q/k norms; four norms per layer (after attention
             and after the MLP too); RMSNorm scales by (1 + w) in fp32 before the cast back; GeGLU with
             tanh GELU; embeddings x sqrt(hidden) in the model dtype; scores scaled by
             query_pre_attn_scalar**-0.5; sliding layers from config.layer_types with their own RoPE
             (rope_parameters keyed by layer type); tanh soft-capping of the logits when
             config.final_logit_softcapping is set (Gemma3Attention never passes
             attn_logit_softcapping to its attention, so neither does the record: the field is Gemma 2's)
    phi3     q/k/v stored as one qkv_proj and gate/up as one gate_up_proj; partial rotary
             (rope_parameters.partial_rotary_factor); every layer sliding when config.sliding_window is set

RoPE whose frequencies change with the sequence length ("dynamic", "longrope") is refused: a step
computes every position with one set of frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL, SLIDING = "full_attention", "sliding_attention"
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


class FamilyError(ValueError):
    """A checkpoint whose family, or a feature of it, the step does not implement; names the fix."""


@dataclass(frozen=True)
class FamilySpec:
    """Where one family keeps each fact: a config attribute name (str) or the family's constant."""

    name: str
    model_types: tuple[str, ...]         # config.model_type values it covers
    causal_lm: str                       # the transformers class AutoModelForCausalLM loads it with
    qkv_bias: bool | str = False
    o_bias: bool | str = False
    mlp_bias: bool | str = False
    qk_norm: bool = False                # RMSNorm over each head of q and k, before RoPE
    sandwich_norms: bool = False         # norms on the attention and MLP outputs too (Gemma's four)
    norm_offset: float = 0.0             # RMSNorm scales by offset + w (Gemma: 1 + w) ...
    norm_scale_fp32: bool = False        # ... in fp32, then casts (Gemma); else casts, then scales (Llama)
    scaled_embedding: bool = False       # embeddings x sqrt(hidden), the factor in the model dtype (Gemma)
    query_scalar: str | None = None      # config attribute q is scaled by **-0.5 (default: head_dim)
    activation: str = "hidden_act"       # config attribute naming the MLP activation
    sliding: str = "none"                # "none", "layer_types" (from config.layer_types) or "all" (every
                                         # layer, when config.sliding_window is set)
    rope_per_layer_type: bool = False    # rope_parameters keyed by layer type (Gemma: local base on sliding layers)
    attn_softcap: str | None = None      # config attribute of the score soft-cap (none of today's families uses one)
    final_softcap: str | None = None     # config attribute of the logit soft-cap (Gemma)
    fused_weights: bool = False          # checkpoint stores qkv_proj [(Hq + 2 Hkv) D, H] and gate_up_proj [2I, H]
    gguf_architecture: str | None = None  # its GGUF `general.architecture` (default: the family name)

    @property
    def gguf_name(self) -> str:
        return self.gguf_architecture or self.name


FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (
    FamilySpec("llama", ("llama",), "LlamaForCausalLM", qkv_bias="attention_bias", o_bias="attention_bias",
               mlp_bias="mlp_bias"),
    FamilySpec("qwen2", ("qwen2",), "Qwen2ForCausalLM", qkv_bias=True, sliding="layer_types"),
    FamilySpec("qwen3", ("qwen3",), "Qwen3ForCausalLM", qkv_bias="attention_bias", o_bias="attention_bias",
               qk_norm=True, sliding="layer_types"),
    FamilySpec("mistral", ("mistral",), "MistralForCausalLM", sliding="all"),
    FamilySpec("gemma3", ("gemma3_text",), "Gemma3ForCausalLM", qkv_bias="attention_bias", o_bias="attention_bias",
               qk_norm=True, sandwich_norms=True, norm_offset=1.0, norm_scale_fp32=True, scaled_embedding=True,
               query_scalar="query_pre_attn_scalar", activation="hidden_activation", sliding="layer_types",
               rope_per_layer_type=True, final_softcap="final_logit_softcapping"),
    FamilySpec("phi3", ("phi3",), "Phi3ForCausalLM", sliding="all", fused_weights=True),
)}
SUPPORTED_MODEL_TYPES = tuple(t for spec in FAMILIES.values() for t in spec.model_types)


@dataclass(frozen=True)
class RopeSpec:
    """RoPE of one layer type: cos/sin = (position x inv_freq, duplicated) cos/sin x attention_scaling,
    on the first `rotary_dim` dims of each head (the rest pass through)."""

    rope_type: str
    theta: float
    rotary_dim: int
    inv_freq: tuple[float, ...]          # [rotary_dim / 2] fp32 values, exactly transformers' (Python floats hold them)
    attention_scaling: float


@dataclass(frozen=True)
class FamilyRecord:
    """What the step needs of one checkpoint, read from its transformers config by `family_record`."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sandwich_norms: bool
    norm_offset: float
    norm_scale_fp32: bool
    embed_scale: float | None            # Gemma: hidden_size**0.5, applied in the model dtype; else None
    tied_head: bool
    attention_scale: float               # multiplies q (= scores): head_dim**-0.5, Gemma query_pre_attn_scalar**-0.5
    activation: str                      # "silu" or "gelu_tanh"
    fused_weights: bool
    layer_types: tuple[str, ...]         # per layer: FULL or SLIDING
    sliding_window: int | None           # set iff some layer is SLIDING
    rope: tuple[tuple[str, RopeSpec], ...]   # (layer type, its RoPE) for each type present
    attn_softcap: float | None = None    # scores -> cap * tanh(scores / cap), before the mask
    final_softcap: float | None = None   # logits -> cap * tanh(logits / cap)

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i, kind in enumerate(self.layer_types) if kind == SLIDING)

    @property
    def has_sliding_layers(self) -> bool:
        return bool(self.sliding_layers)

    def rope_of(self, layer_type: str) -> RopeSpec:
        return dict(self.rope)[layer_type]


def gguf_family(architecture: str) -> FamilySpec | None:
    """The family whose GGUFs declare `architecture` (llama.cpp's name), or None."""
    return next((spec for spec in FAMILIES.values() if spec.gguf_name == architecture), None)


def family_spec(model_type: str | None) -> FamilySpec:
    """The spec covering `model_type`, refusing any other with the supported families."""
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    raise FamilyError(f"model_type {model_type!r} is not a supported family; ppdeploy supports "
                      + ", ".join(f"{s.name} ({'/'.join(s.model_types)})" for s in FAMILIES.values())
                      + ": pass a checkpoint of one of them")


def _flag(config, where: bool | str) -> bool:
    return bool(getattr(config, where, False)) if isinstance(where, str) else where


def rope_spec(config, layer_type: str | None, head_dim: int) -> RopeSpec:
    """One layer type's RoPE (layer_type None: the config's single rope_parameters), with transformers'
    own frequency functions (ROPE_INIT_FUNCTIONS; its default formula otherwise)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise FamilyError(f"rope type {rope_type!r} changes its frequencies with the sequence length, which one "
                          f"step graph cannot follow; supported: {', '.join(STATIC_ROPE_TYPES)}")
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    if rope_type == "default":   # the families' compute_default_rope_parameters, exactly
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, layer_type=layer_type)
    if inv_freq.shape != (rotary_dim // 2,):
        raise FamilyError(f"rope of {layer_type or 'the model'} has {inv_freq.shape[0]} frequencies for a rotary dim "
                          f"of {rotary_dim}: this rope configuration is not supported")
    return RopeSpec(rope_type, float(params["rope_theta"]), rotary_dim,
                    tuple(float(f) for f in inv_freq.float()), float(scaling))


def layer_types(config, spec: FamilySpec) -> tuple[tuple[str, ...], int | None]:
    """Per-layer attention kind and the window (None when no layer slides)."""
    window = getattr(config, "sliding_window", None)
    n = config.num_hidden_layers
    if spec.sliding == "layer_types":
        kinds = tuple(config.layer_types or (FULL,) * n)
    elif spec.sliding == "all":
        kinds = (SLIDING if window is not None else FULL,) * n
    else:
        kinds = (FULL,) * n
    if window is None:   # e.g. qwen2's layer_types name sliding layers while use_sliding_window is off
        kinds = (FULL,) * n
    unknown = set(kinds) - {FULL, SLIDING}
    if unknown or len(kinds) != n:
        raise FamilyError(f"layer types {sorted(unknown) or kinds} are not supported (need {n} of {FULL}, {SLIDING})")
    return kinds, (int(window) if SLIDING in kinds else None)


def family_record(config) -> FamilyRecord:
    """Read a transformers causal-LM config through its family's spec; refuses what the step lacks."""
    spec = family_spec(getattr(config, "model_type", None))
    if getattr(config, "use_bidirectional_attention", False):
        raise FamilyError("bidirectional attention (use_bidirectional_attention=True) is not a causal LM: "
                          "export a causal checkpoint")
    act_name = getattr(config, spec.activation)
    if act_name not in ACTIVATIONS:
        raise FamilyError(f"MLP activation {act_name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kinds, window = layer_types(config, spec)
    rope = tuple((kind, rope_spec(config, kind if spec.rope_per_layer_type else None, head_dim))
                 for kind in dict.fromkeys(kinds))
    scalar = head_dim if spec.query_scalar is None else getattr(config, spec.query_scalar)
    softcap = lambda name: None if name is None else getattr(config, name, None)  # noqa: E731
    return FamilyRecord(
        family=spec.name, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim, rms_norm_eps=float(config.rms_norm_eps),
        qkv_bias=_flag(config, spec.qkv_bias), o_bias=_flag(config, spec.o_bias), mlp_bias=_flag(config, spec.mlp_bias),
        qk_norm=spec.qk_norm, sandwich_norms=spec.sandwich_norms, norm_offset=spec.norm_offset,
        norm_scale_fp32=spec.norm_scale_fp32,
        embed_scale=config.hidden_size ** 0.5 if spec.scaled_embedding else None,
        tied_head=bool(config.tie_word_embeddings), attention_scale=scalar ** -0.5,
        activation=ACTIVATIONS[act_name], fused_weights=spec.fused_weights, layer_types=kinds, sliding_window=window,
        rope=rope, attn_softcap=softcap(spec.attn_softcap), final_softcap=softcap(spec.final_softcap),
    )


def manifest_fields(record: FamilyRecord) -> dict:
    """What an engine's manifest records of the family (export/manifest.py ModelRecord): the family, which
    layers slide and the window a runtime builds the sliding masks with (export/masks.py)."""
    return {"family": record.family, "sliding_window": record.sliding_window,
            "sliding_layers": record.sliding_layers,
            "rope": {kind: {"rope_type": r.rope_type, "theta": r.theta, "rotary_dim": r.rotary_dim}
                     for kind, r in record.rope}}
