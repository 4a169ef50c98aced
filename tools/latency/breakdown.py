"""Where a CPU engine's step goes: the whole step against its weight products alone
(`python -m tools breakdown`).

The weight products (MatMulNBits, or MatMul / FusedMatMul / Gemm by a constant weight: qkv, o,
gate_up, down, the LM head) are the kernels onnxruntime owns; the rest of a step (attention over
the cache, norms, rotary, reshapes, ~1,200 dispatches of small ops) is the graph's. At the same rows:

    step      OrtBackend.step over a T-node chain at a cache of S committed tokens (an int4
              one-node step runs padded to the graph's minimum rows, as the runtime runs it)
    products  a graph holding only the engine's weight products, the same weights and kernels, fed
              random activations of the rows the step ran
    rest      step - products

onnxruntime's profiler cannot make this split: its per-node overhead inflates the small ops (on the
2-core CPU its per-op sums add up to about twice the step). The two are timed interleaved; the
medians of `repeats` runs each.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

WEIGHT_OPS = ("MatMulNBits", "MatMul", "FusedMatMul", "Gemm")


class Progress(Protocol):
    """A progress bar (tqdm): told each measured shape."""

    def update(self, n: int = 1) -> object: ...


@dataclass(frozen=True)
class BreakdownRow:
    variant: str
    nodes: int          # the draft's nodes (T)
    rows: int           # the rows the step ran (T, or the graph's minimum step rows)
    cache: int          # committed tokens (S)
    step_s: float
    products_s: float

    @property
    def rest_s(self) -> float:
        return self.step_s - self.products_s

    @property
    def products_share(self) -> float:
        return self.products_s / self.step_s

    def to_json(self) -> dict:
        return {"variant": self.variant, "nodes": self.nodes, "rows": self.rows, "cache": self.cache,
                "step_ms": round(1e3 * self.step_s, 3), "weight_products_ms": round(1e3 * self.products_s, 3),
                "rest_ms": round(1e3 * self.rest_s, 3), "weight_products_share": round(self.products_share, 4)}


def _weight_dim(node, initializers: dict) -> int | None:
    """K (the reduced dimension) of a product by a constant weight, else None."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "MatMulNBits":
        return attrs["K"].i
    if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in initializers:
        dims = initializers[node.input[1]].dims
        return dims[-1] if "transB" in attrs and attrs["transB"].i else dims[-2]
    return None


def weight_products_graph(onnx_path: str | Path):
    """(a model of only the graph's products by constant weights, {input name: K}). Each product keeps
    its node (op, attributes, weights, scales, zero points) with its activation input replaced by a
    graph input `rows_<K>` [R, K] shared by the products of the same K; every product is an output."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path))   # external data from beside the file
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes, inputs, used = [], {}, set()
    for node in graph.node:
        k = _weight_dim(node, initializers)
        if k is None:
            continue
        product = onnx.NodeProto()
        product.CopyFrom(node)
        inputs[f"rows_{k}"] = k
        product.input[0] = f"rows_{k}"
        used.update(name for name in product.input[1:] if name)
        nodes.append(product)
    if not nodes:
        raise ValueError(f"{onnx_path} has no products by a constant weight ({', '.join(WEIGHT_OPS)})")
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, None) for node in nodes for out in node.output[:1]]
    products = helper.make_graph(nodes, "weight_products",
                                 [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["R", k])
                                  for name, k in inputs.items()],
                                 outputs, [initializers[name] for name in sorted(used) if name in initializers])
    result = helper.make_model(products, opset_imports=model.opset_import)
    result.ir_version = model.ir_version
    return result, inputs


def _median_pair(first, second, repeats: int) -> tuple[float, float]:
    """Medians of `repeats` interleaved timings of two callables (after one warm-up run each)."""
    first(), second()
    a, b = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        first()
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        second()
        b.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def measure_breakdown(engine_dir: str | Path, variant: str, nodes: Sequence[int], caches: Sequence[int],
                      repeats: int = 40, seed: int = 0, progress: Progress | None = None) -> list[BreakdownRow]:
    """A BreakdownRow per (cache, nodes) of the engine in `engine_dir`; the cache is random tokens
    prefilled once per size (the step's cost depends on S and T, not on which tokens)."""
    import onnxruntime as ort

    from runtime.backends.ort_backend import OrtOptions, ort_session_options
    from runtime.draft import Draft
    from runtime.loading import open_engine

    if repeats < 1 or not nodes or not caches or min(nodes) < 1 or min(caches) < 0:
        raise ValueError(f"the breakdown needs repeats >= 1, node counts >= 1 and caches >= 0; got repeats={repeats}, "
                         f"nodes={list(nodes)}, caches={list(caches)}")
    backend = open_engine(engine_dir)
    longest = max(caches) + max(max(nodes), backend.manifest.min_step_rows)
    if longest > backend.info.max_context or max(nodes) > backend.manifest.max_tree:
        raise ValueError(f"cache {max(caches)} + {max(nodes)} nodes do not fit the engine ({backend.info.max_context} "
                         f"context, {backend.manifest.max_tree} tree nodes): ask for fewer")
    model, inputs = weight_products_graph(backend.graph_path)
    products = ort.InferenceSession(model.SerializeToString(), ort_session_options(OrtOptions(), "disable"),
                                    providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    vocab = backend.info.vocab_size
    rows = []
    for cache in caches:
        backend.reset()
        if cache:
            backend.step(Draft.prefill(rng.integers(0, vocab, cache)))
            backend.commit(range(cache))
        for count in nodes:
            draft = Draft.chain(rng.integers(0, vocab, count))
            ran = max(count, backend.manifest.min_step_rows)
            feed = {name: rng.standard_normal((ran, k)).astype(np.float32) for name, k in inputs.items()}
            step_s, products_s = _median_pair(lambda: backend.step(draft), lambda: products.run(None, feed), repeats)
            rows.append(BreakdownRow(variant, count, ran, cache, step_s, products_s))
            if progress is not None:
                progress.update(1)
    return rows


def format_breakdown(rows: Sequence[BreakdownRow]) -> str:
    lines = ["| variant | T (rows run) | cache | step | weight products alone | the rest | products' share |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.variant} | {r.nodes}" + (f" ({r.rows})" if r.rows != r.nodes else "") +
              f" | {r.cache} | {1e3 * r.step_s:.2f} ms | {1e3 * r.products_s:.2f} ms | {1e3 * r.rest_s:.2f} ms | "
              f"{r.products_share:.0%} |" for r in rows]
    return "\n".join(lines)
