import numpy as np
import pytest

from export.methods import NgramOptions
from runtime.proposers import CandidateTrie
from runtime.proposers.ngram import NgramProposer, find_continuations


def test_find_continuations_most_recent_first():
    hist = np.array([1, 2, 3, 9, 1, 2, 4, 5, 1, 2])
    conts = find_continuations(hist, n=2, depth=3)
    assert [c.tolist() for c in conts] == [[4, 5, 1], [3, 9, 1]]


def test_proposal_is_a_trie_within_budget():
    proposer = NgramProposer(NgramOptions(max_ngram=2, max_depth=3, max_nodes=5))
    draft = proposer.propose([1, 2, 3, 9, 1, 2, 4, 5, 1, 2])
    assert draft.tokens[0] == 2                         # root = last token
    assert draft.size <= 5
    # first branch from the most recent match [4, 5, 1], then [3, 9, ...] until the budget is spent
    assert draft.tokens.tolist()[:4] == [2, 4, 5, 1]
    assert draft.buffers.parents.tolist()[:4] == [-1, 0, 1, 2]
    assert draft.tokens[4] == 3 and draft.buffers.parents[4] == 0


def test_no_match_gives_root_only():
    draft = NgramProposer().propose([1, 2, 3, 4])
    assert draft.size == 1


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="min_ngram"):
        NgramOptions(max_ngram=1, min_ngram=2)


def test_trie_merges_sources_and_shares_prefixes_within_budget():
    trie = CandidateTrie(root=7, max_nodes=6)
    assert trie.add([1, 2, 3], "ppd") == [1, 2, 3]
    assert trie.add([1, 2, 4], "ngram") == [1, 2, 4]  # [1, 2] shared: one new node
    assert trie.add([5, 6, 8], "ngram") == [5]        # budget: only 5 fits
    assert trie.full and trie.add([9], "ngram") == []
    assert trie.add([4], "ngram", below=2) == [4]      # below another node: shared
    draft = trie.draft()
    assert draft.tokens.tolist() == [7, 1, 2, 3, 4, 5]
    assert draft.buffers.parents.tolist() == [-1, 0, 1, 2, 2, 0]
    assert draft.sources == ("root", "ppd", "ppd", "ppd", "ngram", "ngram")
    assert draft.children[2] == {3: 3, 4: 4}


def test_repeated_tree_shapes_reuse_one_layout():
    proposer = NgramProposer(NgramOptions(max_ngram=2, max_depth=3, max_nodes=5))
    history = [1, 2, 3, 9, 1, 2, 4, 5, 1, 2]
    assert proposer.propose(history).layout is proposer.propose(history).layout
