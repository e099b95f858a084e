"""Downstream evaluation and baselines: metrics against hand-computed cases, baselines learning what they
should on synthetic trips, the model-side scorers matching the model's own forward passes."""

from __future__ import annotations

import numpy as np
import torch

from pgtraj.learn.downstream import (
    CellNaiveBayes,
    DestinationBaseline,
    RouteRegression,
    SoftmaxRegression,
    classification_metrics,
    destination_eval,
    elapsed_s,
    model_class_scores,
    model_destination_scores,
    model_travel_time_s,
    prefix_length,
    speed_features,
    travel_time_metrics,
)

from .test_model import TOK, TRIPS, make_model

ENC = [TOK.encode(t) for t in TRIPS]


def test_classification_metrics_by_hand():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]])
    y = np.array([0, 1, 1, 0])
    m = classification_metrics(scores, y)
    assert m["acc@1"] == 0.5 and m["n"] == 4
    # class 0: predicted {0, 2}, true {0, 3} -> P = R = 1/2; class 1: predicted {1}, true {1, 2} -> P 1, R 1/2
    assert np.isclose(m["macro_f1"], (0.5 + 2 / 3) / 2)


def test_prefix_never_shows_the_destination():
    assert prefix_length(2, 0.9) == 1 and prefix_length(10, 0.5) == 5 and prefix_length(10, 0.01) == 1


def test_destination_baseline_finds_a_repeated_trip():
    seqs = [x.tokens for x in ENC]
    base = DestinationBaseline().fit(seqs)
    m = destination_eval(lambda ps: np.stack([base.scores(p.tokens, TOK.vocab_size) for p in ps]), TOK, ENC[:20], 0.75)
    assert m["acc@1"] > 0.3 and m["median_error_m"] is not None  # trips seen in training: often recalled
    rnd = destination_eval(lambda ps: np.random.default_rng(0).random((len(ps), TOK.vocab_size)), TOK, ENC[:20], 0.75)
    assert rnd["mrr"] < m["mrr"] and rnd["median_error_m"] > m["median_error_m"]


def test_naive_bayes_links_trips_to_their_area():
    # two "users": one drives in the west half of the grid, one in the east
    west = np.array([TRIPS[i].lon.mean() < np.median([t.lon.mean() for t in TRIPS]) for i in range(len(TRIPS))])
    y = west.astype(int)
    nb = CellNaiveBayes().fit([x.tokens for x in ENC[:60]], y[:60], 2, TOK.vocab_size)
    acc = classification_metrics(nb.scores([x.tokens for x in ENC[60:]]), y[60:])["acc@1"]
    majority = max(np.mean(y[60:]), 1 - np.mean(y[60:]))
    assert acc >= majority + 0.15, (acc, majority)  # trips that cross the middle stay ambiguous


def test_softmax_regression_separates_speeds():
    # label: the trip's overall speed (path length over duration) above the median
    speed = np.array([np.sum(np.hypot(np.diff(t.lat), np.diff(t.lon))) / (t.t[-1] - t.t[0]) for t in TRIPS])
    y = (speed > np.median(speed)).astype(int)
    X = np.stack([speed_features(t) for t in TRIPS])
    sr = SoftmaxRegression().fit(X[:60], y[:60], 2)
    assert classification_metrics(sr.scores(X[60:]), y[60:])["acc@1"] > 0.75


def test_route_regression_beats_a_constant():
    reg = RouteRegression().fit(ENC[:60])
    true = np.array([elapsed_s(x) for x in ENC[60:]])
    assert travel_time_metrics(reg.predict_s(ENC[60:]), true)["mae_s"] < \
        travel_time_metrics(np.full(len(true), np.median(true)), true)["mae_s"]


def test_model_scorers_match_the_forward_passes():
    from pgtraj.core.features import collate, to_inputs
    from pgtraj.learn.batches import to_tensors

    m = make_model(n_classes=3).eval()
    x = ENC[:5]
    b = to_tensors(collate([to_inputs(e) for e in x]))
    with torch.no_grad():
        cls = m.classify(**b).numpy()
        tte = torch.expm1(m.travel_time(**b)).numpy()
        dest = m.destination_logits(**b)
    assert np.allclose(model_class_scores(m, x, batch_size=2), cls, atol=1e-5)
    assert np.allclose(model_travel_time_s(m, x, batch_size=2), tte, rtol=1e-4)
    last = (b["tokens"] != 0).sum(1) - 1
    got = model_destination_scores(m, x, batch_size=2)
    want = dest[torch.arange(5), last].numpy()
    assert np.allclose(got[:, 5:], want[:, 5:], atol=1e-5) and np.isneginf(got[:, :5]).all()
