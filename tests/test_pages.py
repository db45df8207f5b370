"""Catalogue rules, filters, exclusions and GET /page: Flask test client on the demo model, one run through gunicorn."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from app.pages import PageBuilder
from jobs.trending import refresh
from models.data import load_catalog
from models.rules import Filters
from tests.helpers import get, start_gunicorn, stop
from tests.test_events import make_app


@pytest.fixture
def client(redis_server, store, trained_demo, demo_files, tmp_path):
    store.publish(trained_demo.parts, trained_demo.meta)
    refresh(store, str(demo_files["events"]), str(demo_files["catalog"]))
    return make_app(redis_server, store, tmp_path).test_client()


@pytest.fixture
def catalog(trained_demo):
    return json.loads(trained_demo.parts["items.json"])


def model_of(client):
    return client.application.extensions["live_model"].current


def row_of(catalog, item_id):
    return catalog["item_id"].index(item_id)


def unavailable(catalog, now=None):
    now = time.time() if now is None else now
    return {
        item_id
        for item_id, opens, closes in zip(catalog["item_id"], catalog["available_from"], catalog["available_until"])
        if (opens is not None and opens > now) or (closes is not None and closes <= now)
    }


def test_the_demo_catalogue_has_rules_and_they_reach_the_model(catalog):
    assert sum(m is not None for m in catalog["maturity"]) > 0.9 * len(catalog["item_id"])
    assert 0 < sum(bool(r) for r in catalog["regions"]) < len(catalog["item_id"]) / 2
    assert unavailable(catalog)  # some titles are out of their window right now
    assert all(a is not None for a in catalog["added_at"])


def test_each_filter_holds_on_recommend(client, catalog):
    model = model_of(client)
    user = model.user_ids[3]
    checks = {
        "kind=film": lambda r: catalog["kind"][r] == "film",
        "genre=Drama&genre=Comedy": lambda r: {"Drama", "Comedy"} & set(catalog["genres"][r]),
        "genre=Drama,Comedy": lambda r: {"Drama", "Comedy"} & set(catalog["genres"][r]),
        "year_min=2010&year_max=2020": lambda r: catalog["year"][r] is not None and 2010 <= catalog["year"][r] <= 2020,
        "max_maturity=7": lambda r: catalog["maturity"][r] is not None and catalog["maturity"][r] <= 7,
        "region=GB": lambda r: not catalog["regions"][r] or "GB" in catalog["regions"][r],
    }
    gone = unavailable(catalog)
    for query, holds in checks.items():
        body = client.get(f"/recommend?user={user}&k=20&{query}").get_json()
        assert len(body["items"]) == 20, query
        for item in body["items"]:
            assert holds(row_of(catalog, item["item_id"])), (query, item)
            assert item["item_id"] not in gone
            assert all(set(b) == {"item_id", "title"} for b in item["because"])


def test_a_filtered_request_gets_k_titles_whenever_k_eligible_unseen_ones_exist(client, catalog):
    model = model_of(client)
    gone = unavailable(catalog)
    for user in model.user_ids[:15]:
        seen = {model.item_ids[i] for i in model.history(user)[0].tolist()}
        eligible = [
            item_id for r, item_id in enumerate(catalog["item_id"])
            if "Western" in catalog["genres"][r] and catalog["maturity"][r] is not None
            and catalog["maturity"][r] <= 16 and item_id not in seen and item_id not in gone
        ]
        body = client.get(f"/recommend?user={user}&k=100&genre=Western&max_maturity=16").get_json()
        got = [i["item_id"] for i in body["items"]]
        assert sorted(got) == sorted(eligible), user  # all of them: the precomputed 50 ran out, it went deeper
        k = max(1, len(eligible) // 2)
        assert len(client.get(f"/recommend?user={user}&k={k}&genre=Western&max_maturity=16").get_json()["items"]) == k


def test_exclusions_hold_and_long_lists_go_in_a_post_body(client):
    model = model_of(client)
    user = model.user_ids[5]
    first = [i["item_id"] for i in client.get(f"/recommend?user={user}&k=10").get_json()["items"]]
    second = client.get(f"/recommend?user={user}&k=10&exclude={','.join(first[:5])}&exclude={first[5]}").get_json()
    assert len(second["items"]) == 10 and not set(first[:6]) & {i["item_id"] for i in second["items"]}
    many = [f"not-in-catalogue-{n}" for n in range(560)] + model.item_ids[:40]
    assert client.get(f"/recommend?user={user}&exclude={','.join(many[:501])}").status_code == 400
    response = client.post("/recommend", json={"user": user, "k": 10, "exclude": many, "kind": "film"})
    body = response.get_json()
    assert response.status_code == 200 and len(body["items"]) == 10
    assert not set(many) & {i["item_id"] for i in body["items"]}
    assert client.post("/recommend", json=["not", "an", "object"]).status_code == 400


def test_unknown_genre_region_or_kind_is_a_400_naming_the_valid_values(client):
    user = model_of(client).user_ids[0]
    genre = client.get(f"/recommend?user={user}&genre=Telenovela").get_json()["error"]
    assert "Telenovela" in genre and "Drama" in genre and "Western" in genre
    region = client.get(f"/recommend?user={user}&region=ZZ").get_json()["error"]
    assert "ISO 3166" in region and "GB" in region
    assert client.get(f"/recommend?user={user}&kind=podcast").status_code == 400
    assert client.get(f"/recommend?user={user}&max_maturity=old").status_code == 400
    assert client.get(f"/recommend?user={user}&region=fr").status_code == 200  # case does not matter


def test_similar_takes_the_filters(client, catalog):
    model = model_of(client)
    item = model.item_ids[int(model.popular[0])]
    body = client.get(f"/similar?item={item}&k=15&kind=show&max_maturity=13").get_json()
    assert len(body["items"]) == 15 and item not in {i["item_id"] for i in body["items"]}
    for found in body["items"]:
        r = row_of(catalog, found["item_id"])
        assert catalog["kind"][r] == "show" and catalog["maturity"][r] is not None and catalog["maturity"][r] <= 13


def test_a_page_has_the_configured_rows_no_repeats_and_full_rows(client, catalog):
    model = model_of(client)
    user = next(u for u in model.user_ids if 8 <= len(model.history(u)[0]) <= 20)
    body = client.get(f"/page?user={user}").get_json()
    kinds = [row["kind"] for row in body["rows"]]
    assert kinds[0] == "top_picks" and kinds[1] == kinds[2] == "because_you_watched"
    assert {"trending", "new_for_you", "genre", "popular"} <= set(kinds)
    assert [k for k in kinds if k != "because_you_watched" and k != "genre"] == sorted(
        set(kinds) - {"because_you_watched", "genre"}, key=["top_picks", "trending", "new_for_you", "popular"].index
    )
    assert body["rows"][1]["title"].startswith("Because you watched ")
    ids = [item["item_id"] for row in body["rows"] for item in row["items"]]
    assert len(ids) == len(set(ids))  # nothing twice on a page
    seen = {model.item_ids[i] for i in model.history(user)[0].tolist()}
    assert not set(ids) & seen and not set(ids) & unavailable(catalog)
    assert all(len(row["items"]) >= 5 for row in body["rows"])
    # Filters apply to every row.
    kids = client.get(f"/page?user={user}&max_maturity=7").get_json()
    for row in kids["rows"]:
        for item in row["items"]:
            maturity = catalog["maturity"][row_of(catalog, item["item_id"])]
            assert maturity is not None and maturity <= 7


def test_a_new_user_gets_a_page_too(client):
    body = client.get("/page?user=someone-new").get_json()
    kinds = [row["kind"] for row in body["rows"]]
    assert "top_picks" not in kinds and "because_you_watched" not in kinds
    assert {"trending", "popular", "genre"} <= set(kinds)


def test_the_page_config_decides_rows_order_and_sizes(redis_server, store, trained_demo, tmp_path, monkeypatch):
    store.publish(trained_demo.parts, trained_demo.meta)
    config = tmp_path / "page.yaml"
    config.write_text("min_items: 3\nrows:\n  - {kind: popular, size: 4}\n  - {kind: genre, count: 3, size: 6}\n")
    monkeypatch.setenv("PAGE_CONFIG", str(config))
    client = make_app(redis_server, store, tmp_path).test_client()
    model = model_of(client)

    def fills_every_row(user: str) -> bool:  # each of the user's top 3 genres has enough unseen titles for the page
        page = PageBuilder(model, user, Filters(), set(), (None, None))
        seen = set(page.history.tolist())
        return all(
            len(set(np.flatnonzero(model.rules.genre_masks[g] & page.eligible).tolist()) - seen) >= 4 + 3 * 6
            for g in page.top_genres(3)
        )

    user = next(u for u in model.user_ids if fills_every_row(u))
    body = client.get(f"/page?user={user}").get_json()
    assert [row["kind"] for row in body["rows"]] == ["popular", "genre", "genre", "genre"]
    assert [len(row["items"]) for row in body["rows"]] == [4, 6, 6, 6]
    config.write_text("rows:\n  - {kind: spotlight}\n")
    with pytest.raises(ValueError, match="kind"):
        make_app(redis_server, store, tmp_path)


def test_trending_follows_the_event_files(store, demo_files, trained_demo):
    refresh(store, str(demo_files["events"]), str(demo_files["catalog"]))
    record = json.loads(store.redis.get(store.keys.trending))
    assert record["items"] and all(score > 1.0 for _, score, _ in record["items"])
    catalog, _ = load_catalog(demo_files["catalog"])
    assert {item for item, _, _ in record["items"]} <= set(catalog.item_ids)


@pytest.mark.slow
def test_page_and_filters_through_gunicorn(redis_server, store, trained_demo, demo_files, tmp_path):
    store.publish(trained_demo.parts, trained_demo.meta)
    refresh(store, str(demo_files["events"]), str(demo_files["catalog"]))
    user = json.loads(trained_demo.parts["users.json"])[0]
    process, base = start_gunicorn(redis_server.url, store.keys.prefix, tmp_path / "cache")
    try:
        status, page = get(f"{base}/page?user={user}&region=GB")
        status2, recs = get(f"{base}/recommend?user={user}&k=10&kind=film&exclude=t00001")
        status3, bad = get(f"{base}/page?user={user}&genre=Nope")
    finally:
        stop(process)
    assert status == 200 and len(page["rows"]) >= 4
    assert status2 == 200 and len(recs["items"]) == 10
    assert status3 == 400 and "Nope" in bad["error"]


def test_diversity_makes_lists_less_alike_and_is_checked(client):
    from models.evaluate import intra_list_similarity

    model = model_of(client)
    users = [u for u in model.user_ids[:40] if len(model.history(u)[0]) >= 5]
    lists = {}
    for diversity in (0, 0.6):
        lists[diversity] = []
        for user in users:
            body = client.get(f"/recommend?user={user}&k=10&diversity={diversity}").get_json()
            assert len(body["items"]) == 10
            lists[diversity].append([model.item_index[i["item_id"]] for i in body["items"]])
    assert intra_list_similarity(lists[0.6], model._unit) < intra_list_similarity(lists[0], model._unit) - 0.02
    # The first pick is the most relevant title either way; the rest trade relevance for variety.
    assert all(a[0] == b[0] for a, b in zip(lists[0], lists[0.6]))
    for bad in ("1.5", "-0.1", "nan", "lots"):
        assert client.get(f"/recommend?user={users[0]}&diversity={bad}").status_code == 400


def test_diversify_is_maximal_marginal_relevance(trained_demo, tmp_path):
    """Each title the vectorised MMR takes has the highest marginal value of the textbook definition
    at its step (within float rounding), on the demo model's vectors."""
    import numpy as np

    from models.build import open_parts
    from models.recommender import Recommendation

    model = open_parts(trained_demo.parts, trained_demo.meta, tmp_path)
    rng = np.random.default_rng(3)
    for _ in range(200):
        n, k = int(rng.integers(2, 31)), int(rng.integers(1, 12))
        items = rng.choice(model.n_items, n, replace=False).tolist()
        scores = np.sort(rng.random(n))[::-1].tolist()
        picked = [Recommendation(i, s, []) for i, s in zip(items, scores)]
        relevance = [(s - min(scores)) / (max(scores) - min(scores)) for s in scores]
        for diversity in (0.3, 0.6, 1.0):
            taken = [items.index(p.item) for p in model.diversify(picked, k, diversity)]
            assert len(taken) == min(k, n) == len(set(taken))
            assert relevance[taken[0]] == 1.0  # nothing taken yet: the most relevant title
            for step in range(1, len(taken)):
                before = taken[:step]
                value = {
                    i: (1 - diversity) * relevance[i]
                    - diversity * max(float(model._unit[items[i]] @ model._unit[items[j]]) for j in before)
                    for i in range(n) if i not in before
                }  # fmt: skip
                assert value[taken[step]] >= max(value.values()) - 1e-6
    assert model.diversify(picked, 5, 0.0) == picked[:5]


