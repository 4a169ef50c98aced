"""Lossless sampling: every tree method emits, for a given seed, exactly the tokens plain sampling emits,
and the sampler's output follows the model's processed distribution exactly.

(a) equality with vanilla sampling, many seeds x temperatures x top-p/top-k, on a float64 tiny model
    (no rounding differences between a tree step and one-token steps), with EOS, stop strings and
    the budget; the real-model check is in tests/runtime/test_lossless.py;
(b) the distribution of the first three tokens of a toy 5-token model through the real decode loop,
    against the exact product of processed rows, over 20,000 seeds (chi-square);
(c) the negative control: Medusa/PPD "typical acceptance" on the same toy fails (b).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from export.checkpoint import load_checkpoint
from export.ht import TransferMaps
from export.methods import NgramOptions
from export.ppd import PPDConfig
from export.step_model import StepModel
from runtime.backends.torch_backend import TorchBackend
from runtime.generator import GenerationStats, Generator
from runtime.proposers import NgramProposer, VanillaProposer
from runtime.proposers.hybrid import HybridProposer, NgramSource
from runtime.proposers.ppd import PPDProposer
from runtime.sampling import SamplingVerifier, process_logits
from runtime.decoding import DecodingOptions
from tests.runtime.test_ppd import TREES
from tests.runtime.toy_backend import VOCAB, FanProposer, ToyBackend
from trees import PPDTreeSet

PROMPT = [1, 3, 0, 2]
RUNS = 20_000
OPTIONS = DecodingOptions(temperature=0.8, top_p=0.9)


# --- (a) equality on a float64 tiny model ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny64(tiny_model_dir):
    """{method: Generator} over float64 step models of the tiny Llama (ppd rows; ht maps)."""
    hf, tokenizer = load_checkpoint(tiny_model_dir)
    hidden, vocab = hf.config.hidden_size, hf.config.vocab_size
    g = torch.Generator().manual_seed(5)
    ppd_backend = TorchBackend(StepModel(hf, torch.randn(4, hidden, generator=g) * 0.02).double(), 512)
    maps = TransferMaps(torch.eye(hidden) + 0.1 * torch.randn(2, hidden, hidden, generator=g), torch.zeros(2, hidden),
                        layer=0)
    ht_backend = TorchBackend(StepModel(hf, None, maps).double(), 512)
    trees = PPDTreeSet.from_json(TREES)
    eos = [tokenizer.eos_token_id]
    return {
        "vanilla": Generator(ppd_backend, tokenizer, VanillaProposer(), eos),
        "ngram": Generator(ppd_backend, tokenizer, NgramProposer(NgramOptions(max_nodes=8)), eos),
        "ppd": Generator(ppd_backend, tokenizer, PPDProposer(PPDConfig(2, 2), trees, vocab), eos),
        "hybrid": Generator(ppd_backend, tokenizer,
                            HybridProposer(PPDConfig(2, 2), trees, vocab, NgramSource(3, 1)), eos),
        "ht": Generator(ht_backend, tokenizer, PPDProposer(maps.layout, trees, vocab), eos),
        "ht-vanilla": Generator(ht_backend, tokenizer, VanillaProposer(), eos),
    }


# The tiny random model's distributions are flat over its 49k tokens: at usual temperatures nothing
# repeats and no guess is ever accepted, so low temperatures (sharp, loop-prone text) exercise the trees.
SETTINGS = [dict(temperature=t, top_p=p, top_k=k) for t, p, k in [(0.05, 1.0, 0), (0.1, 0.9, 0), (0.2, 0.95, 5),
                                                                   (1.0, 1.0, 0), (1.5, 0.8, 20)]]


@pytest.mark.parametrize("settings", SETTINGS)
def test_every_method_samples_what_vanilla_samples(tiny64, settings):
    prompts = ["Hello", "1 2 3 1 2 3 1 2", "Write a poem about the sea"]
    accepted = []
    for prompt, seed in itertools.product(prompts, range(4)):
        want = tiny64["vanilla"].generate(prompt, max_new_tokens=24, seed=seed, **settings)
        assert want.seed == seed
        for method in ("ngram", "ppd", "hybrid"):
            got = tiny64[method].generate(prompt, max_new_tokens=24, seed=seed, **settings)
            assert got.token_ids == want.token_ids, (method, prompt, seed)
            accepted.append(got.stats.mean_accepted)
        ht_want = tiny64["ht-vanilla"].generate(prompt, max_new_tokens=24, seed=seed, **settings).token_ids
        assert tiny64["ht"].generate(prompt, max_new_tokens=24, seed=seed, **settings).token_ids == ht_want
    if settings["temperature"] <= 0.1:
        assert max(accepted) > 1.2   # candidates were accepted: the trees were really exercised


# Seeds on which the inverse-CDF draw we used before made ngram's float32 tree steps sample a
# neighbouring token id (30669 for 30668, 29111 for 29108): rounding of the other 49k tokens moved the
# boundary. Found by scanning 400 random seeds (2 failed); the Gumbel-max race passed 2,000.
INVERSE_CDF_MISSES = (4732527028723573789, 2695370863637622053)


def test_float32_tree_steps_sample_what_one_token_steps_sample(tiny_model_dir):
    """On the float32 tiny model (tree and one-token steps round differently), the seeds that broke the
    inverse-CDF draw: ngram still samples what vanilla samples."""
    vanilla = Generator.from_pretrained(tiny_model_dir)
    ngram = Generator.from_pretrained(tiny_model_dir, method="ngram")
    for seed in INVERSE_CDF_MISSES:
        options = dict(max_new_tokens=16, temperature=0.1, top_p=0.9, seed=seed)
        want = vanilla.generate("1 2 3 1 2 3 1 2 3", **options)
        got = ngram.generate("1 2 3 1 2 3 1 2 3", **options)
        assert got.token_ids == want.token_ids, seed
        assert got.stats.steps < want.stats.steps   # the tree accepted candidates: tree steps were compared


def test_eos_stop_strings_and_budget_cut_sampled_output_alike(tiny64):
    vanilla, ppd = tiny64["vanilla"], tiny64["ppd"]
    free = vanilla.generate("Hello", max_new_tokens=30, seed=11, temperature=1.0)
    eos = free.token_ids[5]
    stoppers = {m: Generator(g.backend, g.tokenizer, g.proposer, [eos]) for m, g in (("v", vanilla), ("p", ppd))}
    ends = {m: g.generate("Hello", max_new_tokens=30, seed=11, temperature=1.0).token_ids for m, g in stoppers.items()}
    assert ends["v"] == ends["p"] == free.token_ids[: free.token_ids.index(eos) + 1]
    stop = free.text[4:7]
    texts = {g.generate("Hello", max_new_tokens=30, stop=[stop], seed=11, temperature=1.0).text for g in (vanilla, ppd)}
    assert texts == {free.text[: free.text.index(stop) + len(stop)]}
    for budget in (1, 2, 7):
        assert ppd.generate("Hello", max_new_tokens=budget, seed=11, temperature=1.0).token_ids == free.token_ids[:budget]


def test_no_seed_draws_a_fresh_one_and_reports_it(tiny64):
    first = tiny64["ppd"].generate("Hello", max_new_tokens=12, temperature=1.0)
    second = tiny64["ppd"].generate("Hello", max_new_tokens=12, temperature=1.0)
    assert first.seed is not None and second.seed is not None and first.seed != second.seed
    again = tiny64["vanilla"].generate("Hello", max_new_tokens=12, temperature=1.0, seed=first.seed)
    assert again.token_ids == first.token_ids
    assert tiny64["vanilla"].generate("Hello", max_new_tokens=4).seed is None   # greedy needs none


# --- (b) and (c): the distribution, against the exact one -----------------------------------------

def exact_first_tokens(toy: ToyBackend, options: DecodingOptions, n: int = 3) -> dict[tuple[int, ...], float]:
    """P(first n new tokens) = product of the processed rows along each sequence."""
    result = {}
    for seq in itertools.product(range(VOCAB), repeat=n):
        p, position, token = 1.0, len(PROMPT) - 1, PROMPT[-1]
        for x in seq:
            p *= float(process_logits(toy.logits_after(position, token)[None], options)[0, x])
            position, token = position + 1, x
        result[seq] = p
    return result


def chi_square(counts: dict, expected: dict[tuple, float], runs: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, cells with expected count < 5 pooled into one."""
    stat, small_obs, small_exp, cells = 0.0, 0, 0.0, 0
    for cell, p in expected.items():
        e, o = p * runs, counts.get(cell, 0)
        if e < 5:
            small_obs, small_exp = small_obs + o, small_exp + e
            continue
        stat, cells = stat + (o - e) ** 2 / e, cells + 1
    if small_exp > 0:
        stat, cells = stat + (small_obs - small_exp) ** 2 / small_exp, cells + 1
    return stat, cells - 1


