"""export/trained_file.py through both formats (ppd prompt tokens, ht transfer maps): a file whose
tensors disagree with its header, holds NaN/inf, or has a damaged header is refused with the fix."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from export.ht import TransferMapError, TransferMaps, load_transfer_maps, save_transfer_maps
from export.ppd import PPDConfig, PromptTokenError, load_prompt_tokens, save_prompt_tokens

HIDDEN, FINGERPRINT = 8, "f" * 16


def saved_ppd(path):
    save_prompt_tokens(path, torch.randn(4, HIDDEN), PPDConfig(2, 2), FINGERPRINT, dtype=torch.float32)
    return path, lambda p: load_prompt_tokens(p, FINGERPRINT, HIDDEN), PromptTokenError, "python -m train ppd"


def saved_ht(path):
    save_transfer_maps(path, TransferMaps(torch.randn(2, HIDDEN, HIDDEN), torch.randn(2, HIDDEN), 1), FINGERPRINT,
                       dtype=torch.float32)
    return path, lambda p: load_transfer_maps(p, FINGERPRINT, HIDDEN), TransferMapError, "python -m train ht"


FORMATS = {"ppd": saved_ppd, "ht": saved_ht}


def rewrite(path, edit_tensors=None, edit_header=None):
    """Re-save `path` with its tensors and/or header changed, as a hand-edited or buggy writer would."""
    with safe_open(str(path), framework="pt") as f:
        header, tensors = dict(f.metadata()), {name: f.get_tensor(name) for name in f.keys()}
    save_file(edit_tensors(tensors) if edit_tensors else tensors, str(path),
              metadata=edit_header(header) if edit_header else header)


@pytest.mark.parametrize("method", FORMATS)
def test_saved_file_loads(method, tmp_path):
    path, load, _, _ = FORMATS[method](tmp_path / "c.safetensors")
    load(path)  # the round trip itself is checked in test_ppd.py / test_ht.py; here: the checks pass


@pytest.mark.parametrize("method", FORMATS)
def test_tensor_shape_other_than_the_header_is_refused(method, tmp_path):
    path, load, error, command = FORMATS[method](tmp_path / "c.safetensors")
    rewrite(path, edit_tensors=lambda t: {name: x[:1] for name, x in t.items()})
    with pytest.raises(error, match=rf"but its header says .*re-create it with `{command}`"):
        load(path)


@pytest.mark.parametrize("method", FORMATS)
def test_non_finite_values_are_refused(method, tmp_path):
    path, load, error, command = FORMATS[method](tmp_path / "c.safetensors")

    def poison(tensors):
        first = sorted(tensors)[0]
        tensors[first] = tensors[first].clone().flatten().index_fill(0, torch.tensor([3]), float("nan")).reshape(
            tensors[first].shape)
        return tensors

    rewrite(path, edit_tensors=poison)
    with pytest.raises(error, match=rf"non-finite values in .*re-create it with `{command}`"):
        load(path)


@pytest.mark.parametrize("method", FORMATS)
def test_damaged_header_is_refused(method, tmp_path):
    path, load, error, command = FORMATS[method](tmp_path / "c.safetensors")
    rewrite(path, edit_header=lambda h: {**h, "hidden_size": "eight"})
    with pytest.raises(error, match=rf"damaged header .*re-create it with `{command}`"):
        load(path)


def test_prompt_token_counts_out_of_range_are_a_damaged_header(tmp_path):
    path, load, error, command = saved_ppd(tmp_path / "c.safetensors")
    rewrite(path, edit_header=lambda h: {**h, "num_prompt_tokens": "0"})
    with pytest.raises(error, match=rf"damaged header .*re-create it with `{command}`"):
        load(path)
