"""Decoding methods as proposers over the one decode loop."""

from runtime.proposers.base import Proposer
from runtime.proposers.ngram import NgramProposer
from runtime.proposers.trie import CandidateTrie
from runtime.proposers.vanilla import VanillaProposer

__all__ = ["CandidateTrie", "NgramProposer", "Proposer", "VanillaProposer"]
