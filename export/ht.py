"""Hidden Transfer (HT, arXiv 2404.12022): transfer maps, their tree layout, and their checkpoint file.

At an intermediate layer l, k trained linear maps turn the layer-l hidden state of a real token at
position q into pseudo hidden states for positions q+1 .. q+k:

    pseudo_j = h_l(q) @ weight[j] + bias[j]        j in 0..k-1, weight [k, H, H] ([in, out]), bias [k, H]

From layer l+1 on, pseudo state j runs through the remaining layers at position q+1+j (attending to
the context and to pseudo states 0..j-1 of its own group), and the model's own final norm and LM
head decode from it the token at q+2+j (the real token at q already predicts q+1 itself).

That is PPD's prompt-token geometry with N = k and ensemble 1, so the layout is shared: a pseudo
slot is the id `vocab_size + j` attached after a node with `export.ppd.attach_prompt_tokens`
(config `layout_config(k)`), and StepModel replaces its row by the transfer of its source node right
after layer l (export/step_model.py). Training (train/ht.py) and inference (runtime/) both use it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.paths import REPO_ROOT
from export.ppd import MAX_PROMPT_TOKENS, PPDConfig
from export.trained_file import (TrainedFileFormat, check_hidden_size, header_ints, load_checked_tensors,
                                 read_checked_header, save_safetensors_atomic)

DEFAULT_NUM_MAPS = 3
MAX_MAPS = MAX_PROMPT_TOKENS
DEFAULT_HT_CHECKPOINT = REPO_ROOT / "checkpoints" / "smollm2-135m-instruct" / "ht-transfer-maps.safetensors"

CHECKPOINT_FORMAT = "ppdeploy-ht-transfer-maps"
CHECKPOINT_VERSION = "1"
WEIGHT_NAME = "weight"
BIAS_NAME = "bias"
TRAIN_COMMAND = "python -m train ht"


# Where the maps read by default, as a fraction of the depth: layer int(L * fraction), 0-based.
# Chosen by held-out accuracy on SmolLM2-135M (30 layers): l = 8 beat l = 15 and l = 22 at every
# offset in top-1 (checkpoints/smollm2-135m-instruct/README.md, HT layer table; `python -m train
# ht-layers`). For other models it is a starting point, not a measurement: compare layers there.
DEFAULT_LAYER_FRACTION = 0.27


def default_transfer_layer(num_layers: int) -> int:
    """The 0-based layer whose output the maps read when none is given (L = 30 -> 8)."""
    return min(num_layers - 1, int(num_layers * DEFAULT_LAYER_FRACTION))


class TransferMapError(ValueError):
    """An HT transfer-map checkpoint that cannot be used here, with the reason and the fix."""


FILE_FORMAT = TrainedFileFormat(what="HT transfer-map", contents="transfer maps", file_format=CHECKPOINT_FORMAT,
                                version=CHECKPOINT_VERSION, tensor_names=frozenset({WEIGHT_NAME, BIAS_NAME}),
                                train_command=TRAIN_COMMAND, error=TransferMapError)


@dataclass(frozen=True, eq=False)
class TransferMaps:
    """k linear maps from the layer-`layer` hidden state of position q to pseudo states for q+1..q+k.

    weight: [k, H, H] stored [in, out] (pseudo_j = h @ weight[j] + bias[j]); bias: [k, H].
    `layer` is 0-based: the maps read the output of decoder layer `layer`, and layers layer+1 ..
    L-1 run on the pseudo states.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    layer: int

    def __post_init__(self) -> None:
        w, b = self.weight, self.bias
        if w.dim() != 3 or w.shape[1] != w.shape[2]:
            raise ValueError(f"transfer weight must be [k, H, H], got {tuple(w.shape)}")
        if not 1 <= w.shape[0] <= MAX_MAPS:
            raise ValueError(f"number of transfer maps must be in 1..{MAX_MAPS}, got {w.shape[0]}")
        if tuple(b.shape) != (w.shape[0], w.shape[1]):
            raise ValueError(f"transfer bias must be [k, H] = [{w.shape[0]}, {w.shape[1]}], got {tuple(b.shape)}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"transfer layer must be a non-negative int, got {self.layer!r}")

    @property
    def num_maps(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def layout(self) -> PPDConfig:
        return layout_config(self.num_maps)

    @property
    def sha256(self) -> str:
        """Identity of the trained tensors: sha256 of weight then bias as contiguous float32 bytes
        (what engine manifests, searched trees and acceptance statistics record)."""
        digest = hashlib.sha256()
        for tensor in (self.weight, self.bias):
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def to(self, dtype: torch.dtype) -> "TransferMaps":
        """The same maps in `dtype` (an fp16 export bakes fp16 maps into the graph)."""
        return TransferMaps(self.weight.to(dtype), self.bias.to(dtype), self.layer)

    @classmethod
    def identity(cls, num_maps: int, hidden_size: int, layer: int) -> "TransferMaps":
        """W_j = I, b_j = 0: every pseudo state starts as its source's own state (train/ht.py says why)."""
        weight = torch.eye(hidden_size).expand(num_maps, hidden_size, hidden_size).clone()
        return cls(weight, torch.zeros(num_maps, hidden_size), layer)


def layout_config(num_maps: int) -> PPDConfig:
    """The PPD layout HT's pseudo slots use: N = k slots in one chain (ensemble 1), ids vocab + j."""
    return PPDConfig(num_prompt_tokens=num_maps, ensemble=1)


# --- checkpoint file ------------------------------------------------------------------------------

def save_transfer_maps(path: str | Path, maps: TransferMaps, fingerprint: str, metadata: dict | None = None,
                       dtype: torch.dtype = torch.float16) -> Path:
    """Write the maps as safetensors (fp16 or fp32), atomically. The header records k, the layer,
    the hidden size and the model fingerprint (so the file is refused for any other model);
    `metadata` (training command, seed, data size, accuracies...) is stored as JSON under "training"."""
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"transfer maps are saved as float16 or float32, not {dtype}")
    header = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "num_maps": str(maps.num_maps),
        "layer": str(maps.layer),
        "hidden_size": str(maps.hidden_size),
        "model_fingerprint": fingerprint,
        "training": json.dumps(metadata or {}, sort_keys=True),
    }
    tensors = {WEIGHT_NAME: maps.weight.detach().to("cpu", dtype).contiguous(),
               BIAS_NAME: maps.bias.detach().to("cpu", dtype).contiguous()}
    return save_safetensors_atomic(path, tensors, header)


