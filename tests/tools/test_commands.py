"""python -m tools generate|demo|bench|memory: flags built from the library's defaults, errors as exit 2."""

import dataclasses
import inspect

import pytest

from export.manifest import DEFAULT_MAX_CONTEXT
from export.paths import DEFAULT_MODEL_DIR
from tools.commands import BenchCommand, build_parser, main, shared_flags
from runtime.backends import DEFAULT_BACKEND
from tools.bench.harness import BenchConfig
from runtime.generator import DEFAULT_MAX_NEW_TOKENS, DEFAULT_METHOD, Generator
from tools.recommended import FASTEST_BACKEND, FASTEST_METHOD
from runtime.decoding import DecodingOptions
from trees.config_args import config_from_args


def parsed(*argv: str):
    return config_from_args(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("command", [("generate", "hi"), ("demo",), ("bench",), ("memory",)])
def test_shared_defaults_are_the_library_ones(command):
    cfg = parsed(*command)
    backend = FASTEST_BACKEND if command == ("demo",) else DEFAULT_BACKEND   # the demo shows the fastest
    assert (cfg.model, cfg.backend, cfg.max_new_tokens) == (str(DEFAULT_MODEL_DIR), backend, DEFAULT_MAX_NEW_TOKENS)
    assert cfg.device == BenchConfig.device


def test_demo_shows_the_fastest_measured_configuration():
    cfg = parsed("demo")
    assert (cfg.method, cfg.backend) == (FASTEST_METHOD, FASTEST_BACKEND)


def test_generate_defaults_are_the_library_ones():
    cfg = parsed("generate", "hi")
    assert cfg.max_context == DEFAULT_MAX_CONTEXT
    assert cfg.decoding() == DecodingOptions()
    assert cfg.method == DEFAULT_METHOD == inspect.signature(Generator.from_pretrained).parameters["method"].default
    assert (cfg.prompt, cfg.stop, cfg.option) == ("hi", None, None)


def test_bench_defaults_make_the_default_bench_config():
    cfg = parsed("bench")
    assert isinstance(cfg, BenchCommand) and cfg.out is None
    assert cfg.bench_config() == BenchConfig()
    changed = parsed("bench", "--methods", "vanilla,ppd", "--limit", "2", "--repeats", "1", "--prompts", "humaneval")
    assert changed.bench_config() == dataclasses.replace(BenchConfig(), methods=("vanilla", "ppd"), limit=2,
                                                         repeats=1, prompts="humaneval")


def test_memory_hands_its_settings_to_each_bench_child():
    cfg = parsed("memory", "--limit", "2", "--backend", "onnxruntime", "--prompts", "humaneval")
    child = parsed("bench", *shared_flags(cfg, "prompts", "limit"))
    names = ("model", "backend", "device", "max_new_tokens", "prompts", "limit")
    assert [getattr(child, n) for n in names] == [getattr(cfg, n) for n in names]


def test_repeatable_flags_collect():
    cfg = parsed("generate", "hi", "--stop", "\n\n", "--stop", "END", "--option", "n=3", "--option", "x=y")
    assert cfg.stop == ["\n\n", "END"] and cfg.option == ["n=3", "x=y"]


def test_sampling_with_a_seed_is_reproducible(tiny_model_dir, capsys):
    args = ["generate", "hi", "--model", str(tiny_model_dir), "--temperature", "0.9", "--top-p", "0.9",
            "--seed", "7", "--max-new-tokens", "8"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "seed 7" in first.err
    assert main(args + ["--method", "ngram"]) == 0
    assert capsys.readouterr().out == first.out


def test_negative_temperature_is_refused_with_exit_2(tiny_model_dir, capsys):
    assert main(["generate", "hi", "--model", str(tiny_model_dir), "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "temperature" in err


def test_bad_top_p_is_refused_with_exit_2(tiny_model_dir, capsys):
    assert main(["generate", "hi", "--model", str(tiny_model_dir), "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_bad_method_option_is_refused_with_exit_2(tiny_model_dir, capsys):
    assert main(["generate", "hi", "--model", str(tiny_model_dir), "--option", "nokey"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_generate_prints_text(tiny_model_dir, capsys):
    assert main(["generate", "Hello", "--model", str(tiny_model_dir), "--method", "ngram",
                 "--max-new-tokens", "6", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    expected = Generator.from_pretrained(tiny_model_dir, method="ngram").generate("Hello", max_new_tokens=6)
    assert out == expected.text     # the streamed text; the stats line goes to stderr
    assert f"[ngram] {len(expected.token_ids)} tokens" in err


def test_unknown_method_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--method", "nope"])
    assert exc.value.code != 0 and "nope" in capsys.readouterr().err


def test_missing_model_dir_is_exit_2(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
