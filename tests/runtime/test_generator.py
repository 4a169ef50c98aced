"""Generator behaviour on the tiny random model: budget, EOS, stop strings, streaming, bad input."""

import pytest

from export.checkpoint import CheckpointError
from runtime import Generator


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator.from_pretrained(tiny_model_dir, method="vanilla", max_context=256)


def test_generate_respects_budget_and_reports_stats(gen):
    result = gen.generate("Hello there", max_new_tokens=9)
    assert 1 <= len(result.token_ids) <= 9
    s = result.stats
    assert s.new_tokens == len(result.token_ids)
    assert s.steps == len(result.token_ids)  # vanilla: one token per forward, prefill included
    assert s.mean_accepted == pytest.approx(1.0)
    assert s.tokens_per_s > 0 and 0 < s.forward_seconds <= s.seconds


def test_stream_pieces_join_to_the_text(gen):
    from runtime.generator import Result

    result = Result([], "")
    pieces = list(gen.stream("Tell me a story", max_new_tokens=12, result=result))
    assert "".join(pieces) == result.text
    assert result.text == gen.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_eos_ends_generation(gen):
    free = gen.generate("Tell me a story", max_new_tokens=20)
    # Pretend the 4th generated token is EOS: generation must stop right after it.
    stopper = Generator(gen.backend, gen.tokenizer, gen.proposer, [free.token_ids[3]])
    stopped = stopper.generate("Tell me a story", max_new_tokens=20)
    first = free.token_ids.index(free.token_ids[3])
    assert stopped.token_ids == free.token_ids[: first + 1]


def test_stop_string_cuts_text_and_tokens(gen):
    free = gen.generate("Tell me a story", max_new_tokens=20)
    assert len(free.text) > 6
    stop = free.text[3:6]
    stopped = gen.generate("Tell me a story", max_new_tokens=20, stop=[stop])
    assert stopped.text.endswith(stop) and stop not in stopped.text[:-1]
    assert stopped.text == free.text[: free.text.index(stop) + len(stop)]
    assert len(stopped.token_ids) < len(free.token_ids)
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]


def test_chat_messages_and_token_ids_are_accepted(gen):
    text = gen.generate("Hi", max_new_tokens=5)
    chat = gen.generate([{"role": "user", "content": "Hi"}], max_new_tokens=5)
    ids = gen.generate(gen.encode("Hi"), max_new_tokens=5)
    assert text.token_ids == chat.token_ids == ids.token_ids


@pytest.mark.parametrize("prompt, message", [
    ("", "empty prompt"),
    ("   ", "empty prompt"),
    ([], "empty prompt"),
    ([1, 2, 10**9], "out of range"),
    ([1, -1], "out of range"),
    ([{"content": "Hi"}], "chat message 0 has no 'role'"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant"}], "chat message 1 has no 'content'"),
    ([{"role": "user"}], "needs a \"role\" .* and a \"content\" string"),
    ([{"role": "user", "content": 5}], "'content' must be a string, got int"),
    ([{"role": "user", "content": "Hi"}, "Hi"], "chat message 1 is a str, not a dict"),
    ([1, "2"], "token ids \\(ints\\), not str '2'"),
])
def test_bad_prompts_are_clear_errors(gen, prompt, message):
    with pytest.raises(ValueError, match=message):
        gen.generate(prompt, max_new_tokens=4)


def test_over_long_prompt_fails_before_any_work(gen):
    steps_before = gen.backend.length
    with pytest.raises(ValueError, match="exceeds max_context 256"):
        gen.generate([5] * 250, max_new_tokens=10)
    assert gen.backend.length == steps_before


def test_unknown_method_backend_and_model(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'medusa'"):
        Generator.from_pretrained(tiny_model_dir, method="medusa")
    with pytest.raises(ValueError, match="unknown backend 'tvm'"):
        Generator.from_pretrained(tiny_model_dir, backend="tvm")
    with pytest.raises(ValueError, match="unknown option"):
        Generator.from_pretrained(tiny_model_dir, method="ngram", max_nodez=4)
    with pytest.raises(CheckpointError, match="does not exist"):
        Generator.from_pretrained(tmp_path / "missing")


def test_decoding_options_are_checked_before_any_work(gen):
    with pytest.raises(ValueError, match="temperature"):
        gen.generate("Hi", max_new_tokens=4, temperature=-0.7)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate("Hi", max_new_tokens=4, top_p=0)
    assert gen.generate("Hi", max_new_tokens=4, temperature=0.0).token_ids == gen.generate("Hi", max_new_tokens=4).token_ids


def test_a_second_thread_is_refused_not_mixed_in(gen):
    stream = gen.stream("Tell me a story", max_new_tokens=8)
    next(stream)                                     # a generation is under way
    import threading

    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, gen.generate, "Hi", 4)))
    thread.start()
    thread.join()
    assert "already generating" in str(errors[0].value)
    stream.close()                                   # ends the first generation and frees the Generator
    assert gen.generate("Hi", max_new_tokens=3).token_ids


