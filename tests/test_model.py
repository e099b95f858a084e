"""The backbone and its objectives on small synthetic data (CPU, seconds). No expected model outputs are
hard-coded: the tests check invariances the architecture must have and that each objective learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgtraj.core.errors import ConfigError
from pgtraj.core.features import collate, to_inputs
from pgtraj.core.synthetic import grid_trips
from pgtraj.core.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerConfig
from pgtraj.learn.batches import Batches, to_tensors, twin_views
from pgtraj.learn.model import ModelConfig, TrajectoryModel
from pgtraj.learn.tasks import OBJECTIVES, batch_for
from pgtraj.learn.tasks.masked_spans import MaskedSpans

TRIPS = grid_trips(80, seed=2)
TOK = Tokenizer.fit(TRIPS, TokenizerConfig(resolution=9, min_count=2, coarsest_resolution=6))


def make_model(seed=0, **over) -> TrajectoryModel:
    torch.manual_seed(seed)
    return TrajectoryModel.for_tokenizer(TOK, {**ModelConfig.preset("tiny"), "dropout": 0.0, **over})


def batch(trips, **kw):
    return to_tensors(collate([to_inputs(TOK.encode(t)) for t in trips], **kw))


def test_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="n_layer"):
        ModelConfig.from_dict({"vocab_size": 10, "n_layer": 3})
    assert ModelConfig.from_dict(ModelConfig(vocab_size=10).to_dict()) == ModelConfig(vocab_size=10)


def test_padding_does_not_change_the_embedding():
    m = make_model().eval()
    short, long_ = TRIPS[0], max(TRIPS, key=len)
    with torch.no_grad():
        alone = m.embed(**batch([short]))
        padded = m.embed(**batch([short, long_]))[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_causal_prefix_is_independent_of_the_future():
    m = make_model().eval()
    b = batch([TRIPS[3]])
    k = 10
    prefix = {key: v[:, :k] for key, v in b.items()}
    with torch.no_grad():
        full = m.next_step(**b)
        part = m.next_step(**prefix)
    for f, p in zip(full, part):  # hidden states, move logits, time
        assert torch.allclose(f[:, :k], p, atol=1e-5)


def test_ancestors_feed_the_embedding():
    m = make_model()
    A = m.backbone.ancestors
    tok = int(next(t for t in range(len(SPECIAL_TOKENS), TOK.vocab_size) if A[t].any()))
    b = batch([TRIPS[0]])
    b["tokens"][0, 1] = tok
    with torch.no_grad():
        before = m.backbone(**b)
        m.backbone.anc.weight[A[tok][A[tok] > 0]] += 1.0
        after = m.backbone(**b)
    assert not torch.allclose(before[0, 1], after[0, 1])


def test_span_masks():
    tokens = batch(TRIPS[:16])["tokens"]
    masked = MaskedSpans(make_model()).mask(tokens, torch.Generator().manual_seed(0))
    assert not masked[tokens < len(SPECIAL_TOKENS)].any()  # never PAD/BOS/...
    ratio = masked.sum().item() / (tokens >= len(SPECIAL_TOKENS)).sum().item()
    assert 0.12 <= ratio <= 0.35
    runs = [len(r) for row in masked.int().tolist() for r in "".join(map(str, row)).split("0") if r]
    assert np.mean(runs) > 1.5  # spans, not isolated cells


def test_twin_views_split_one_trip_between_them():
    rng = np.random.default_rng(0)
    tr = TRIPS[5]
    a, b = twin_views(tr, rng)
    for v in (a, b):
        assert 2 <= len(v) < len(tr) and v.t[0] >= tr.t[0] and v.t[-1] <= tr.t[-1]
        assert np.all(np.diff(v.t) > 0)
    assert not set(a.t) & set(b.t)  # no fix in both
    span = tr.t[-1] - tr.t[0]
    assert min(a.t[-1], b.t[-1]) - max(a.t[0], b.t[0]) > 0.7 * span  # the same stretch, nearly whole


def test_contrastive_views_hide_cells_of_a_pair_together():
    data = Batches(TRIPS, TOK, batch_size=16, max_len=32, seed=0, hide_cells=0.5)
    a, b = data.views()
    assert torch.equal(a["cells_hidden"], b["cells_hidden"]) and 0 < a["cells_hidden"].sum() < 16
    assert a["tokens"].shape[1] <= 32


def test_hard_negatives_are_stretches_from_one_area_that_end_near_each_other():
    from pgtraj.core.tokenizer import cell_latlng, cell_parents
    from pgtraj.core.trajectory import haversine_m
    from pgtraj.learn.batches import AREA_RESOLUTION, HARD_GROUP

    data = Batches(TRIPS, TOK, batch_size=16, max_len=32, seed=0, hard_negatives=1.0)
    a, b = data.views()
    assert a["tokens"].shape[0] == b["tokens"].shape[0] == 16
    groups = [data._neighbours(data._pick(int(i))) for i in range(len(TRIPS))]
    assert max(map(len, groups)) == HARD_GROUP  # grid_trips cross each other: most areas hold several
    end_gap, random_gap = [], []
    for group in groups:
        (i, s, n), rest = group[0], group[1:]
        assert len({j for j, _, _ in group}) == len(group)  # never a stretch of the anchor's own trip
        start = cell_parents(data._cells[i][s:s + 1], AREA_RESOLUTION)[0]
        here = cell_latlng(data._cells[i][s + n - 1:s + n])[0]
        for j, p, m in rest:
            assert cell_parents(data._cells[j][p:p + 1], AREA_RESOLUTION)[0] == start and 2 <= m <= n
            there = cell_latlng(data._cells[j][p + m - 1:p + m])[0]
            end_gap.append(haversine_m(*here, *there))
        for j, p, m in (data._pick(int(k)) for k in data.rng.integers(0, len(TRIPS), len(rest))):
            there = cell_latlng(data._cells[j][p + m - 1:p + m])[0]
            random_gap.append(haversine_m(*here, *there))
    assert np.median(end_gap) < 0.5 * np.median(random_gap)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_learns(name):
    torch.manual_seed(0)
    cls = OBJECTIVES[name]
    # a label the route decides: does the trip end north of where it started
    labels = [int(t.lat[-1] > t.lat[0]) for t in TRIPS] if cls.needs_labels else None
    model = make_model(n_classes=2 if labels else 0)
    objective = cls(model)
    data = Batches(TRIPS, TOK, batch_size=16, max_len=64, seed=0, labels=labels, tail=cls.tail_windows)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    fixed = batch_for(objective, data)  # one batch, evaluated before and after training on others

    def evaluate():
        model.eval()
        torch.manual_seed(123)  # same masks / dropout draws for both evaluations
        with torch.no_grad():
            loss, _ = objective.loss(fixed)
        model.train()
        return loss.item()

    before = evaluate()
    for _ in range(120):
        loss, metrics = objective.loss(batch_for(objective, data))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert np.isfinite(loss.item())
    after = evaluate()
    assert after < 0.85 * before, (name, before, after, metrics)
