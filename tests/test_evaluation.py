"""Evaluation metrics and baselines: computed by hand on small cases, and the model's ranks aligned with
independent prefix-by-prefix predictions."""

from __future__ import annotations

import numpy as np
import torch

from pgtraj.core.features import collate, to_inputs
from pgtraj.core.tokenizer import SPECIAL_TOKENS, Tokenizer
from pgtraj.learn.batches import to_tensors
from pgtraj.learn.evaluation import (
    MarkovChain,
    model_ranks,
    ranking_metrics,
    tune_markov,
)

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
            lg = model.lm_head(model.next_step(**b)[0])[0, -1].numpy().copy()
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


def line(n, shift_m=0.0, t0=0.0):
    from pgtraj.core.trajectory import Trajectory

    lat = 39.9 + np.arange(n) * 1e-4 + shift_m / 111_195.0
    return Trajectory("l", t0 + np.arange(n, dtype=float), lat, np.full(n, 116.3))


def test_exact_trajectory_distances_by_hand():
    from pgtraj.learn.evaluation import dtw, edr, frechet

    a = line(20)
    assert dtw(a, a) == 0.0 and frechet(a, a) == 0.0 and edr(a, a) == 0.0
    b = line(20, shift_m=30.0)  # the same path moved 30 m along itself
    assert abs(frechet(a, b) - 30.0) < 0.5
    assert 60.0 - 1e-6 <= dtw(a, b) <= 20 * 30.0 + 1e-6  # both end pairs are 30 m apart; the diagonal costs 600
    assert edr(a, b, eps_m=50) == 0.0 and edr(a, line(20, shift_m=5000.0), eps_m=50) == 1.0
    assert frechet(a, line(20, shift_m=5000.0)) > frechet(a, b)


def test_twin_ranks_and_odd_even_split():
    from pgtraj.learn.evaluation import search_metrics, split_odd_even, twin_ranks

    d = np.array([[0.1, 0.5, 0.9], [0.2, 0.3, 0.1], [0.4, 0.4, 0.4]])
    ranks = twin_ranks(d)
    assert ranks.tolist() == [1, 3, 1]  # ties (row 3) do not count against the twin
    m = search_metrics(ranks)
    assert m["hr@1"] == 2 / 3 and abs(m["mean_rank"] - 5 / 3) < 1e-12
    q, t = split_odd_even(line(11))
    assert len(q) == 5 and len(t) == 6 and set(q.t) | set(t.t) == set(line(11).t)


def test_dtw_and_frechet_match_full_matrix_references():
    from pgtraj.core.trajectory import Trajectory
    from pgtraj.learn.evaluation import _pairwise_m, dtw, frechet

    rng = np.random.default_rng(3)
    for _ in range(5):
        n, m = rng.integers(2, 12, size=2)
        a = Trajectory("a", np.arange(n, dtype=float), 39.9 + rng.normal(0, 1e-3, n), 116.3 + rng.normal(0, 1e-3, n))
        b = Trajectory("b", np.arange(m, dtype=float), 39.9 + rng.normal(0, 1e-3, m), 116.3 + rng.normal(0, 1e-3, m))
        c = _pairwise_m(a, b)
        D = np.full((n + 1, m + 1), np.inf)
        D[0, 0] = 0
        F = np.full((n, m), np.inf)
        for i in range(n):
            for j in range(m):
                D[i + 1, j + 1] = c[i, j] + min(D[i, j], D[i, j + 1], D[i + 1, j])
                prev = [F[i - 1, j] if i else np.inf, F[i, j - 1] if j else np.inf, F[i - 1, j - 1] if i and j else np.inf]
                F[i, j] = c[i, j] if i == 0 and j == 0 else max(min(prev), c[i, j])
        assert abs(dtw(a, b) - D[n, m]) < 1e-6 and abs(frechet(a, b) - F[n - 1, m - 1]) < 1e-6