def chi_square_bound(dof: int) -> float:
    """~ the 1e-6 upper quantile (normal approximation with a margin): a correct sampler fails it ~never."""
    return dof + 5 * math.sqrt(2 * dof) + 10


def test_sampled_first_tokens_follow_the_exact_distribution():
    toy = ToyBackend(seed=3)
    gen = Generator(toy, tokenizer=None, proposer=FanProposer(), eos_token_ids=[])
    counts: dict[tuple[int, ...], int] = {}
    multi = 0
    for seed in range(RUNS):
        out: list[int] = []
        for step in gen.decode_steps(PROMPT, GenerationStats(), SamplingVerifier(OPTIONS, seed)):
            out.extend(step.tokens)
            multi += len(step.tokens) > 1
            if len(out) >= 3:
                break
        counts[tuple(out[:3])] = counts.get(tuple(out[:3]), 0) + 1
    stat, dof = chi_square(counts, exact_first_tokens(toy, OPTIONS), RUNS)
    assert multi > RUNS // 2, "the fan tree should often accept candidates"
    assert stat < chi_square_bound(dof), (stat, dof)


def typical_acceptance_first_tokens(toy: ToyBackend, rng: np.random.Generator, epsilon: float = 0.09,
                                    delta: float = 0.3) -> tuple[int, ...]:
    """Medusa/PPD typical acceptance over FanProposer's tree: a candidate is accepted when its
    probability exceeds min(epsilon, delta * exp(-entropy)); the bonus is sampled after the last."""
    out, position, token = [], len(PROMPT) - 1, PROMPT[-1]
    paths = [[0, 1, 2]] + [[t] for t in range(1, VOCAB)]
    while len(out) < 3:
        best: list[int] = []
        for path in paths:
            accepted, pos, tok = [], position, token
            for candidate in path:
                probs = process_logits(toy.logits_after(pos, tok)[None], OPTIONS)[0]
                entropy = float(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
                if float(probs[candidate]) <= min(epsilon, delta * math.exp(-entropy)):
                    break
                accepted.append(candidate)
                pos, tok = pos + 1, candidate
            best = accepted if len(accepted) > len(best) else best
        for candidate in best:
            out.append(candidate)
            position, token = position + 1, candidate
        probs = process_logits(toy.logits_after(position, token)[None], OPTIONS)[0].double().numpy()
        out.append(int(rng.choice(VOCAB, p=probs / probs.sum())))
        position, token = position + 1, out[-1]
    return tuple(out[:3])


def test_negative_control_typical_acceptance_fails_the_same_test():
    toy = ToyBackend(seed=3)
    rng = np.random.default_rng(0)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(RUNS // 4):        # far fewer runs already reject it
        seq = typical_acceptance_first_tokens(toy, rng)
        counts[seq] = counts.get(seq, 0) + 1
    stat, dof = chi_square(counts, exact_first_tokens(toy, OPTIONS), RUNS // 4)
    assert stat > 10 * chi_square_bound(dof), (stat, dof)
