"""The CPU's vector extensions (export/devices.py): what its kernels dispatch on, in every CPU device name."""

from __future__ import annotations

import warnings

import pytest

from export import devices
from export.devices import cpu_isa, device_name

AVX2_EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma f16c bmi2\n"
AVX512_EPYC = "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni fma\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm sve bf16\n"


def test_the_extensions_in_a_fixed_order_from_cpuinfo():
    assert cpu_isa(AVX2_EPYC) == "avx2 fma f16c"
    assert cpu_isa(AVX512_EPYC) == "avx2 fma avx512f avx512bw avx512_vnni"    # the same model name, other kernels
    assert cpu_isa(GRAVITON) == "asimd asimddp i8mm bf16 sve"
    assert cpu_isa("") == ""                                                  # no /proc/cpuinfo: none listed


def test_a_cpu_device_name_carries_them():
    isa = cpu_isa()
    name = device_name("cpu")
    assert name.startswith("cpu: ") and (name.endswith(f"threads; {isa})") if isa else name.endswith("threads)"))


def test_a_tree_searched_for_another_cpu_warns(monkeypatch):
    monkeypatch.setattr(devices, "cpu_isa", lambda cpuinfo=None: "avx2 fma")
    with pytest.warns(UserWarning, match=r"searched for a CPU with avx2 fma avx512f, this one has avx2 fma: .*"
                                         r"`make tree GPU=cpu QUANT=int4`"):
        devices.warn_if_searched_for_another_cpu("t.json", {"cpu_isa": "avx2 fma avx512f", "variant": "int4"}, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        devices.warn_if_searched_for_another_cpu("t.json", {"cpu_isa": "avx2 fma"}, "cpu")      # this CPU's
        devices.warn_if_searched_for_another_cpu("t.json", {}, "cpu")                           # from before the field
        devices.warn_if_searched_for_another_cpu("t.json", {"cpu_isa": "avx2"}, "cuda")          # not a CPU run