def test_perplexity_and_gap_recovery_run_and_are_sane():
    from pgtraj.learn.evaluation import gap_recovery, perplexity

    model = make_model().eval()
    xs = [TOK.encode(t) for t in TRIPS[:12]]
    ppl = perplexity(model, xs, max_len=64)
    assert 1.0 < ppl < 3 * TOK.vocab_size  # an untrained model is near uniform over the vocabulary
    rec = gap_recovery(model, TOK, xs, spans=(3, 6), max_len=64)
    assert rec["gaps"] > 0 and rec["hidden_cells"] >= 3 * rec["gaps"]
    # linear interpolation between seen neighbours on a grid path is within a few cells of the truth; an
    # untrained model's argmax lands anywhere in the 5 km grid, while its best path between the gap's ends
    # stays a contiguous path there, near the line
    assert rec["linear"]["median_m"] < 2000
    assert rec["linear"]["median_m"] < rec["argmax"]["mean_m"] < 10_000
    assert rec["path"]["mean_m"] < rec["argmax"]["mean_m"] and rec["expected"]["mean_m"] < rec["argmax"]["mean_m"]
    for m in ("expected", "path", "argmax", "linear"):  # the fixes are within a cell of their cell's centre
        assert abs(rec[m]["fixes_mean_m"] - rec[m]["mean_m"]) < 200 and 0 <= rec[m]["exact_cell"] <= 1


def test_best_path_is_contiguous_and_follows_the_model():
    """core.gaps.best_path: a path of exactly the gap's moves from one end to the other; where the model puts
    its mass on a detour, the path takes it; with no belief, it keeps to the line."""
    import h3.api.numpy_int as h3i

    from pgtraj.core.gaps import best_path

    a = h3i.latlng_to_cell(39.9, 116.4, 9)
    ring = h3i.grid_ring(a, 3)
    b = int(ring[0])
    tok = Tokenizer(vocab=np.sort(h3i.grid_disk(a, 6).astype(np.uint64)))
    flat = np.zeros((4, tok.vocab_size))
    path = best_path(a, b, 5, tok.lookup, flat, sigma_m=None)  # 5 moves for a distance of 3: room for one detour
    steps = [a, *map(int, path), b]
    assert len(path) == 4 and all(h3i.are_neighbor_cells(u, v) for u, v in zip(steps, steps[1:]))
    # the model believes in a cell 2 moves off the a-b line at position 2: the path goes through it
    off = [int(c) for c in h3i.grid_ring(a, 2) if h3i.grid_distance(int(c), b) == 3][0]
    belief = np.full((4, tok.vocab_size), -20.0)
    belief[1, tok.lookup(np.array([off], np.uint64))[0]] = 0.0
    assert int(best_path(a, b, 5, tok.lookup, belief, sigma_m=None)[1]) == off
    kept = best_path(a, b, 5, tok.lookup, flat, sigma_m=50.0)  # held to the straight line
    assert int(kept[0]) == int(h3i.grid_path_cells(a, b)[1])
    assert best_path(a, b, 2, tok.lookup, flat[:1]) is None  # too far for 2 moves