def test_a_rows_pool_is_deep_enough_for_its_diversity(client):
    """A page row at diversity <= 0.3 asks its source for 2 x size titles (app.pages.pool_size): MMR over
    3 x size rarely takes a title below the best 2 x size there, and often does at 0.6, where the pool
    stays 3 x size (demo model: 0.2 % and 10 % of the picks)."""
    from app.pages import pool_size

    assert [pool_size(10, d) for d in (0, 0.1, 0.3, 0.31, 0.6, 1.0)] == [10, 20, 20, 30, 30, 30]
    model = model_of(client)
    users = [u for u in model.user_ids[:300] if len(model.history(u)[0]) >= 5][:200]
    deep = {0.3: 0, 0.6: 0}
    for user in users:
        _, recs = model.recommend(user, 30)
        assert len(recs) == 30
        for diversity in deep:
            deep[diversity] += sum(recs.index(r) >= 20 for r in model.diversify(recs, 10, diversity))
    picks = 10 * len(users)
    print(f"picks below the best 20 of 30: {deep[0.3] / picks:.1%} at 0.3, {deep[0.6] / picks:.1%} at 0.6")
    assert deep[0.3] <= 0.01 * picks
    assert deep[0.6] >= 0.05 * picks


def test_rule_masks_are_cached_but_bounded():
    from models.rules import MASK_CACHE, CatalogRules, Filters

    rules = CatalogRules({"item_id": ["a", "b"], "genres": [["Drama"], []], "available_until": [None, 2_000_000_000],
                          "added_at": [1_700_000_000, None]})
    for minute in range(MASK_CACHE * 3):  # a long-running worker: a new minute, a new key
        rules.eligible(Filters(genres=("Drama",)), now=1_800_000_000 + 60 * minute)
        rules.new_titles(30, now=1_800_000_000 + 60 * minute)
    assert len(rules._cache) <= MASK_CACHE
    assert rules.eligible(None, now=2_100_000_000).tolist() == [True, False]  # b's window has closed


