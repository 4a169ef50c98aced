"""Weight-only quantized engine variants: the names every layer uses, and making them.

fp32 is the exported graph as is; int8 / int4 quantize the weights of the linear layers and the LM
head with onnxruntime's MatMulNBits (block-wise, weight only: a node's logits never depend on the
other nodes of its step: export/row_independence.py); int4's LM head gets 8 bits, as in llama.cpp's
q4_1 (QuantScheme.head_bits).

    quantize_export(fp32 manifest, out_dir, "int8")
        model.onnx (fp32) -> MatMulNBitsQuantizer (every MatMul with a constant [K, N] weight: q/k/v/o,
        gate/up/down, LM head) -> model.onnx + .data in a temp dir -> manifest (with `quantization`)
        -> renamed onto out_dir

What stays fp32: the embedding Gather (it reads the LM head's [H, V] columns, export/onnx_export.py
dedupe_tied_embedding; T columns per step, so quantizing it would shrink the file, not the step),
the norms, rotary and attention.

accuracy_level is 4 (int8 activations, quantized per row and block of 32: onnxruntime's fast int8
kernels), on a graph exported with row-exact attention (export/step_model.py `row_exact`). Measured on
x86 CPUs (onnxruntime 1.31 MLAS): MatMulNBits at level 4 is itself exactly row independent for steps of
two rows or more (4-bit on AVX2 computes one row with another kernel: QuantScheme.min_step_rows), but
it turns the ~1e-7 differences of the ordinary attention (whose sums depend on T) into 0.3-1.0 logit
differences over 30 layers, because a 1e-7 change can flip an int8 rounding. With row-exact attention
a node's logits in a tree step are bitwise those of its own path alone, so greedy tree verification
matches one-token decoding exactly. Level 1 (fp32 compute on dequantized blocks) needs no special
attention but runs a tree step as dequantize + SGEMM: T = 2 costs 2x T = 1 (int4) and int8 is ~10x
slower than fp32. Every build re-checks row independence (export/row_independence.py) and refuses a
graph that fails.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trees.devices import DEFAULT_VARIANT   # fp32: its home is with the file names it keeps unchanged

if TYPE_CHECKING:
    from export.manifest import Manifest

VARIANTS = (DEFAULT_VARIANT, "int8", "int4")
# llama.cpp's GGUF type at the same weight precision (the peer each variant is compared with).
LLAMACPP_PEER_TYPE = {"fp32": "f32", "int8": "q8_0", "int4": "q4_1"}

SCHEME = "MatMulNBits"
# The arithmetic of export/step_model.py row_exact_attention, recorded in the manifests (exporter and
# quantization): a changed formulation makes older variant dirs stale, so they are rebuilt on first use.
# (2026-12-01 "fp32-scores-fp64-sums" replaced True, the all-fp64 attention: same bits per row, ~25 % faster.)
ROW_EXACT_ATTENTION = "fp32-scores-fp64-sums"


@dataclass(frozen=True)
class QuantScheme:
    """How one variant quantizes (MatMulNBits attributes). Asymmetric (a zero point per block) is
    onnxruntime's default and the closer to llama.cpp's q4_1."""

    bits: int
    block_size: int = 32          # weights per scale along K (llama.cpp's q8_0 / q4_1 use 32 too)
    accuracy_level: int = 4       # 4 = int8 activations (per row and block); 1 = fp32 compute
    symmetric: bool = False
    row_exact: bool = True        # quantize a graph exported with row-exact attention (needed by level 4)
    # Fewest rows (tree nodes) a step runs with: onnxruntime 1.31's 4-bit MatMulNBits computes a one-row
    # product with its own kernel on AVX2 CPUs (no AVX-512), whose sums differ from the M >= 2 kernel's by
    # ~1e-6 (every accuracy level; M = 2..40 agree bitwise with each other, measured on an AMD EPYC with
    # AVX2 only, 2026-12-01). So an int4 step of one node (vanilla, a root-only tree, a 1-token prefill)
    # is padded to two rows (runtime/draft.py Layout.padded): a node's logits then never depend on its
    # step's size on any CPU. int8's one-row kernel agreed bitwise on both CPUs measured.
    min_step_rows: int = 1
    # Bits of the LM head (the MatMul that makes `logits`) when not `bits`. llama.cpp's q4_1 keeps a tied
    # embedding / LM head at q8_0 (its quantizer's rule for the output tensor when its rows are not a
    # multiple of 256, as the 135M model's 576 are: checked in the shipped Q4_1 GGUF): int4 does the
    # same, so that it is the same weight precision as its peer.
    head_bits: int | None = None

    def __post_init__(self) -> None:
        if self.min_step_rows < 1:
            raise ValueError(f"min_step_rows must be >= 1, got {self.min_step_rows}")
        if self.head_bits not in (None, 4, 8):
            raise ValueError(f"head_bits must be 4, 8 or None (= bits), got {self.head_bits}")
        if self.accuracy_level == 4 and not self.row_exact:
            raise ValueError("accuracy level 4 quantizes activations per row: its graph needs row-exact attention "
                             "(row_exact=True), or tree steps stop matching one-token decoding")

    @property
    def head_note(self) -> str:
        """', LM head 8-bit' where the head has other bits than the rest ('' otherwise): for messages."""
        return "" if self.head_bits in (None, self.bits) else f", LM head {self.head_bits}-bit"

    def record(self) -> dict:
        """The manifest fields that key an engine dir's staleness."""
        return {"scheme": SCHEME, "bits": self.bits, "block_size": self.block_size,
                "accuracy_level": self.accuracy_level, "symmetric": self.symmetric,
                "row_exact": ROW_EXACT_ATTENTION if self.row_exact else None, "min_step_rows": self.min_step_rows,
                "head_bits": self.head_bits}