def test_path_posterior_is_every_path_weighed_as_best_path_weighs_it():
    """Forward-backward against brute force: each position's probabilities are the share of the weight
    (exp of the summed scores: the model's log-probability and the pull to the line) of every contiguous
    path a -> b through that cell; the expected place is their weighted centre, and its probability that of
    the cell it lies in."""
    import itertools

    import h3.api.numpy_int as h3i

    from pgtraj.core.gaps import best_path, expected_positions, path_posterior
    from pgtraj.core.trajectory import haversine_m

    a = h3i.latlng_to_cell(39.9, 116.4, 9)
    b = int([c for c in h3i.grid_ring(a, 2)][3])
    steps, sigma = 4, 200.0
    tok = Tokenizer(vocab=np.sort(h3i.grid_disk(a, 6).astype(np.uint64)))
    logp = np.log(np.random.default_rng(0).dirichlet(np.full(tok.vocab_size, 0.3), steps - 1))
    ends = np.array([h3i.cell_to_latlng(a), h3i.cell_to_latlng(b)])

    def score(j: int, c: int) -> float:
        here, line = h3i.cell_to_latlng(c), ends[0] + (j + 1) / steps * (ends[1] - ends[0])
        return logp[j, tok.lookup(np.array([c], np.uint64))[0]] - 0.5 * (haversine_m(*here, *line) / sigma) ** 2

    disk = [int(c) for c in h3i.grid_disk(a, steps)]
    weight: dict[tuple, float] = {}
    for path in itertools.product(disk, repeat=steps - 1):
        chain = [a, *path, b]
        if all(h3i.are_neighbor_cells(u, v) for u, v in zip(chain, chain[1:])):
            weight[path] = np.exp(sum(score(j, c) for j, c in enumerate(path)))
    total = sum(weight.values())
    post = path_posterior(a, b, steps, tok.lookup, logp, sigma_m=sigma)
    assert len(post) == steps - 1 and len(weight) > 5
    for j, (cells, probs) in enumerate(post):
        want = {int(c): sum(w for p, w in weight.items() if p[j] == int(c)) / total for c in cells}
        assert np.allclose(probs, [want[int(c)] for c in cells], atol=1e-9) and abs(probs.sum() - 1) < 1e-9
    best = max(weight, key=weight.get)
    assert [int(c) for c in best_path(a, b, steps, tok.lookup, logp, sigma_m=sigma)] == list(best)
    points, probs = expected_positions(a, b, steps, tok.lookup, logp, sigma_m=sigma)
    for (cells, w), point, prob in zip(post, points, probs):
        centres = np.array([h3i.cell_to_latlng(int(c)) for c in cells])
        assert np.allclose(point, w @ centres, atol=1e-12)
        assert abs(prob - w[cells == np.uint64(h3i.latlng_to_cell(*point, 9))].sum()) < 1e-12
    # a model sure of one path: its cells' centres, with probability ~1
    sure = np.full_like(logp, -30.0)
    for j, c in enumerate(best):
        sure[j, tok.lookup(np.array([c], np.uint64))[0]] = 0.0
    points, probs = expected_positions(a, b, steps, tok.lookup, sure, sigma_m=sigma)
    assert np.allclose(points, [h3i.cell_to_latlng(c) for c in best], atol=1e-9) and np.all(probs > 0.999)
    far = int(h3i.grid_ring(a, 3)[0])
    assert expected_positions(a, far, 2, tok.lookup, logp[:1]) is None  # too far for 2 moves


def test_step_cases_judge_real_next_cells_in_the_users_terms():
    """Cases end at observed fixes; the truth is the next cell at full resolution; a grid step's truth is in
    the frame, in the slot its move names; ranks and top-1 follow the scores, and naming nothing is no hit."""
    from pgtraj.core.tokenizer import JUMP
    from pgtraj.learn.evaluation import StepCases, frame_top1, step_metrics, straight_on_scores

    xs = [TOK.encode(t) for t in TRIPS[:10]]
    cases = StepCases.of(xs, max_len=64)
    assert len(cases) > 50
    for n in range(0, len(cases), 7):
        x, i = xs[cases.traj[n]], cases.index[n]
        assert i >= 1 and not x.interpolated[i] and cases.truth[n] == x.cells[i + 1] and cases.current[n] == x.cells[i]
        if x.move[i + 1] < JUMP:
            assert cases.frames[n][x.move[i + 1]] == cases.truth[n]
    so = straight_on_scores(cases)
    ranks = cases.frame_ranks(so)
    slot = np.array([xs[k].move[i + 1] for k, i in zip(cases.traj, cases.index)])
    order = np.argsort(-so, axis=1, kind="stable")  # straight on, then the others by angle
    grid = slot < JUMP
    assert np.all(ranks[grid] == 1 + np.argmax(order[grid] == slot[grid, None], axis=1))
    assert np.all(np.isinf(ranks[~grid]))  # a jump is no neighbour: never found
    assert step_metrics(ranks)["acc@1"] == np.mean(slot == 0)
    nothing = np.full_like(so, -np.inf)
    assert np.all(frame_top1(cases, nothing) == 0) and np.all(np.isinf(cases.frame_ranks(nothing)))


def test_cell_markov_learns_routes_the_grid_cannot_guess():
    """Fit and judged on the same trips, a second-order chain over true cells knows each next cell far
    better than going straight on (Manhattan routes turn); backing off to straight on never hurts Acc@5."""
    from pgtraj.learn.evaluation import CellMarkov, StepCases, step_metrics, straight_on_scores

    xs = [TOK.encode(t) for t in TRIPS[:30]]
    cases = StepCases.of(xs, max_len=64)
    so = step_metrics(cases.frame_ranks(straight_on_scores(cases)))
    plain = step_metrics(CellMarkov(2, backoff=False).fit(xs).ranks(cases, xs)[0])
    backed = step_metrics(CellMarkov(2, backoff=True).fit(xs).ranks(cases, xs)[0])
    assert plain["acc@1"] > so["acc@1"] and backed["acc@5"] >= plain["acc@5"]