def test_layouts_become_device_tensors_once(gen):
    """Vanilla's decode steps share one layout: the backend builds its tensors once, not per step."""
    gen.generate("Tell me a story", max_new_tokens=12)
    built = len(gen.backend._layouts)
    gen.generate("Tell me a story", max_new_tokens=12)
    assert len(gen.backend._layouts) == built        # same prompt length, same step shape: nothing new


def test_incremental_detokenizer_matches_a_full_decode_on_multibyte_text(gen):
    from runtime.detokenize import IncrementalDetokenizer

    for text in ["naïve café — 東京 🚀 ok", "a\n\n  b\tc", "ÿ😀😀x"]:
        ids = gen.tokenizer(text, add_special_tokens=False).input_ids
        detok = IncrementalDetokenizer(gen.tokenizer)
        pieces = [detok.add(t) for t in ids] + [detok.flush()]
        assert all("\ufffd" not in p for p in pieces[:-1])   # partial characters are held back
        assert "".join(pieces) == gen.tokenizer.decode(ids, skip_special_tokens=True)
    truncated = gen.tokenizer("🚀", add_special_tokens=False).input_ids[:-1]  # ends inside a character
    detok = IncrementalDetokenizer(gen.tokenizer)
    assert "".join(detok.add(t) for t in truncated) + detok.flush() == gen.tokenizer.decode(truncated)


def test_the_readout_runs_on_the_backends_readout_threads():
    """A backend computing outside torch asks for one torch thread in the readout (ModelInfo.readout_threads):
    the verifier runs with it, and torch's setting is restored after every step."""
    import dataclasses

    import torch

    from runtime.generator import GenerationStats
    from runtime.verify import GreedyVerifier
    from tests.runtime.toy_backend import FanProposer, ToyBackend

    class RecordingVerifier(GreedyVerifier):
        seen: list[int] = []

        def choose(self, logits, positions):
            self.seen.append(torch.get_num_threads())
            return super().choose(logits, positions)

    backend = ToyBackend()
    backend.info = dataclasses.replace(backend.info, readout_threads=1)
    gen = Generator(backend, tokenizer=None, proposer=FanProposer(), eos_token_ids=[])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        verifier = RecordingVerifier()
        steps = gen.decode_steps([1, 3, 0, 2], GenerationStats(), verifier)
        for _, _ in zip(range(3), steps):
            assert torch.get_num_threads() == 2
        assert verifier.seen == [1, 1, 1]
    finally:
        torch.set_num_threads(before)


def test_a_base_model_without_a_chat_template_takes_raw_text(gen, monkeypatch):
    """A string prompt goes through the chat template when the checkpoint has one, else it is the raw
    text (a base model); chat messages need a template."""
    templated = gen.encode("Hi")
    monkeypatch.setattr(gen.tokenizer, "chat_template", None)
    assert gen.encode("Hi") == gen.tokenizer("Hi").input_ids != templated
    with pytest.raises(ValueError, match="no chat template"):
        gen.encode([{"role": "user", "content": "Hi"}])