SCHEMES: dict[str, QuantScheme] = {"int8": QuantScheme(8), "int4": QuantScheme(4, min_step_rows=2, head_bits=8)}
# The build's own row-independence check: a binary tree of this many nodes after this many prefix tokens.
CHECK_TREE, CHECK_PREFIX = 7, 16


class VariantError(ValueError):
    """A variant name this build does not know, or an engine dir of another variant than asked for."""


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise VariantError(f"unknown engine variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return variant


def engine_variant(manifest: "Manifest") -> str:
    """The variant an engine dir holds: its manifest's quantization record, fp32 when it has none."""
    record = manifest.quantization
    return DEFAULT_VARIANT if record is None else record["variant"]


def check_engine_variant(manifest: "Manifest", variant: str) -> None:
    """Refuse an engine dir whose graph is another variant than the one asked for (a runtime never
    mixes variants: its trees, profiles and figures are per variant)."""
    have = engine_variant(manifest)
    if have != check_variant(variant):
        quantize = "" if variant == DEFAULT_VARIANT else f" --quantize {variant}"
        raise VariantError(f"{manifest.dir} holds the {have} variant of its graph, not {variant}: load it with "
                           f"variant={have!r}, or build the {variant} engine (`python -m export engine --method "
                           f"{manifest.method.name}{quantize}`)")


def quantization_stale_reason(manifest: "Manifest", variant: str) -> str | None:
    """Why the quantization in `manifest` is not what `variant` asks for (None when it is)."""
    have = engine_variant(manifest)
    if have != variant:
        return f"variant is {have!r}, wanted {variant!r}"
    if variant == DEFAULT_VARIANT:
        return None
    recorded = {key: manifest.quantization.get(key) for key in SCHEMES[variant].record()}
    if recorded != SCHEMES[variant].record():
        return f"quantization is {recorded}, wanted {SCHEMES[variant].record()}"
    return None


# --- making a variant -----------------------------------------------------------------------------
def quantize_graph(source: Path, target: Path, scheme: QuantScheme) -> int:
    """Write `target` (+ `target.data`): the graph at `source` with every MatMul whose weight is a
    constant 2-D initializer replaced by MatMulNBits (the LM head with scheme.head_bits when set).
    Returns how many were replaced."""
    import onnx

    from export.onnx_files import save_with_external_data

    model = onnx.load(str(source))   # with its external data
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)   # it logs two INFO lines per node
    try:
        if scheme.head_bits in (None, scheme.bits):
            model = _quantize_matmuls(model, scheme, scheme.bits)
        else:
            head = lm_head_node(model)
            model = _quantize_matmuls(model, scheme, scheme.bits, exclude=(head,))
            model = _quantize_matmuls(model, scheme, scheme.head_bits)   # the head: the one MatMul by a constant left
    finally:
        logger.setLevel(level)
    replaced = sum(1 for n in model.graph.node if n.op_type == SCHEME)
    save_with_external_data(model, target)
    return replaced


