"""The llamacpp bench peer: same thread count as our onnxruntime sessions, its tokenizer checked against
ours, and (when `make peers` built llama-cpp-python) real greedy runs on the SmolLM2 GGUFs."""

from __future__ import annotations

import os

import pytest

from tools.peers.llamacpp import TokenizationMismatch, available, check_tokenization, onnxruntime_threads

SMOKE_NEW_TOKENS = 16
# One llama.cpp thread in the real runs: the tokens do not depend on it, and spinning OpenMP threads
# next to other busy processes take minutes instead of a second (tools/peers/llamacpp.py wait_policy).
TEST_THREADS = 1


def _tiny_onnx_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "add",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_peer_threads_equal_the_intra_op_pool_of_our_onnxruntime_sessions():
    """OrtBackend leaves intra_op_num_threads unset; the pool onnxruntime then starts has
    onnxruntime_threads() threads: the caller plus that many minus one workers."""
    import onnxruntime as ort

    options = ort.SessionOptions()   # as OrtBackend builds them: default threads, no spinning
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    before = len(os.listdir("/proc/self/task"))
    session = ort.InferenceSession(_tiny_onnx_model(), options, providers=["CPUExecutionProvider"])
    workers = len(os.listdir("/proc/self/task")) - before
    del session
    assert onnxruntime_threads() == workers + 1


def test_tokenization_mismatches_are_all_reported_with_their_position():
    ours = {"same": [1, 2, 3], "split": [4, 5, 6], "short": [7, 8]}
    theirs = {"same": [1, 2, 3], "split": [4, 56], "short": [7, 8, 9]}
    check_tokenization(lambda text: theirs["same"], ["same"], [ours["same"]], ["same"])  # equal: no error
    with pytest.raises(TokenizationMismatch) as info:
        check_tokenization(lambda text: theirs[text], list(ours), list(ours.values()), list(ours))
    message = str(info.value)
    assert "prompt same" not in message
    assert "prompt split: first difference at position 1: llama.cpp [56] vs ours [5, 6] (2 vs 3 ids)" in message
    assert "prompt short: first difference at position 2: llama.cpp [9] vs ours [] (3 vs 2 ids)" in message


def test_a_late_whitespace_merge_is_reported_not_refused():
    ours = {name: list(range(100)) for name in "abcde"}
    theirs = {**ours, "c": list(range(79)) + [500] + list(range(81, 100))}    # one prompt, deep inside
    late = check_tokenization(lambda text: theirs[text], list(ours), list(ours.values()), list(ours))
    assert late == ["prompt c: first difference at position 79: llama.cpp [500, 81, 82, 83, 84] vs ours "
                    "[79, 80, 81, 82, 83] (99 vs 100 ids)"]
    theirs.update(a=theirs["c"], b=theirs["c"])                                # three of five: refused
    with pytest.raises(TokenizationMismatch, match="prompt b"):
        check_tokenization(lambda text: theirs[text], list(ours), list(ours.values()), list(ours))


# --- real llama.cpp (after `make peers`) ----------------------------------------------------------------

needs_llama_cpp = pytest.mark.skipif(not available(), reason="llama-cpp-python is not installed: run `make peers` "
                                                             "(builds it from source once; CI does not)")


@pytest.fixture(scope="module")
def smoke_prompts(real_model_dir):
    """Two MT-Bench prompts: their chat texts and our ids (Generator.encode's)."""
    from transformers import AutoTokenizer

    from runtime.prompting import prompt_text
    from tools.bench.prompts import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    texts = [prompt_text(tokenizer, item.prompt) for item in load_prompts("mtbench", limit=2)]
    return texts, [tokenizer(text, add_special_tokens=False).input_ids for text in texts], tokenizer.eos_token_id


@needs_llama_cpp
@pytest.mark.parametrize("gguf_type", ["f32", "q4_1"])
def test_llama_cpp_tokenizes_like_us_and_decodes_greedily(real_model_dir, smoke_prompts, gguf_type):
    from export.manifest import DEFAULT_MAX_CONTEXT
    from tools.peers.llamacpp_gguf import ensure_gguf
    from tools.peers.llamacpp import LlamaCppPeer

    texts, ours, eos = smoke_prompts
    peer = LlamaCppPeer(ensure_gguf(real_model_dir, gguf_type), TEST_THREADS, DEFAULT_MAX_CONTEXT, [eos])
    try:
        check_tokenization(peer.tokenize, texts, ours)
        for ids in ours:
            first = peer.generate(ids, SMOKE_NEW_TOKENS)
            again = peer.generate(ids, SMOKE_NEW_TOKENS)   # the cache is cleared between generations
            assert first.tokens == again.tokens and 0 < first.first_token_seconds < first.seconds
            assert len(first.tokens) == SMOKE_NEW_TOKENS or first.tokens[-1] == eos
    finally:
        peer.close()


@needs_llama_cpp
def test_llama_cpp_f32_greedy_equals_our_fp32_vanilla(real_model_dir, smoke_prompts):
    """Same f32 weights, same argmax: llama.cpp's tokens are ours on the smoke prompts (a difference
    would have to be a top-2 tie at rounding level, the README's "Lossless, precisely")."""
    from export.manifest import DEFAULT_MAX_CONTEXT
    from runtime.generator import Generator
    from tools.peers.llamacpp_gguf import ensure_gguf
    from tools.peers.llamacpp import LlamaCppPeer

    _, ours, eos = smoke_prompts
    gen = Generator.from_pretrained(real_model_dir, method="vanilla", backend="torch")
    peer = LlamaCppPeer(ensure_gguf(real_model_dir, "f32"), TEST_THREADS, DEFAULT_MAX_CONTEXT, [eos])
    try:
        for ids in ours:
            assert peer.generate(ids, SMOKE_NEW_TOKENS).tokens == gen.generate(ids, max_new_tokens=SMOKE_NEW_TOKENS).token_ids
    finally:
        peer.close()
