import torch

from runtime.draft import Draft
from runtime.verify import verify_greedy

V = 10


def logits_predicting(predictions: list[int]) -> torch.Tensor:
    logits = torch.zeros(len(predictions), V)
    logits[torch.arange(len(predictions)), torch.tensor(predictions)] = 1.0
    return logits


def test_accepts_longest_matching_path_and_bonus():
    # root(5) -> a(1) -> b(2)
    #         -> c(3) -> d(4)
    draft = Draft.from_parents([5, 1, 3, 2, 4], [-1, 0, 0, 1, 2])
    # model: after root -> 3, after c -> 4, after d -> 7
    path, bonus = verify_greedy(draft, logits_predicting([3, 9, 4, 9, 7]))
    assert path == [0, 2, 4] and bonus == 7


def test_no_match_yields_only_the_bonus():
    draft = Draft.from_parents([5, 1, 3], [-1, 0, 0])
    path, bonus = verify_greedy(draft, logits_predicting([8, 0, 0]))
    assert path == [0] and bonus == 8


def test_auxiliary_nodes_are_never_accepted():
    # node 2 is an auxiliary (e.g. PPD prompt token) carrying the token the model predicts
    draft = Draft.from_parents([5, 1, 6], [-1, 0, 1], num_candidates=2)
    path, bonus = verify_greedy(draft, logits_predicting([1, 6, 0]))
    assert path == [0, 1] and bonus == 6
