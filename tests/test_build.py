"""The job's fast batch paths against plain reference implementations written for the test.

The job ranks every user at once (vectorised, affine z-scores, sparse watched-next
term), builds "watched next" with one sparse sum, and orders histories by a scatter;
each must give what the obvious per-user loop gives.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from models.build import candidate_reasons, nearest_titles, open_parts, precompute_candidates, recent_histories
from models.data import Events, load_catalog, load_events
from models.embeddings import ModelParams, confidence_matrix, prune_rows, sequence_neighbors
from models.recommender import top_k


def random_events(seed: int, n_users: int = 40, n_items: int = 30, n_events: int = 900) -> Events:
    rng = np.random.default_rng(seed)
    return Events(
        user_ids=np.array([f"u{i}" for i in range(n_users)], dtype=object),
        user=rng.integers(0, n_users, n_events).astype(np.int32),
        item=rng.integers(0, n_items, n_events).astype(np.int32),
        timestamp=rng.integers(1_600_000_000, 1_600_000_050, n_events).astype(np.int64),  # many ties
        watch_seconds=np.full(n_events, np.nan, np.float32),
    )


def test_in_time_order_sorts_by_user_time_title_and_keeps_sorted_input():
    events = random_events(0)
    ordered = events.in_time_order()
    keys = list(zip(ordered.user.tolist(), ordered.timestamp.tolist(), ordered.item.tolist()))
    assert keys == sorted(zip(events.user.tolist(), events.timestamp.tolist(), events.item.tolist()))
    assert ordered.in_time_order() is ordered  # already ordered: no copy


def test_loader_returns_events_in_time_order(demo_files):
    catalog, _ = load_catalog(demo_files["catalog"])
    events, _ = load_events(demo_files["events"], catalog)
    assert events.in_time_order() is events


def reference_sequence(events: Events, n_items: int, params: ModelParams) -> dict[tuple[int, int], float]:
    """The definition, one user at a time."""
    by_user = defaultdict(list)
    for u, _time, i in sorted(zip(events.user.tolist(), events.timestamp.tolist(), events.item.tolist())):
        by_user[u].append(i)
    viewers = np.zeros(n_items)
    strength: dict[tuple[int, int], float] = defaultdict(float)
    for titles in by_user.values():
        for i in set(titles):
            viewers[i] += 1
        collapsed = [t for n, t in enumerate(titles) if n == 0 or t != titles[n - 1]]
        for a in range(len(collapsed)):
            for d in range(1, params.seq_window + 1):
                if a + d < len(collapsed) and collapsed[a] != collapsed[a + d]:
                    w = math.exp(-(d - 1) / params.seq_tau)
                    strength[collapsed[a], collapsed[a + d]] += w
                    strength[collapsed[a + d], collapsed[a]] += w
    return {
        (i, j): w / ((viewers[i] + 1) * (viewers[j] + 1)) ** params.seq_pop_exponent for (i, j), w in strength.items()
    }


@pytest.mark.parametrize("keep", [1000, 4])
def test_sequence_neighbors_matches_the_definition(keep):
    events = random_events(1)
    params = ModelParams(seq_neighbors=keep)
    expected = reference_sequence(events, 30, params)
    matrix = sequence_neighbors(events, 30, params)
    for row in range(30):
        got = dict(zip(matrix.indices[matrix.indptr[row] : matrix.indptr[row + 1]].tolist(),
                       matrix.data[matrix.indptr[row] : matrix.indptr[row + 1]].tolist()))  # fmt: skip
        want = {j: w for (i, j), w in expected.items() if i == row}
        assert len(got) == min(keep, len(want))
        for j, w in got.items():
            assert w == pytest.approx(want[j], rel=1e-5)
        if want:  # the kept ones are the strongest
            assert min(got.values()) >= sorted(want.values(), reverse=True)[len(got) - 1] - 1e-6


def test_prune_rows_keeps_the_largest_per_row_in_column_order():
    import scipy.sparse as sp

    dense = np.array([[0, 5, 1, 3, 0], [2, 0, 0, 0, 0], [9, 8, 7, 6, 5]], dtype=np.float32)
    pruned = prune_rows(sp.csr_matrix(dense), 2)
    assert pruned.toarray().tolist() == [[0, 5, 0, 3, 0], [2, 0, 0, 0, 0], [9, 8, 0, 0, 0]]
    assert pruned.has_sorted_indices


@pytest.mark.parametrize("cap", [1000, 3])
def test_recent_histories_newest_first_distinct_capped(cap):
    events = random_events(2)
    catalog_items = 30

    class _Catalog:  # confidence_matrix needs only the episode lengths
        import pandas as pd

        items = pd.DataFrame({"episode_minutes": np.full(catalog_items, np.nan)})

        def __len__(self):
            return catalog_items

    confidence = confidence_matrix(events, _Catalog(), ModelParams())
    indptr, items, weights = recent_histories(events, confidence, cap)
    last_seen: dict[int, dict[int, int]] = defaultdict(dict)
    for u, t, i in zip(events.user.tolist(), events.timestamp.tolist(), events.item.tolist()):
        last_seen[u][i] = max(t, last_seen[u].get(i, t))
    for user in range(len(events.user_ids)):
        got = items[indptr[user] : indptr[user + 1]].tolist()
        want = sorted(last_seen[user], key=lambda i: -last_seen[user][i])
        assert len(got) == min(cap, len(want)) and len(set(got)) == len(got)
        assert [last_seen[user][i] for i in got] == [last_seen[user][i] for i in want[: len(got)]]
        assert weights[indptr[user] : indptr[user + 1]].tolist() == pytest.approx(
            [confidence[user, i] for i in got], rel=1e-6
        )


def test_batched_user_step_is_the_one_user_solve(trained_demo, tmp_path: Path):
    """Short histories in a batch go through Woodbury; each must equal the direct solve of that user alone."""
    recommender = open_parts(trained_demo.parts, {"params": trained_demo.meta["params"]}, tmp_path)
    rng = np.random.default_rng(1)
    width = recommender.dim // 2  # short: the Woodbury form
    items = np.full((30, width), -1, dtype=np.int64)
    weights = np.zeros((30, width), dtype=np.float32)
    for row in range(30):
        length = int(rng.integers(1, width + 1))  # padded to the batch's width, as the job pads
        items[row, :length] = rng.choice(recommender.n_items, length, replace=False)
        weights[row, :length] = 1.0 + rng.exponential(3.0, length)
    weights[0, 0] = 1.0  # confidence exactly 1 (alpha 0): no extra weight, still valid
    batched = recommender.user_vectors(items, weights)
    for row in range(30):
        keep = items[row] >= 0
        alone = recommender.user_vector(items[row, keep], weights[row, keep])  # a request's h x h form
        direct = recommender._solve_direct(*recommender._history_terms(items[None, row, keep], weights[None, row, keep]))[0]
        np.testing.assert_allclose(batched[row], alone, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(alone, direct, rtol=1e-4, atol=1e-6)
    # A confidence below 1 (not what the job writes, but accepted) takes the direct path and agrees too.
    weights[1, 0] = 0.5
    keep = items[1] >= 0
    np.testing.assert_allclose(
        recommender.user_vectors(items, weights)[1],
        recommender.user_vector(items[1, keep], weights[1, keep]), rtol=1e-4, atol=1e-6,
    )
    recommender.close()


@pytest.mark.parametrize("two_passes", [False, True])
def test_precomputed_candidates_are_the_exact_served_ranking(trained_demo, tmp_path: Path, monkeypatch, two_passes):
    """Batch top-k == scoring every title one user at a time with Recommender.blended_scores,
    in one pass or (as on large catalogues) first over the titles with the longest vectors."""
    import models.build

    monkeypatch.setattr(models.build, "FIRST_PASS_MIN_TITLES", 0 if two_passes else 10**9)
    recommender = open_parts(trained_demo.parts, {"params": trained_demo.meta["params"]}, tmp_path)
    assert recommender.seq_weight > 0
    n_users = len(recommender.user_ids)
    users = np.random.default_rng(0).choice(n_users, 25, replace=False)
    indptr, hist = recommender.hist_indptr, recommender.hist_items
    import scipy.sparse as sp

    rows = np.repeat(np.arange(n_users), np.diff(indptr))
    seen = sp.csr_matrix((np.ones(len(hist)), (rows, hist)), shape=(n_users, recommender.n_items))
    candidates, scores = precompute_candidates(recommender, seen, users, 20, show_progress=False)
    assert precompute_candidates(recommender, seen, users, 0, show_progress=False)[0].shape == (25, 0)
    everything = np.arange(recommender.n_items)
    for row, user in enumerate(users):
        items, weights = recommender.history(recommender.user_ids[user])
        query = recommender.user_vector(items, weights)
        exact = recommender.blended_scores(query, everything, *recommender.sequence_scores(items))
        exact[items] = -np.inf
        best = np.argsort(-exact, kind="stable")[:20]
        assert scores[row] == pytest.approx(exact[candidates[row]], rel=1e-4, abs=1e-4)
        # Same titles up to float ties at the cut-off.
        assert len(set(candidates[row].tolist()) & set(best.tolist())) >= 19
        assert candidates[row, 0] == best[0]
    recommender.close()


def test_published_because_positions_name_the_titles_a_live_request_would(trained_demo, tmp_path: Path):
    """The job stores each candidate's "because" as uint8 positions in the user's published history;
    read back through the serving path they are exactly Recommender.because's titles."""
    recommender = open_parts(trained_demo.parts, {"params": trained_demo.meta["params"]}, tmp_path)
    users = np.random.default_rng(4).choice(len(recommender.user_ids), 30, replace=False)
    candidates = recommender.candidates[users]
    reasons = candidate_reasons(recommender, users, candidates)
    assert reasons.dtype == np.uint8 and reasons.shape == (*candidates.shape, 2)
    recommender.candidate_because = np.zeros((len(recommender.user_ids), *reasons.shape[1:]), np.uint8)
    recommender.candidate_because[users] = reasons
    for n, user in enumerate(users.tolist()):
        items, _ = recommender.history(recommender.user_ids[user])
        keep = [i for i, c in enumerate(candidates[n].tolist()) if c >= 0]
        live = recommender.because([int(candidates[n, i]) for i in keep], items)
        assert recommender.candidate_reasons(recommender.user(recommender.user_ids[user]), keep) == live
        assert all(pair for pair in live)  # every candidate of a user with a history has a reason
    recommender.close()


