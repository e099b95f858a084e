"""Evaluation metrics and baselines: computed by hand on small cases, and the model's ranks aligned with
independent prefix-by-prefix predictions."""

from __future__ import annotations

import numpy as np
import torch

from pgtraj.data import to_tensors
from pgtraj.evaluate import MarkovChain, model_ranks, ranking_metrics, tune_markov
from pgtraj.features import collate, to_inputs
from pgtraj.tokenizer import SPECIAL_TOKENS

from .test_model import TOK, TRIPS, make_model

S = len(SPECIAL_TOKENS)


def test_ranking_metrics_by_hand():
    m = ranking_metrics(np.array([1, 2, 6, 20]))
    assert m["acc@1"] == 0.25 and m["acc@5"] == 0.5 and m["acc@10"] == 0.75
    assert abs(m["mrr"] - (1 + 0.5 + 1 / 6 + 1 / 20) / 4) < 1e-12 and m["n"] == 4


def test_markov_chains_on_a_deterministic_cycle():
    cycle = np.array([S, S + 1, S + 2] * 20)
    V = S + 4
    mc1 = MarkovChain(1, V, (0.1, 0.9)).fit([cycle])
    assert (mc1.ranks([cycle]) == 1).all()
    # popularity cannot tell the three apart: pessimistic ties rank each at 3 (plus nothing unseen above)
    pop = MarkovChain(0, V).fit([cycle])
    assert set(pop.ranks([cycle]).tolist()) == {3}
    # order 2 resolves what order 1 cannot: after S+1 comes S+2 or S+3 depending on what came before
    seqs = [np.array([S, S + 1, S + 2] * 5), np.array([S + 3, S + 1, S] * 5)]
    mc2 = tune_markov(2, V, seqs, seqs)
    mc1b = tune_markov(1, V, seqs, seqs)
    assert ranking_metrics(mc2.ranks(seqs))["acc@1"] > ranking_metrics(mc1b.ranks(seqs))["acc@1"]
    assert mc1.scores([S])[:S].max() < 0  # special tokens are never predicted


def test_model_ranks_align_with_prefix_predictions():
    model = make_model().eval()
    x = TOK.encode(TRIPS[7])
    ranks = model_ranks(model, [x], max_len=64)
    n = min(len(x.tokens), 63)
    assert len(ranks) == n - 1
    inp = to_inputs(x)
    for i in (1, 5, n - 1):  # predict token i from the prefix tokens[:i], with nothing after it
        b = to_tensors(collate([inp], max_len=i + 1))  # BOS + i tokens
        with torch.no_grad():
            logits, _ = model.next_logits(**b)
        lg = logits[0, -1].numpy().copy()
        lg[:S] = -np.inf
        assert ranks[i - 1] == int(np.sum(lg >= lg[x.tokens[i]]))


def test_constrained_ranking_puts_grid_neighbours_first():
    model = make_model().eval()
    nb = TOK.neighbour_table()
    xs = [TOK.encode(t) for t in TRIPS[:5]]
    free, near = model_ranks(model, xs, max_len=64), model_ranks(model, xs, max_len=64, neighbours=nb)
    width = (nb != 0).sum(1).max()
    on_grid = [int(t) in set(nb[int(p)].tolist()) for x in xs for p, t in zip(x.tokens[:63][:-1], x.tokens[:63][1:])]
    on_grid = np.array(on_grid)
    assert on_grid.mean() > 0.9  # interpolated synthetic paths step to neighbours
    assert (near[on_grid] <= width).all() and ranking_metrics(near)["mrr"] >= ranking_metrics(free)["mrr"]
