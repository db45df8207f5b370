"""Text embeddings and GET /search with the real all-MiniLM-L6-v2 weights (real Redis, Flask test client)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from models.text import EncoderError, TextEncoder, model_folder, verify_weights
from tests.test_events import make_app


@pytest.fixture(scope="module")
def app(redis_server, trained_demo, tmp_path_factory):
    import redis

    from models.store import ModelStore

    store = ModelStore(redis.Redis.from_url(redis_server.url), "search")
    store.publish(trained_demo.parts, trained_demo.meta)
    app = make_app(redis_server, store, tmp_path_factory.mktemp("search"), SEARCH_ENCODER="preload")
    client = app.test_client()
    deadline = time.monotonic() + 120
    while client.get("/search?q=warmup").status_code == 503:  # the encoder loads in the background
        assert time.monotonic() < deadline, client.get("/search?q=warmup").get_json()
        time.sleep(0.5)
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def catalog_of(trained_demo) -> dict:
    return json.loads(trained_demo.parts["items.json"])


def test_the_version_carries_text_vectors_and_the_job_reports_the_encoder(trained_demo):
    text = trained_demo.meta["text"]
    assert text["weights_sha256"] == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    assert text["with_text"] == len(catalog_of(trained_demo)["item_id"])
    assert {"text.ann", "text_vectors.npy", "map.npy"} <= set(trained_demo.parts)
    cold = trained_demo.meta["metrics"]["cold_start"]
    assert {"text_lift", "hit_rate_without_text"} <= set(cold)


def test_synopses_place_new_titles_better_than_structured_features_alone_on_the_default_demo_data(tmp_path):
    """The job's cold-start check on the default demo data: the synopses place new titles >= 1.5x as well.

    Issue 14's target (text_lift >= 1.5), on the job's split and parameters'
    defaults. Every content model form on every objective is measured on one
    ALS fit and the best pair kept, and here (the demo's viewers follow themes
    the synopses name) ALS's own loss places new titles far better than the
    regression to the CF vectors.
    """
    from jobs.make_demo_data import DEFAULT_EVENTS, DEFAULT_ITEMS, DEFAULT_SEED, DEFAULT_USERS, write_demo_data
    from jobs.nightly import embed_catalog
    from models.data import load_catalog, load_events
    from models.embeddings import ModelParams
    from models.offline import cold_start_evaluation, holdout_split

    paths = write_demo_data(tmp_path, DEFAULT_USERS, DEFAULT_ITEMS, DEFAULT_EVENTS, DEFAULT_SEED, "csv")
    catalog, _ = load_catalog(paths["catalog"])
    events, _ = load_events(paths["events"], catalog)
    catalog, _ = embed_catalog(catalog, str(tmp_path / "text-cache"), progress=False)
    params = ModelParams()
    train = events.subset(holdout_split(events, 0.2, "temporal", seed=params.seed))  # as the job splits
    cold = cold_start_evaluation(train, catalog, params, seed=params.seed)
    print(f"\ncold start on the default demo data: {cold}")
    rates = cold["hit_rate_by_choice"]
    assert set(rates) == {"mlp/regression", "linear/regression", "mlp/als", "linear/als"}
    assert cold["hit_rate"] == max(rates.values()) == rates[f"{cold['content_model']}/{cold['content_objective']}"]
    assert cold["content_objective"] == "als"
    assert cold["hit_rate"] > 1.4 * max(rates["mlp/regression"], rates["linear/regression"])
    assert cold["text_lift"] >= 1.5
    assert cold["lift_without_text"] > 2.0  # the structured features alone beat random placement too


def test_a_titles_own_synopsis_finds_it_in_the_top_three(client, demo_files):
    from models.data import load_catalog

    catalog, _ = load_catalog(demo_files["catalog"])
    found = 0
    rows = catalog.items
    for item_id, description in zip(rows["item_id"], rows["description"]):
        answer = client.get("/search", query_string={"q": description[:200], "k": 3}).get_json()
        found += item_id in [i["item_id"] for i in answer["items"]]
    share = found / len(rows)
    print(f"\nown synopsis in the top 3: {share:.1%} of {len(rows)} titles")
    assert share >= 0.8


def test_search_by_meaning_exact_matches_first_and_bad_queries(client, trained_demo, demo_files):
    catalog = catalog_of(trained_demo)
    title = catalog["title"][7]
    answer = client.get("/search", query_string={"q": title.upper()}).get_json()
    assert answer["items"][0]["title"] == title and answer["items"][0]["match"] == "exact"
    assert answer["recommendation_id"] and answer["model_version"]
    answer = client.get("/search", query_string={"q": catalog["item_id"][9]}).get_json()
    assert answer["items"][0]["item_id"] == catalog["item_id"][9]
    heist = client.get("/search", query_string={"q": "thieves plan to rob a bank vault", "k": 5}).get_json()
    from jobs.make_demo_data import THEMES
    from models.data import load_catalog

    rows = load_catalog(demo_files["catalog"])[0].items
    descriptions = dict(zip(rows["item_id"], rows["description"]))
    about_heists = [any(p in descriptions[i["item_id"]].lower() for p in THEMES["heist"]) for i in heist["items"]]
    assert sum(about_heists) >= 4, [descriptions[i["item_id"]] for i in heist["items"]]
    assert client.get("/search").status_code == 400
    assert client.get("/search?q=%20%20").status_code == 400
    long = client.get("/search", query_string={"q": "x" * 201})
    assert long.status_code == 400 and "longer than" in long.get_json()["error"]
    films = client.get("/search", query_string={"q": "a journey at sea", "kind": "film", "k": 10}).get_json()
    assert films["items"] and all(catalog["kind"][catalog["item_id"].index(i["item_id"])] == "film" for i in films["items"])


def test_with_a_user_results_lean_to_taste_and_unseen_titles_come_first(client, app):
    model = app.extensions["live_model"].current
    user = next(u for u in model.user_ids if len(model.history(u)[0]) >= 5)
    watched = set(model.history(user)[0].tolist())
    plain = client.get("/search", query_string={"q": "a family drama", "k": 20}).get_json()["items"]
    mine = client.get("/search", query_string={"q": "a family drama", "k": 20, "user": user}).get_json()["items"]
    flags = [model.item_index[i["item_id"]] in watched for i in mine]
    assert flags == sorted(flags)  # every unseen title before every watched one
    assert [i["item_id"] for i in plain] != [i["item_id"] for i in mine]


def test_weights_that_do_not_match_upstream_are_refused(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_folder(), folder, ignore=shutil.ignore_patterns("model.safetensors"))
    (folder / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(EncoderError, match="refusing"):
        verify_weights(folder)
    with pytest.raises(EncoderError, match="refusing"):
        TextEncoder(folder)


def test_unit_vectors_and_similar_meanings_lie_close(app):
    encoder = app.extensions["search_encoder"].encoder
    vectors = encoder.encode(["astronauts stranded in orbit", "a crew lost aboard a space station", "a chef's busy kitchen"])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_the_synopsis_index_is_taken_from_the_live_version_while_the_synopses_are_unchanged(demo_files, store, tmp_path):
    """The next night fetches the live version's text.ann (checksum verified) instead of building it again;
    a damaged part, or a changed synopsis, builds it."""
    from dataclasses import replace

    import pandas as pd

    from jobs.nightly import NightlyConfig, run_nightly
    from models.embeddings import ModelParams

    config = NightlyConfig(
        events=str(demo_files["events"]), catalog=str(demo_files["catalog"]), show_progress=False, evaluate=False,
        params=ModelParams(content_steps=10, iterations=2, n_trees=4), live_events=False, text_cache=str(tmp_path / "text"),
    )  # fmt: skip
    first = run_nightly(config, store)
    assert first.meta["text_index"]["reused_from"] is None and first.meta["text_index"]["trees"] == 10
    second = run_nightly(config, store)
    assert second.meta["text_index"] == {**first.meta["text_index"], "reused_from": first.version}
    assert second.parts["text.ann"] == first.parts["text.ann"]
    assert store.meta(second.version)["parts"]["text.ann"]["sha256"] == store.meta(first.version)["parts"]["text.ann"]["sha256"]

    # A damaged part in Redis is never served on: the job builds the index instead.
    store.redis.set(store.keys.part(second.version, "text.ann", 0), b"garbage")
    third = run_nightly(config, store)
    assert third.meta["text_index"]["reused_from"] is None and len(third.parts["text.ann"]) == len(first.parts["text.ann"])

    # A changed synopsis changes the vectors: built again.
    catalog = pd.read_csv(demo_files["catalog"], dtype=str, keep_default_na=False)
    catalog.loc[0, "description"] = "A lighthouse keeper and a whale become unlikely friends."
    changed = tmp_path / "catalog.csv"
    catalog.to_csv(changed, index=False)
    fourth = run_nightly(replace(config, catalog=str(changed)), store)
    assert fourth.meta["text_index"]["reused_from"] is None
    assert fourth.meta["text_index"]["vectors_sha256"] != first.meta["text_index"]["vectors_sha256"]

    # A forged live record (a recipe of the wrong type, or a matching recipe naming a part that is not one)
    # is never fetched from: the index is built and the run goes on.
    import orjson

    for forge in ("recipe", "part"):
        live = store.live_version()
        meta = store.meta(live)
        if forge == "recipe":
            meta["text_index"] = "forged"
        else:
            meta["parts"]["text.ann"] = {"chunks": "x"}
        store.redis.set(store.keys.meta(live), orjson.dumps(meta))
        forged = run_nightly(replace(config, catalog=str(changed)), store)
        assert forged.meta["text_index"]["reused_from"] is None and forged.version == store.live_version()
