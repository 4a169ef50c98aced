"""Verification: the verifier's device half (choose), the host walk, the one readout, the options."""

import numpy as np
import pytest
import torch

from runtime.backends.base import DeviceLayout, StepOutput
from runtime.draft import Draft, Layout
from runtime.readout import read_step
from runtime.sampling import SamplingVerifier
from runtime.decoding import DecodingOptions
from runtime.verify import GreedyVerifier, make_verifier, walk

V = 10


def logits_predicting(predictions: list[int]) -> torch.Tensor:
    logits = torch.zeros(len(predictions), V)
    logits[torch.arange(len(predictions)), torch.tensor(predictions)] = 1.0
    return logits


def greedy_walk(draft: Draft, logits: torch.Tensor):
    chosen = GreedyVerifier().choose(logits[: draft.num_candidates], torch.arange(draft.num_candidates))
    return walk(draft, chosen.numpy())


def test_accepts_longest_matching_path_and_bonus():
    # root(5) -> a(1) -> b(2)
    #         -> c(3) -> d(4)
    draft = Draft.from_parents([5, 1, 3, 2, 4], [-1, 0, 0, 1, 2])
    # model: after root -> 3, after c -> 4, after d -> 7
    path, bonus = greedy_walk(draft, logits_predicting([3, 9, 4, 9, 7]))
    assert path == [0, 2, 4] and bonus == 7


def test_no_match_yields_only_the_bonus():
    draft = Draft.from_parents([5, 1, 3], [-1, 0, 0])
    path, bonus = greedy_walk(draft, logits_predicting([8, 0, 0]))
    assert path == [0] and bonus == 8


def test_auxiliary_nodes_are_never_accepted():
    # node 2 is an auxiliary (e.g. PPD prompt token) carrying the token the model predicts
    draft = Draft.from_parents([5, 1, 6], [-1, 0, 1], num_candidates=2)
    path, bonus = greedy_walk(draft, logits_predicting([1, 6, 0]))
    assert path == [0, 1] and bonus == 6


def test_readout_brings_choices_and_prediction_rows_in_one_array():
    # root(5) -> candidate 1(7); the root carries two prediction rows of k = 2 auxiliary nodes each
    parents = [-1, 0, 0, 0, 2, 3]
    rows = np.array([[2, 3], [4, 5]])
    layout = Layout(Draft.from_parents([0] * 6, parents).buffers, 2, rows, ((0, 2), (0, 0)), predict_topk=2)
    draft = Draft(np.array([5, 7, 100, 101, 102, 103]), layout)
    logits = torch.zeros(6, V)
    logits[0, 7] = logits[1, 4] = 1.0                   # choices: after root 7, after node 1: 4
    logits[2, [8, 2]] = torch.tensor([3.0, 1.0])        # row 0 = mean of nodes 2, 3: 8 first, then 2
    logits[3, [8, 2]] = torch.tensor([1.0, 2.0])
    logits[4, 6] = logits[5, 6] = 5.0                   # row 1: 6 first
    logits[4, 1] = 1.0
    device = DeviceLayout(torch.zeros(6, dtype=torch.int64), torch.zeros(6, 6), torch.from_numpy(rows))
    readout = read_step(StepOutput(logits, torch.arange(6), device), draft, GreedyVerifier())
    assert readout.chosen.tolist() == [7, 4]
    assert readout.predictions.tolist() == [[8, 2], [6, 1]]
    assert readout.predictions_of(draft, 0).shape == (2, 2) and readout.predictions_of(draft, 1).shape[0] == 0
    assert walk(draft, readout.chosen) == ([0, 1], 4)


def test_prefill_reads_back_only_the_last_node():
    draft = Draft.prefill([3, 4, 5])
    device = DeviceLayout(torch.zeros(3, dtype=torch.int64), torch.zeros(3, 3), torch.zeros(0, 1, dtype=torch.int64))
    readout = read_step(StepOutput(logits_predicting([1, 2, 9]), torch.arange(3), device), draft, GreedyVerifier())
    assert readout.chosen.tolist() == [9] and readout.chosen_after(2) == 9


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(seed="x"), "seed"),
])
def test_bad_decoding_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        DecodingOptions(**options)


def test_options_pick_the_verifier():
    assert isinstance(make_verifier(DecodingOptions()), GreedyVerifier)
    assert isinstance(make_verifier(DecodingOptions(temperature=0.7, top_p=0.9, seed=1)), SamplingVerifier)
    with pytest.raises(ValueError, match="needs a seed"):
        make_verifier(DecodingOptions(temperature=0.7))
    seeded = DecodingOptions(temperature=0.7).with_seed()
    assert seeded.seed is not None and DecodingOptions().with_seed().seed is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_greedy_choice_is_torch_argmax_first_maximum_on_ties(dtype):
    # float32 on the CPU takes numpy's argmax; the others torch's: both must pick the first maximum.
    logits = torch.randn(7, 49152, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[3, [17, 40000]] = 50.0          # a tie: the first index wins
    logits[5, :] = 0.0                      # all equal: index 0
    chosen = GreedyVerifier().choose(logits, torch.arange(7))
    assert chosen.dtype == torch.int64 and chosen.tolist() == logits.argmax(dim=-1).tolist()
    assert chosen[3] == 17 and chosen[5] == 0
