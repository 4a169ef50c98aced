"""Decoding methods as proposers over the one decode loop."""

from runtime.proposers.base import Proposer
from runtime.proposers.ngram import NgramConfig, NgramProposer
from runtime.proposers.vanilla import VanillaProposer

__all__ = ["NgramConfig", "NgramProposer", "Proposer", "VanillaProposer"]