def test_ranked_rows_are_the_users_best_titles_of_their_set(client):
    """A genre or new-arrivals row (diversity 0) holds the user's top titles of that set by the served
    score: from the published candidates, the worker's gathered small set, or the shared pool."""
    import numpy as np

    from app.pages import build_page
    from models.rules import Filters

    model = model_of(client)
    rng = np.random.default_rng(2)
    checked = {"genre": 0, "new_for_you": 0}
    for user in rng.choice(model.user_ids, 12, replace=False).tolist():
        items, weights = model.history(user)
        if len(items) == 0:
            continue
        query = model.user_vector(items, weights)
        every = np.arange(model.n_items)
        score = model.blended_scores(query, every, *model.sequence_scores(items))
        score[items] = -np.inf
        eligible = model.rules.eligible(Filters())
        for kind, spec in (("genre", {"kind": "genre", "count": 1}), ("new_for_you", {"kind": "new_for_you", "days": 30})):
            rows = build_page(model, user, Filters(), set(), (None, None), {"min_items": 1, "rows": [{**spec, "size": 10, "diversity": 0}]}, [])
            if not rows:
                continue
            row = rows[0]
            mask = model.rules.genre_masks[row["title"]] if kind == "genre" else model.rules.new_titles(30)
            allowed = np.flatnonzero(mask & eligible & np.isfinite(score))
            best = allowed[np.argsort(-score[allowed], kind="stable")[:10]]
            got = [model.item_index[i["item_id"]] for i in row["items"]]
            assert [i["score"] for i in row["items"]] == sorted((i["score"] for i in row["items"]), reverse=True)
            if kind == "new_for_you":  # a small set: scored exactly
                assert got == best.tolist(), (user, got, best.tolist())
            else:  # from the candidates (exact) or the shared pool (nearly)
                assert len(set(got) & set(best.tolist())) >= min(8, len(best)), (user, got, best.tolist())
            checked[kind] += 1
    assert checked["genre"] >= 5 and checked["new_for_you"] >= 5
