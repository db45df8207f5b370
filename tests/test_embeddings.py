"""Embeddings: collaborative + content; a title nobody watched lands among its genre."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from models.data import load_catalog, load_events
from models.embeddings import ModelParams, learn_embeddings


def test_content_only_title_lands_near_titles_of_its_genre(demo_files, tmp_path):
    catalog_frame = pd.read_csv(demo_files["catalog"], dtype=str, keep_default_na=False)
    genre_counts = Counter(g for text in catalog_frame["genres"] for g in text.split("|") if g)
    genre = genre_counts.most_common(3)[-1][0]  # a common genre, but not the most common
    template = catalog_frame[catalog_frame["genres"] == genre].iloc[0].to_dict()
    new_titles = []
    for n in range(3):
        new_titles.append({**template, "item_id": f"new-{n}", "title": f"Brand New Show {n}"})
    path = tmp_path / "catalog.csv"
    pd.concat([catalog_frame, pd.DataFrame(new_titles)]).to_csv(path, index=False)

    catalog, _ = load_catalog(path)
    events, _ = load_events(demo_files["events"], catalog)
    embeddings = learn_embeddings(events, catalog, ModelParams(), show_progress=False)
    unit = embeddings.vectors / np.linalg.norm(embeddings.vectors, axis=1, keepdims=True)
    genres = catalog.items["genres"].tolist()
    base_rate = np.mean([genre in g for g in genres[: -len(new_titles)]])
    for n in range(len(new_titles)):
        row = catalog.index[f"new-{n}"]
        assert embeddings.viewers[row] == 0
        sims = unit @ unit[row]
        sims[len(catalog) - len(new_titles) :] = -np.inf  # only compare with existing titles
        nearest = np.argsort(-sims)[:10]
        share = np.mean([genre in genres[i] for i in nearest])
        assert share >= 0.7, (genre, share, base_rate)
        assert share > 2 * base_rate


def test_watch_time_and_recency_shape_confidence(tiny_catalog, tmp_path):
    from models.embeddings import event_weights

    catalog, _ = load_catalog(tiny_catalog)
    path = tmp_path / "events.csv"
    day = 86400
    path.write_text(
        "user_id,item_id,timestamp,watch_seconds\n"
        f"u1,a,{1700000000 + 100 * day},1800\n"  # full 30-minute episode, newest
        f"u1,a,{1700000000 + 100 * day},180\n"  # abandoned after 3 minutes
        f"u1,b,{1700000000},2700\n"  # full, 100 days older
        f"u1,c,{1700000000 + 100 * day},\n"  # unknown watch time counts as full
    )
    events, _ = load_events(path, catalog)
    weights = event_weights(events, catalog, ModelParams(recency_half_life_days=50, recency_floor=0.0))
    row = {title: n for n, title in enumerate(catalog.items["item_id"])}
    # The loader orders events by user and time, so look each viewing up by title and watch time.
    weight = {(int(i), float(w)): x for i, w, x in zip(events.item, np.nan_to_num(events.watch_seconds, nan=-1), weights)}
    assert weight[row["a"], 1800.0] == 1.0 and abs(weight[row["a"], 180.0] - 0.1) < 1e-6
    assert abs(weight[row["b"], 2700.0] - 0.25) < 1e-6
    assert weight[row["c"], -1.0] == 1.0


def test_cold_titles_can_be_given_a_typical_length(demo_files, tmp_path):
    catalog_frame = pd.read_csv(demo_files["catalog"], dtype=str, keep_default_na=False)
    new = {**catalog_frame.iloc[0].to_dict(), "item_id": "new-show", "title": "Brand New Show"}
    path = tmp_path / "catalog.csv"
    pd.concat([catalog_frame, pd.DataFrame([new])]).to_csv(path, index=False)
    catalog, _ = load_catalog(path)
    events, _ = load_events(demo_files["events"], catalog)
    row = catalog.index["new-show"]
    plain = learn_embeddings(events, catalog, ModelParams(content_steps=50), show_progress=False)
    scaled = learn_embeddings(events, catalog, ModelParams(content_steps=50, cold_norm_quantile=0.5), show_progress=False)
    warm_median = np.median(np.linalg.norm(scaled.cf_vectors[scaled.viewers > 0], axis=1))
    assert np.linalg.norm(scaled.vectors[row]) == pytest.approx(warm_median, rel=1e-4)
    cosine = plain.vectors[row] @ scaled.vectors[row] / np.linalg.norm(plain.vectors[row]) / np.linalg.norm(scaled.vectors[row])
    assert cosine == pytest.approx(1.0, abs=1e-5)  # same direction, only longer
    assert np.array_equal(plain.vectors[scaled.viewers > 0], scaled.vectors[scaled.viewers > 0])


@pytest.mark.parametrize(
    "change, reused, relearned",
    [
        ({"seq_weight": 0.9, "content_shrink": 3.0}, ("confidence", "cf_vectors", "content_vectors", "sequence"), ()),
        ({"regularization": 5.0}, ("confidence", "sequence"), ("cf_vectors", "content_vectors")),
        ({"alpha": 1.0}, ("sequence",), ("confidence", "cf_vectors", "content_vectors")),
        ({"seq_neighbors": 3}, ("confidence", "cf_vectors", "content_vectors"), ("sequence",)),
    ],
)
def test_reuse_takes_only_unchanged_stages_and_matches_a_fresh_fit(demo_files, change, reused, relearned):
    from dataclasses import replace

    catalog, _ = load_catalog(demo_files["catalog"])
    events, _ = load_events(demo_files["events"], catalog)
    base = ModelParams(content_steps=30, iterations=5)
    first = learn_embeddings(events, catalog, base, show_progress=False)
    params = replace(base, **change)
    again = learn_embeddings(events, catalog, params, show_progress=False, reuse=first)
    fresh = learn_embeddings(events, catalog, params, show_progress=False)
    for name in reused:
        assert getattr(again, name) is getattr(first, name), name
    for name in relearned:
        assert getattr(again, name) is not getattr(first, name), name
    for name in ("cf_vectors", "content_vectors", "vectors"):
        np.testing.assert_allclose(getattr(again, name), getattr(fresh, name), rtol=1e-4, atol=1e-5, err_msg=name)
    assert (again.sequence != fresh.sequence).nnz == 0 and (again.confidence != fresh.confidence).nnz == 0
    assert again.params == params


def test_regularization_chosen_on_a_user_sample_scales_with_the_square_root_of_users():
    from models.data import Events

    events = Events(
        user_ids=np.array([f"u{i}" for i in range(500)], dtype=object),
        user=np.repeat(np.arange(400), 2).astype(np.int32),  # 400 users with events, 100 without
        item=np.tile([0, 1], 400).astype(np.int32),
        timestamp=np.arange(800, dtype=np.int64),
        watch_seconds=np.full(800, np.nan, np.float32),
    )
    chosen = ModelParams(regularization=10.0, regularization_users=100)
    fitted = chosen.at_scale(events)
    assert fitted.regularization == pytest.approx(20.0) and fitted.regularization_users == 0
    assert fitted.at_scale(events) is fitted  # absolute already: unchanged
    assert ModelParams(regularization=7.0).at_scale(events).regularization == 7.0


def test_the_content_models_viewer_sample_is_bounded_and_stands_for_every_viewer(demo_files, monkeypatch):
    """About CONTENT_VIEWERS viewers per title, CONTENT_PAIRS in all; each sampled pair weighs for the unsampled."""
    from dataclasses import replace

    import models.embeddings as embeddings_module

    catalog, _ = load_catalog(demo_files["catalog"])
    events, _ = load_events(demo_files["events"], catalog)
    params = ModelParams(iterations=3, content_steps=20, content_objective="als")
    assert learn_embeddings(events, catalog, replace(params, content_objective="regression"), show_progress=False).viewer_sample is None
    base = learn_embeddings(events, catalog, params, show_progress=False)
    sample = base.viewer_sample
    counts = np.bincount(sample.item, minlength=len(catalog))
    viewers = base.viewers
    assert np.all(np.diff(sample.item) >= 0) and sample.factors.shape == (len(sample.item), params.factors)
    np.testing.assert_allclose((counts * sample.scale)[counts > 0], viewers[counts > 0], rtol=1e-5)
    few = (viewers > 0) & (viewers <= embeddings_module.CONTENT_VIEWERS)
    np.testing.assert_array_equal(counts[few], viewers[few])  # titles with few viewers keep all of them
    many = viewers > 4 * embeddings_module.CONTENT_VIEWERS
    if many.any():
        assert counts[many].mean() < 1.5 * embeddings_module.CONTENT_VIEWERS
    # A tight pair budget lowers every title's share, so memory is bounded by the budget, not the events.
    monkeypatch.setattr(embeddings_module, "CONTENT_PAIRS", 2000)
    tight = learn_embeddings(events, catalog, params, show_progress=False).viewer_sample
    assert len(tight.item) < 1.2 * 2000 < len(sample.item)

    # The opt-in objective fits on the sample; an unknown one is refused by name.
    from models.embeddings import content_vectors

    als = content_vectors(catalog, base.cf_vectors, viewers, params, sample)
    assert np.isfinite(als).all() and np.abs(als).sum(axis=1).min() > 0
    with pytest.raises(ValueError, match="content_objective must be one of regression, als"):
        content_vectors(catalog, base.cf_vectors, viewers, replace(params, content_objective="exact"), sample)


@pytest.mark.parametrize("content_model,objective", [("linear", "als"), ("mlp", "regression")])
def test_the_content_model_fits_on_one_torch_thread_and_gives_the_rest_of_the_job_its_threads(
    demo_files, monkeypatch, content_model, objective
):
    """The content model trains on one torch thread; afterwards torch has its threads back, so later work in
    the same process (the nearest-title table) is not left on one core (it was, for the rest of the job)."""
    import torch

    import models.embeddings as embeddings_module

    catalog, _ = load_catalog(demo_files["catalog"])
    events, _ = load_events(demo_files["events"], catalog)
    params = ModelParams(iterations=2, content_steps=5, content_model=content_model, content_objective=objective)
    during = []
    fit = embeddings_module.fit_to_als_loss if objective == "als" else embeddings_module.fit_content_model

    def spy(*args, **kwargs):
        during.append(torch.get_num_threads())
        return fit(*args, **kwargs)

    monkeypatch.setattr(embeddings_module, fit.__name__, spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        learn_embeddings(events, catalog, params, show_progress=False)
        assert during == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_the_content_models_adam_takes_torch_optims_steps(weight_decay):
    """models.embeddings.Adam (no torch._dynamo import) moves a network exactly as torch.optim.Adam does."""
    import torch

    from models.embeddings import Adam

    def trained(make_optimizer):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        optimizer = make_optimizer(net.parameters())
        x, y = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), torch.randn(32, 3)
        for _ in range(25):
            optimizer.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            optimizer.step()
        return [p.detach().clone() for p in net.parameters()]

    ours = trained(lambda p: Adam(p, lr=1e-2, weight_decay=weight_decay))
    theirs = trained(lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=weight_decay, foreach=False))
    moved = trained(lambda p: Adam(p, lr=0.0))
    for a, b, still in zip(ours, theirs, moved):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, still)