def lm_head_node(model) -> str:
    """The name of the MatMul that makes the graph's `logits` output (export/onnx_export.py io_specs)."""
    producers = [n for n in model.graph.node if "logits" in n.output]
    if len(producers) != 1 or producers[0].op_type != "MatMul" or not producers[0].name:
        found = ", ".join(f"{n.op_type} {n.name!r}" for n in producers) or "no node"
        raise ValueError(f"a separate LM head precision needs one named MatMul making `logits`; the graph has {found}")
    return producers[0].name


def _quantize_matmuls(model, scheme: QuantScheme, bits: int, exclude: tuple[str, ...] = ()):
    """`model` with every MatMul by a constant 2-D weight, except the nodes named in `exclude`, as a
    `bits`-bit MatMulNBits of `scheme`'s block size, symmetry and accuracy level."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from tqdm import tqdm

    constant = {init.name for init in model.graph.initializer}
    targets = sum(1 for n in model.graph.node
                  if n.op_type == "MatMul" and n.input[1] in constant and n.name not in exclude)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=scheme.block_size, is_symmetric=scheme.symmetric,
                                     accuracy_level=scheme.accuracy_level, nodes_to_exclude=list(exclude),
                                     op_types_to_quantize=("MatMul",))
    node_quantize = quantizer.node_quantizer.quantize
    with tqdm(total=targets, desc=f"int{bits} MatMulNBits", unit="weight", leave=False) as progress:
        def quantize_node(node, graph_stack):
            progress.update(node.input[1] in constant)
            return node_quantize(node, graph_stack)

        quantizer.node_quantizer.quantize = quantize_node   # only to count progress
        quantizer.process()
    return quantizer.model.model


def quantize_export(source: "Manifest", out_dir: Path, variant: str, log: Callable[[str], None] = print) -> "Manifest":
    """The `variant` engine dir of the fp32 export `source`: its graph quantized, the tokenizer files
    copied, the manifest extended with the quantization record. Written into a temp dir beside
    `out_dir` and renamed onto it, so a reader never sees a half-written dir."""
    import onnxruntime as ort

    from export.manifest import ONNX_NAME, Manifest, ManifestError, sha256_file
    from export.onnx_files import DATA_SUFFIX, check_replaceable, file_record, swap_in

    scheme = SCHEMES.get(check_variant(variant))
    if scheme is None:
        raise VariantError(f"{variant} is the exported graph itself; quantize to one of {', '.join(SCHEMES)}")
    if engine_variant(source) != DEFAULT_VARIANT or source.dtype != "float32":
        raise ManifestError(f"{source.dir} is a {engine_variant(source)} {source.dtype} graph; quantize the fp32 "
                            f"export (`python -m export engine --method {source.method.name}`)")
    attention = source.exporter.get("row_exact_attention")
    if scheme.row_exact and attention != ROW_EXACT_ATTENTION:
        have = "the ordinary one" if not attention else f"the older {attention!r}"
        raise ManifestError(f"the {variant} scheme (accuracy level {scheme.accuracy_level}) needs an fp32 graph "
                            f"exported with row-exact attention {ROW_EXACT_ATTENTION!r}, and {source.dir} has {have}; "
                            f"make the variant with export.engine.export_variant (`python -m export engine "
                            f"--quantize {variant}`)")
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    work.chmod(0o755)
    try:
        log(f"quantizing {source.onnx_path} -> {out_dir} ({variant}: {SCHEME} {scheme.bits}-bit{scheme.head_note}, "
            f"block {scheme.block_size}, accuracy level {scheme.accuracy_level})")
        replaced = quantize_graph(source.onnx_path, work / ONNX_NAME, scheme)
        skip = {source.onnx.file, *(r.file for r in source.external_data), "manifest.json"}
        for path in source.dir.iterdir():   # tokenizer files (trees and optimised graphs are per variant)
            if path.is_file() and path.name not in skip and not path.name.startswith("model.") \
                    and not path.name.endswith("-tree.json"):
                shutil.copy(path, work / path.name)
        record = {"variant": variant, **scheme.record(), "quantized_matmuls": replaced,
                  "quantized_sha256": sha256_file(work / ONNX_NAME), "source_sha256": source.onnx.sha256,
                  "onnxruntime": ort.__version__, "embedding": "float32"}
        manifest = dataclasses.replace(
            source, dir=work, onnx=file_record(work, ONNX_NAME),
            external_data=(file_record(work, ONNX_NAME + DATA_SUFFIX),), ir_version=_ir_version(work / ONNX_NAME),
            validation=(), ort_optimized=None, quantization=record)
        reports = build_row_checks(manifest, variant)
        for what, report in reports.items():
            log(f"{what}: {report.summary()}")
            if not report.ok:
                raise ManifestError(f"the {variant} graph of {source.dir} is not row independent ({what}, "
                                    "export/row_independence.py): " + "; ".join(report.failures()[:3])
                                    + f"; keep accuracy_level {scheme.accuracy_level} or pick another scheme (or a "
                                    "larger min_step_rows) in export/quantize.py SCHEMES")
        manifest = dataclasses.replace(manifest, quantization={**record, **{
            key: {k: v for k, v in report.to_json().items() if k != "rows"} for key, report in reports.items()}})
        manifest.write()
        for path in work.iterdir():
            path.chmod(0o644)
        swap_in(work, out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work)
    log(f"{variant}: {replaced} MatMul weights quantized, "
        f"{sum(r.size for r in manifest.external_data) / 1e6:.0f} MB of weights")
    return Manifest.load(out_dir)


def build_row_checks(manifest: "Manifest", variant: str) -> dict:
    """{"row_independence": across a tree's nodes, "batch_independence": across sequences packed in one
    step} of the graph in `manifest` (fixed pseudo-random prefixes and binary trees)."""
    import numpy as np
    import onnxruntime as ort

    from export.row_independence import (ROW_TOLERANCES, binary_tree_parents, check_batch_independence,
                                         check_row_independence)

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(manifest.onnx_path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    vocab = manifest.model.vocab_size
    tolerance = ROW_TOLERANCES[variant]
    prefix, tree = rng.integers(0, vocab, CHECK_PREFIX).tolist(), rng.integers(0, vocab, CHECK_TREE).tolist()
    other_prefix, other_tree = rng.integers(0, vocab, CHECK_PREFIX // 2).tolist(), rng.integers(0, vocab, 3).tolist()
    return {"row_independence": check_row_independence(session, manifest, prefix, tree,
                                                       binary_tree_parents(CHECK_TREE), tolerance),
            "batch_independence": check_batch_independence(session, manifest, [prefix, other_prefix],
                                                           [(tree, binary_tree_parents(CHECK_TREE)),
                                                            (other_tree, binary_tree_parents(3))], tolerance)}


def _ir_version(path: Path) -> int:
    import onnx

    return int(onnx.load(str(path), load_external_data=False).ir_version)