def test_sequence_scores_sum_each_history_titles_watched_next_strengths(trained_demo, tmp_path: Path):
    recommender = open_parts(trained_demo.parts, {"params": trained_demo.meta["params"]}, tmp_path)
    rng = np.random.default_rng(5)
    for _ in range(10):
        history = rng.choice(recommender.n_items, int(rng.integers(1, 40)), replace=False)
        want: dict[int, float] = defaultdict(float)
        for title in history.tolist():
            for at in range(recommender.seq_indptr[title], recommender.seq_indptr[title + 1]):
                want[int(recommender.seq_indices[at])] += float(recommender.seq_weights[at])
        items, values = recommender.sequence_scores(history)
        assert items.tolist() == sorted(want)
        assert values.tolist() == pytest.approx([want[i] for i in sorted(want)], rel=1e-6)
    recommender.close()


@pytest.mark.parametrize("n_items", [1, 3, 101, 2500])
def test_nearest_titles_is_each_titles_cosine_ranking_without_itself(n_items):
    vectors = np.random.default_rng(n_items).standard_normal((n_items, 8)).astype(np.float32)
    found, cosines = nearest_titles(vectors, 100)
    assert found.shape == cosines.shape == (n_items, 100)
    unit = vectors / np.linalg.norm(vectors, axis=1)[:, None]
    keep = min(100, n_items - 1)
    for item in range(0, n_items, max(1, n_items // 50)):
        cosine = unit @ unit[item]
        cosine[item] = -np.inf
        assert found[item, :keep].tolist() == np.argsort(-cosine, kind="stable")[:keep].tolist()
        assert cosines[item, :keep] == pytest.approx(cosine[found[item, :keep]], abs=1e-5)
        assert (found[item, keep:] == -1).all() and np.isneginf(cosines[item, keep:]).all()  # a small catalogue pads


@pytest.mark.parametrize("n", [1, 7, 40, 41, 500, 5000])
@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_top_k_is_the_stable_sort_head_with_ties(n, k):
    rng = np.random.default_rng(n * 100 + k)
    for scores in (rng.integers(0, 5, size=n).astype(float), rng.random(n)):  # heavy ties, then none
        assert top_k(scores, k).tolist() == np.argsort(-scores, kind="stable")[:k].tolist()


def test_similar_from_the_neighbour_table_is_the_exact_cosine_ranking(trained_demo, tmp_path: Path):
    """The published neighbour table answers what scoring every title by cosine answers, filtered and
    with exclusions, and a wider search takes over when filters empty it."""
    model = open_parts(trained_demo.parts, trained_demo.meta, tmp_path)
    assert model.neighbour_table is not None
    rng = np.random.default_rng(3)
    eligible = rng.random(model.n_items) < 0.5
    for item in rng.choice(model.n_items, 20, replace=False).tolist():
        exclude = set(rng.choice(model.n_items, 5).tolist())
        got = model.similar(item, 10, eligible, exclude)
        cosine = model._unit @ model._unit[item]
        cosine[item] = -np.inf
        ranked = [i for i in np.argsort(-cosine, kind="stable").tolist() if i not in exclude and eligible[i]][:10]
        got_ids = [i for i, _ in got]
        assert len(got_ids) == len(ranked) == 10
        # Same titles, same order, up to float ties (the table is float32 and torch's).
        assert got_ids[0] == ranked[0] and len(set(got_ids) & set(ranked)) >= 9
        assert [c for _, c in got] == pytest.approx(sorted(cosine[got_ids].tolist(), reverse=True), abs=1e-5)
        assert all(eligible[i] and i not in exclude and i != item for i, _ in got)
    rare = np.zeros(model.n_items, dtype=bool)
    rare[rng.choice(model.n_items, 12, replace=False)] = True  # too few for the cached list: the exact path
    item = int(np.flatnonzero(~rare)[0])
    got = model.similar(item, 10, rare)
    cosine = model._unit[np.flatnonzero(rare)] @ model._unit[item]
    assert [i for i, _ in got] == np.flatnonzero(rare)[np.argsort(-cosine, kind="stable")[:10]].tolist()


def test_versions_published_before_the_table_and_the_positions_still_serve(trained_demo, tmp_path: Path):
    """A version without neighbours.npy searches Annoy per title (cached); int32 "because" titles read as titles."""
    parts = {k: v for k, v in trained_demo.parts.items() if not k.startswith("neighbour")}
    old = open_parts(parts, trained_demo.meta, tmp_path / "old")
    new = open_parts(trained_demo.parts, trained_demo.meta, tmp_path / "new")
    assert old.neighbour_table is None and new.neighbour_table is not None
    for item in range(0, old.n_items, max(1, old.n_items // 10)):
        before, now = [i for i, _ in old.similar(item, 10)], [i for i, _ in new.similar(item, 10)]
        assert item not in before and len(before) == 10 and len(set(before) & set(now)) >= 8  # Annoy vs exact
    assert old.neighbours.cache_info().misses > 0
    user = next(u for u in range(len(new.user_ids)) if len(new.history(new.user_ids[u])[0]) >= 3)
    keep = list(range(5))
    titles = new.candidate_reasons(new.user(new.user_ids[user]), keep)
    as_titles = np.full(new.candidate_because.shape, -1, dtype=np.int32)  # the old layout: title ids, -1 = none
    as_titles[user, : len(keep), :] = [pair + [-1] * (2 - len(pair)) for pair in titles]
    new.candidate_because = as_titles
    assert new.candidate_reasons(new.user(new.user_ids[user]), keep) == titles
    old.close()
    new.close()


def test_top_k_is_torchs_top_k_on_wide_rows_with_ties_and_unscorable_titles():
    """models.build.top_k (chunk maxima first) returns torch.topk's values, best first, and columns holding them."""
    import torch

    from models.build import TOPK_CHUNK, top_k

    rng = np.random.default_rng(8)
    width = 200 * TOPK_CHUNK
    scores = rng.standard_normal((40, width)).astype(np.float32)
    scores[1] = np.round(scores[1])  # many ties
    scores[2, 50:] = -np.inf  # fewer scorable titles than k
    scores[3] = -np.inf
    scores[4, :: TOPK_CHUNK] = 9.0  # the best title of every chunk ties
    scores[5, :64] = 5.0 + np.arange(64)  # the whole top in two chunks
    for k in (1, 20, 50):
        values, columns = top_k(torch.from_numpy(scores), k)
        expected, _ = torch.topk(torch.from_numpy(scores), k, dim=1)
        assert torch.equal(values, expected)
        assert torch.equal(torch.gather(torch.from_numpy(scores), 1, columns), values)
        assert all(len(set(row)) == k for row in columns.tolist())  # no column twice
    # NaN scores (a broken model) get torch's own answer instead of an index error.
    broken = scores.copy()
    broken[7, 3] = np.nan
    values, columns = top_k(torch.from_numpy(broken), 20)
    expected = torch.topk(torch.from_numpy(broken), 20, dim=1)
    assert torch.equal(columns, expected[1]) and torch.allclose(values, expected[0], equal_nan=True)
    # Narrow or unpadded rows go straight to torch.topk.
    narrow = torch.from_numpy(scores[:, : width - 1].copy())
    assert torch.equal(top_k(narrow, 5)[1], torch.topk(narrow, 5, dim=1)[1])


def test_two_pass_ranking_is_the_dense_top_k_of_every_column():
    """CandidateColumns.rank (first pass over the longest vectors, late watched-next terms merged, rows
    that a left-out column could still reach scored whole) == a dense top-k over every column."""
    from types import SimpleNamespace

    import scipy.sparse as sp

    import models.build
    from models.build import CandidateColumns

    rng = np.random.default_rng(12)
    n_items, n_users, keep = 3000, 300, 20
    vectors = rng.standard_normal((n_items, 8)) * rng.lognormal(0.0, 0.8, (n_items, 1))  # skewed lengths
    columns = CandidateColumns(SimpleNamespace(vectors=vectors.astype(np.float32)), keep)
    assert columns.first == columns.width  # small catalogues: one pass
    original = models.build.FIRST_PASS_MIN_TITLES
    models.build.FIRST_PASS_MIN_TITLES = 0
    try:
        columns = CandidateColumns(SimpleNamespace(vectors=vectors.astype(np.float32)), keep)
        nothing = CandidateColumns(SimpleNamespace(vectors=vectors.astype(np.float32)), 0)
    finally:
        models.build.FIRST_PASS_MIN_TITLES = original
    assert columns.first < n_items
    assert nothing.first == nothing.width  # no candidates asked (--candidates 0): one pass, nothing to bound
    scaled = rng.standard_normal((n_users, 8)).astype(np.float32)
    term = sp.random(n_users, n_items, density=0.02, random_state=3, format="csr", dtype=np.float32)
    term = sp.csr_matrix((term.data * 12.0, term.indices, term.indptr), shape=(n_users, columns.width))  # lifts
    watched = sp.random(n_users, n_items, density=0.05, random_state=4, format="lil")
    watched[5, : columns.first] = 1.0  # a user who has watched every first-pass title
    # User 8 faces a title left out, and has left unwatched only first-pass titles it scores a little
    # below that one: no watched-next term, but the first pass alone would miss its best title.
    facing = columns.rows[columns.first + 1]
    dots = columns.rows[: columns.first] @ facing
    below = np.flatnonzero((dots > 0.6 * np.linalg.norm(facing) * columns.left_out) & (dots < facing @ facing))
    assert len(below) >= keep
    watched[8, : columns.first] = 1.0
    watched[8, below[:keep]] = 0.0
    watched = sp.csr_matrix(watched.tocsr(), shape=(n_users, columns.width))
    watched.eliminate_zeros()
    term.data[term.indptr[8] : term.indptr[9]] = 0.0
    term.eliminate_zeros()
    scaled[6] = np.nan  # a broken row is scored whole, never merged
    scaled[7] = 0.0
    scaled[8] = facing
    dense = scaled @ columns.rows.T + term.toarray()
    dense[:, n_items:] = -np.inf
    dense[watched.nonzero()] = -np.inf
    inside = np.arange(columns.width) < columns.first
    near, far = (sp.csr_matrix(term.toarray() * part) for part in (inside, ~inside))
    top_scores, top = columns.rank(scaled, near, far, watched)
    for row in range(n_users):
        if row == 6:
            continue
        expected = np.sort(dense[row])[::-1][:keep]
        np.testing.assert_allclose(top_scores[row], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dense[row, top[row]], top_scores[row], rtol=1e-5, atol=1e-5)
        assert len(set(top[row].tolist())) == keep
    assert np.isnan(top_scores[6]).all()
    assert top[8, 0] == columns.first + 1  # found only by the second pass

    # Every path was taken: rows decided by the first pass, rows with a late title merged in, rows redone.
    assert 0 < columns.widened < n_users
    late = (top >= columns.first).any(axis=1)
    first_only = ~late
    assert late.sum() > columns.widened and first_only.any()


def test_split_columns_keeps_every_entry_on_its_side():
    import scipy.sparse as sp

    from models.build import split_columns

    matrix = sp.random(30, 50, density=0.2, random_state=2, format="csr")
    matrix = sp.vstack([matrix, sp.csr_matrix((3, 50))]).tocsr()  # empty rows at the end
    for at in (0, 17, 50):
        left, right = split_columns(matrix, at)
        assert left.shape == right.shape == matrix.shape
        assert (left.toarray() == np.where(np.arange(50) < at, matrix.toarray(), 0)).all()
        assert (right.toarray() == np.where(np.arange(50) >= at, matrix.toarray(), 0)).all()


def test_sparse_product_is_scipys():
    """Entry for entry ``a @ b`` (same columns in the same order), including empty rows and products;
    a mismatch in dtype or shape is an error, not a silent cast."""
    import scipy.sparse as sp

    from models.build import sparse_product

    rng = np.random.default_rng(4)
    picked = sp.random(60, 40, density=0.1, random_state=5, format="csr", dtype=np.float32)
    picked = sp.vstack([sp.csr_matrix((2, 40), dtype=np.float32), picked]).tocsr()  # rows that pick nothing
    strengths = sp.random(40, 90, density=0.2, random_state=6, format="csr", dtype=np.float32)
    strengths = (sp.diags((np.arange(40) != 3).astype(np.float32)) @ strengths).tocsr()  # a picked row may be empty
    strengths.eliminate_zeros()
    assert strengths[3].nnz == 0 and picked[:, 3].nnz > 0
    for a, b in [(picked, strengths), (picked[:, :0].tocsr(), strengths[:0]), (sp.csr_matrix((5, 40), dtype=np.float32), strengths)]:
        want, got = a @ b, sparse_product(a, b)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.array_equal(got.indptr, want.indptr)
        assert np.array_equal(got.indices, want.indices) and np.array_equal(got.data, want.data)
    wide = sp.csr_matrix((rng.random(3).astype(np.float32), ([0, 1, 1], [2, 0, 2])), shape=(2, 3))
    assert np.array_equal(sparse_product(wide, strengths[:3]).toarray(), wide.toarray() @ strengths[:3].toarray())
    with pytest.raises(ValueError):
        sparse_product(picked, strengths.astype(np.float64))
    with pytest.raises(ValueError):
        sparse_product(picked, strengths[:30])


def test_summed_pairs_sums_every_repeated_pair_and_sorts_each_row():
    from models.embeddings import summed_pairs

    rng = np.random.default_rng(21)
    rows = rng.integers(0, 40, 5000)
    cols = rng.integers(0, 40, 5000)
    rows[rows == 7] = 8  # a row with no pairs at all
    values = rng.random(5000)
    want: dict[tuple[int, int], float] = defaultdict(float)
    for r, c, v in zip(rows.tolist(), cols.tolist(), values.tolist()):
        want[(r, c)] += v
    given = [rows, cols, values]
    matrix = summed_pairs(given, 40)
    assert given == []  # consumed: their memory can go
    assert matrix.shape == (40, 40) and matrix.nnz == len(want)
    assert matrix.has_canonical_format
    for r in range(40):
        row = matrix.indices[matrix.indptr[r] : matrix.indptr[r + 1]]
        assert row.tolist() == sorted(c for (rr, c) in want if rr == r)
    got = matrix.tocoo()
    assert {(int(r), int(c)): v for r, c, v in zip(got.row, got.col, got.data)} == pytest.approx(dict(want), rel=1e-12)
    assert summed_pairs([np.zeros(0, int), np.zeros(0, int), np.zeros(0)], 5).nnz == 0