def read_transfer_map_header(path: str | Path, expected_fingerprint: str | None = None) -> dict[str, str]:
    """The raw safetensors header of a transfer-map checkpoint (raises TransferMapError)."""
    return read_checked_header(path, FILE_FORMAT, expected_fingerprint)


def transfer_map_metadata(path: str | Path) -> dict:
    """The training metadata stored with a checkpoint (command, seed, data size, accuracies...)."""
    return json.loads(read_transfer_map_header(path).get("training", "{}"))


def load_transfer_maps(path: str | Path, expected_fingerprint: str, hidden_size: int,
                       num_maps: int | None = None, layer: int | None = None) -> TransferMaps:
    """Load fp32 transfer maps, refusing a checkpoint trained for another model (fingerprint),
    another hidden size, or a k / layer other than `num_maps` / `layer` (when given)."""
    path = Path(path)
    header = read_transfer_map_header(path, expected_fingerprint)
    saved_k, saved_layer, saved_hidden = header_ints(path, header, ("num_maps", "layer", "hidden_size"), FILE_FORMAT)
    check_hidden_size(path, saved_hidden, hidden_size, FILE_FORMAT)
    if (num_maps is not None and num_maps != saved_k) or (layer is not None and layer != saved_layer):
        raise TransferMapError(
            f"{path} has k={saved_k} maps at layer {saved_layer}, but k={num_maps if num_maps is not None else saved_k}"
            f" at layer {layer if layer is not None else saved_layer} was requested: drop the explicit k/layer to "
            f"use the checkpoint's, or retrain with `{TRAIN_COMMAND} --num-maps {num_maps or saved_k} --layer "
            f"{saved_layer if layer is None else layer}`")
    tensors = load_checked_tensors(path, {WEIGHT_NAME: (saved_k, saved_hidden, saved_hidden),
                                          BIAS_NAME: (saved_k, saved_hidden)}, FILE_FORMAT)
    return TransferMaps(tensors[WEIGHT_NAME], tensors[BIAS_NAME], saved_layer)


def _frozen_tensor(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().contiguous(), requires_grad=False)


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

    def __init__(self, maps: TransferMaps, vocab_size: int, shape_free: bool = False) -> None:
        """`shape_free`: pick each row's map without reading T (GPU graphs: export/attention.py)."""
        super().__init__()
        self.shape_free = shape_free
        self.layer = maps.layer
        self.vocab_size = vocab_size
        self.num_maps = maps.num_maps
        self.weight = _frozen_tensor(maps.weight)     # [k, H, H] ([in, out])
        self.bias = _frozen_tensor(maps.bias)         # [k, H]

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
        source = h.index_select(0, self.source_rows(input_ids, position_ids, tree_mask))      # [T, H]
        mapped = torch.matmul(source, self.weight.to(h.dtype)) + self.bias.to(h.dtype).unsqueeze(1)  # [k, T, H]
        slot = (input_ids - self.vocab_size).clamp(min=0, max=self.num_maps - 1)             # [T] map j
        if self.shape_free:   # a one-hot sum over the k maps: the row's map plus exact zeros, the same bits
            maps = torch.arange(self.num_maps, device=h.device).unsqueeze(1)               # [k, 1]
            pseudo = (mapped * (slot.unsqueeze(0) == maps).unsqueeze(-1).to(h.dtype)).sum(dim=0)   # [T, H]
        else:
            t = h.shape[0]
            pseudo = mapped.gather(0, slot.view(1, t, 1).expand(1, t, h.shape[1])).squeeze(0)   # [T, H]
        return torch.where((input_ids >= self.vocab_size).unsqueeze(-1), pseudo, h)

    def transfer(self, source: torch.Tensor) -> torch.Tensor:
        """[G, H] layer-l states of G source positions -> [G, k, H] pseudo states (training)."""
        return (torch.matmul(source, self.weight) + self.bias.unsqueeze(1)).transpose(0, 1)
