"""Tests for jobs.make_demo_data: contract, determinism, CLI and the learnable structure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from jobs import make_demo_data as mdd
from jobs.make_demo_data import generate, main, write_demo_data

USERS, ITEMS, EVENTS, SEED = 400, 600, 30_000, 7
OPTIONAL = ["genres", "year", "episode_minutes", "seasons", "episodes"]
RULES = ["maturity", "regions", "available_from", "available_until", "added_at"]


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame]:
    return generate(USERS, ITEMS, EVENTS, SEED)


@pytest.fixture(scope="module")
def views(data) -> pd.DataFrame:
    """Events joined with the catalogue columns the structure tests need."""
    events, catalog = data
    merged = events.merge(catalog[["item_id", "kind", "genres", "episode_minutes"]], on="item_id", how="left")
    assert len(merged) == len(events)
    return merged


def _top3_coverage(events: pd.DataFrame) -> pd.Series:
    """Per user: share of their views whose title has one of the user's 3 most-viewed genres."""
    frame = events[["user_id", "genres"]].assign(row=np.arange(len(events)))
    exploded = frame.assign(genre=frame["genres"].fillna("").str.split("|")).explode("genre")
    exploded = exploded[exploded["genre"] != ""]
    counts = exploded.groupby(["user_id", "genre"]).size().rename("n").reset_index()
    counts["rank"] = counts.groupby("user_id")["n"].rank(method="first", ascending=False)
    top = counts.loc[counts["rank"] <= 3, ["user_id", "genre"]]
    hits = exploded.merge(top, on=["user_id", "genre"]).drop_duplicates("row")
    totals = frame.groupby("user_id").size()
    return hits.groupby("user_id").size().reindex(totals.index, fill_value=0) / totals


# --- contract -----------------------------------------------------------------


def test_exact_row_counts_and_columns(data):
    events, catalog = data
    assert len(events) == EVENTS
    assert len(catalog) == ITEMS
    assert list(events.columns) == ["user_id", "item_id", "timestamp", "watch_seconds"]
    assert list(catalog.columns) == ["item_id", "title", "kind", *OPTIONAL, *RULES, "description"]


def test_ids_are_complete_and_consistent(data):
    events, catalog = data
    assert catalog["item_id"].tolist() == [f"t{i:05d}" for i in range(ITEMS)]
    assert set(events["item_id"]) <= set(catalog["item_id"])
    # Every user id in range appears, and nothing else.
    assert set(events["user_id"]) == {f"u{i:06d}" for i in range(USERS)}
    assert catalog["title"].str.strip().ne("").all()
    assert catalog["title"].is_unique


def test_events_sorted_within_window(data):
    events, _ = data
    ts = events["timestamp"].to_numpy()
    assert (np.diff(ts) >= 0).all()
    assert ts.min() >= mdd.REFERENCE_TS - mdd.WINDOW_DAYS * mdd.DAY
    assert ts.max() < mdd.REFERENCE_TS
    # Spread over the whole window, not bunched at one end.
    days = (ts - ts.min()) // mdd.DAY
    assert days.max() > 170
    assert 0.3 < np.mean(days < 90) < 0.7


def test_watch_seconds_fit_episode_length(views):
    seconds = views["watch_seconds"]
    assert (seconds >= 0).all()
    known = views["episode_minutes"].notna()
    length = views.loc[known, "episode_minutes"].astype(float) * 60
    completion = seconds[known] / length
    assert (completion <= 1.0).all()
    # Mostly watched to (near) the end, a minority abandoned early.
    assert 0.75 < (completion >= 0.7).mean() < 0.95
    assert 0.05 < (completion < 0.4).mean() < 0.2


def test_catalog_shapes(data):
    _, catalog = data
    films = catalog[catalog["kind"] == "film"]
    shows = catalog[catalog["kind"] == "show"]
    assert set(catalog["kind"]) == {"film", "show"}
    assert len(shows) > 0.2 * len(catalog) and len(films) > 0.4 * len(catalog)

    assert films["seasons"].dropna().eq(1).all() and films["episodes"].dropna().eq(1).all()
    assert films["episode_minutes"].dropna().between(80, 180).all()
    assert shows["episode_minutes"].dropna().between(20, 60).all()
    assert shows["seasons"].dropna().between(1, 10).all()
    both = shows.dropna(subset=["seasons", "episodes"])
    per_season = both["episodes"] / both["seasons"]
    assert (per_season == per_season.round()).all() and per_season.between(6, 24).all()
    assert shows["seasons"].dropna().gt(1).any()

    genre_lists = catalog["genres"].dropna().str.split("|")
    assert genre_lists.map(len).between(1, 3).all()
    assert genre_lists.map(lambda g: len(set(g)) == len(g)).all()
    assert set(genre_lists.explode()) == set(mdd.GENRES)
    assert len(mdd.GENRES) == 18

    years = catalog["year"].dropna()
    assert years.between(1960, 2026).all()
    assert years.median() >= 2010  # skewed recent


def test_some_optional_values_are_blank(data):
    _, catalog = data
    share = catalog[OPTIONAL].isna().mean()
    assert (share > 0).all(), share  # every optional column exercises the loader's blank path
    assert (share < 0.06).all(), share
    assert 0.01 < share.mean() < 0.035
    assert catalog[["item_id", "title", "kind"]].notna().all().all()


# --- determinism and output ----------------------------------------------------


def _read_bytes(paths: dict) -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in paths.items()}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_same_seed_gives_identical_files(tmp_path, fmt):
    first = write_demo_data(tmp_path / "a", 50, 80, 3000, seed=3, fmt=fmt, progress=False)
    second = write_demo_data(tmp_path / "b", 50, 80, 3000, seed=3, fmt=fmt, progress=False)
    other = write_demo_data(tmp_path / "c", 50, 80, 3000, seed=4, fmt=fmt, progress=False)
    assert first == {"events": tmp_path / "a" / f"events.{fmt}", "catalog": tmp_path / "a" / f"catalog.{fmt}"}
    assert _read_bytes(first) == _read_bytes(second)
    assert _read_bytes(first)["events"] != _read_bytes(other)["events"]
    assert _read_bytes(first)["catalog"] != _read_bytes(other)["catalog"]
    assert not list((tmp_path / "a").glob("*.partial"))


def test_catalog_depends_only_on_items_and_seed():
    _, small = generate(20, 100, 500, seed=11)
    _, large = generate(60, 100, 5000, seed=11)
    pd.testing.assert_frame_equal(small, large)


def test_written_csv_matches_generate(tmp_path):
    events, catalog = generate(30, 40, 2000, seed=5)
    paths = write_demo_data(tmp_path, 30, 40, 2000, seed=5, progress=False)
    header = paths["events"].read_text().splitlines()[0]
    assert header == "user_id,item_id,timestamp,watch_seconds"
    read_events = pd.read_csv(paths["events"], dtype={"user_id": str, "item_id": str})
    np.testing.assert_array_equal(read_events.to_numpy(), events.to_numpy())
    read_catalog = pd.read_csv(paths["catalog"], dtype={"item_id": str, "title": str})
    assert read_catalog["item_id"].tolist() == catalog["item_id"].tolist()
    assert read_catalog["title"].tolist() == catalog["title"].tolist()
    for column in OPTIONAL[1:]:
        np.testing.assert_array_equal(
            read_catalog[column].to_numpy(dtype=float), catalog[column].to_numpy(dtype=float, na_value=np.nan)
        )
    assert read_catalog["genres"].isna().tolist() == catalog["genres"].isna().tolist()


def test_parquet_roundtrip(tmp_path):
    events, catalog = generate(30, 40, 2000, seed=5)
    paths = write_demo_data(tmp_path, 30, 40, 2000, seed=5, fmt="parquet", progress=False)
    read_events = pd.read_parquet(paths["events"])
    np.testing.assert_array_equal(read_events.to_numpy(), events.to_numpy())
    assert pd.read_parquet(paths["catalog"])["title"].tolist() == catalog["title"].tolist()


def test_degenerate_sizes_still_meet_the_contract():
    for users, items, events in [(1, 1, 1), (1, 2, 300), (5, 3, 5), (10, 5000, 10)]:
        ev, cat = generate(users, items, events, seed=1)
        assert len(ev) == events and len(cat) == items
        assert ev["user_id"].nunique() == users
        assert set(ev["item_id"]) <= set(cat["item_id"])


def test_generate_rejects_bad_sizes():
    with pytest.raises(ValueError):
        generate(0, 10, 10)
    with pytest.raises(ValueError):
        generate(10, 0, 10)
    with pytest.raises(ValueError):
        generate(10, 10, 5)  # fewer events than users


# --- CLI -------------------------------------------------------------------------


def test_cli_writes_files_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--users", "20", "--items", "30", "--events", "400", "--quiet"]) == 0
    assert (out / "events.csv").is_file() and (out / "catalog.csv").is_file()
    summary = capsys.readouterr().out.strip()
    assert len(summary.splitlines()) == 1
    assert "events.csv" in summary and "catalog.csv" in summary and "400 rows" in summary
    assert len((out / "events.csv").read_text().splitlines()) == 401


def test_cli_parquet(tmp_path, capsys):
    main(["--out", str(tmp_path), "--users", "5", "--items", "5", "--events", "50", "--format", "parquet", "--quiet"])
    assert len(pd.read_parquet(tmp_path / "events.parquet")) == 50


@pytest.mark.parametrize(
    "args, message",
    [
        (["--users", "0"], "--users"),
        (["--items", "-3"], "--items"),
        (["--events", "abc"], "--events"),
        (["--events", "1.5"], "--events"),
        (["--seed", "-1"], "--seed"),
        (["--format", "xml"], "--format"),
        (["--users", "10", "--events", "5"], "--events"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_requires_out(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--out", "--users", "--items", "--events", "--seed", "--format", "--quiet"]:
        assert flag in text


# --- learnable structure ------------------------------------------------------------


def test_users_concentrate_on_few_genres(views):
    active = views.groupby("user_id").size()
    active = active[active >= 10].index
    real = _top3_coverage(views[views["user_id"].isin(active)])
    # Baseline: same users, same popularity, but titles shuffled across all views.
    shuffled = views.assign(genres=views["genres"].to_numpy()[np.random.default_rng(0).permutation(len(views))])
    baseline = _top3_coverage(shuffled[shuffled["user_id"].isin(active)])
    assert (real > 0.6).mean() > 0.85
    assert real.median() > 0.8
    assert real.median() - baseline.median() > 0.12


def test_popularity_is_long_tailed(data):
    events, catalog = data

    def shares(item_ids: pd.Series) -> tuple[float, float]:
        counts = item_ids.value_counts().reindex(catalog["item_id"], fill_value=0).sort_values(ascending=False)
        top = counts.iloc[: len(counts) // 10].sum() / counts.sum()
        bottom_half = counts.iloc[len(counts) // 2 :].sum() / counts.sum()
        return top, bottom_half

    top_views, bottom_views = shares(events["item_id"])
    # Distinct viewers, so binged shows (many views per viewer) cannot fake the skew.
    top_viewers, _ = shares(events.drop_duplicates(["user_id", "item_id"])["item_id"])
    assert top_views > 0.4
    assert top_viewers > 0.3  # uniform popularity gives ~0.17 here
    assert bottom_views < 0.15
    assert events["item_id"].nunique() > 0.5 * len(catalog)  # but the tail is still watched


def test_activity_is_heavy_tailed(data):
    events, _ = data
    per_user = events["user_id"].value_counts()
    assert per_user.min() >= 1
    assert per_user.max() > 5 * per_user.median()
    top_decile = per_user.iloc[: len(per_user) // 10].sum() / per_user.sum()
    assert top_decile > 0.3


def test_shows_are_binged_in_sessions(views):
    shows = views[views["kind"] == "show"].sort_values(["user_id", "item_id", "timestamp"])
    gap = shows.groupby(["user_id", "item_id"])["timestamp"].diff()
    same_session = gap < 3 * 3600
    # Many show views follow another episode minutes later...
    assert same_session.mean() > 0.35
    episode = shows["episode_minutes"].astype(float) * 60
    ratio = (gap / episode)[same_session & episode.notna()]
    # ...starting roughly one episode length after the previous one started.
    assert 0.85 < ratio.median() < 1.2
    assert (ratio > 0.03).all()
    # Users come back to the same show on later days.
    assert (gap > 12 * 3600).mean() > 0.1
    per_pair = shows.groupby(["user_id", "item_id"]).size()
    assert per_pair.median() >= 3


def test_films_are_watched_once_occasionally_twice(views):
    per_pair = views[views["kind"] == "film"].groupby(["user_id", "item_id"]).size()
    assert (per_pair == 1).mean() > 0.9
    assert (per_pair == 2).any()
    assert (per_pair > 2).mean() < 0.01


def test_out_of_taste_titles_are_abandoned_more(views):
    coverage_rows = views[["user_id", "genres"]].assign(row=np.arange(len(views)))
    exploded = coverage_rows.assign(genre=coverage_rows["genres"].fillna("").str.split("|")).explode("genre")
    exploded = exploded[exploded["genre"] != ""]
    counts = exploded.groupby(["user_id", "genre"]).size().rename("n").reset_index()
    counts["rank"] = counts.groupby("user_id")["n"].rank(method="first", ascending=False)
    top = counts.loc[counts["rank"] <= 2, ["user_id", "genre"]]
    in_taste = np.zeros(len(views), dtype=bool)
    in_taste[exploded.merge(top, on=["user_id", "genre"])["row"].unique()] = True

    known = views["episode_minutes"].notna().to_numpy() & views["genres"].notna().to_numpy()
    abandoned = (views["watch_seconds"] / (views["episode_minutes"].astype(float) * 60) < 0.4).to_numpy()
    rate_in = abandoned[known & in_taste].mean()
    rate_out = abandoned[known & ~in_taste].mean()
    assert rate_out > 1.5 * rate_in, (rate_in, rate_out)


def test_catalogue_rules_look_like_a_real_catalogue(data):
    """Most titles everywhere, some regional; some expiring or upcoming; a kids' share; weekly arrivals."""
    from models.data import maturity_age

    _, catalog = data
    assert 0.05 < catalog["regions"].notna().mean() < 0.3
    assert 0 < catalog["available_from"].notna().mean() < 0.1
    assert 0 < catalog["available_until"].notna().mean() < 0.15
    ages = catalog["maturity"].dropna().map(maturity_age)
    assert ages.notna().all() and 0.1 < (ages <= 7).mean() < 0.5
    kids = catalog["genres"].fillna("").str.contains("Animation|Family")
    assert (catalog.loc[kids, "maturity"].dropna().map(maturity_age) <= 7).all()
    added = pd.to_datetime(catalog["added_at"])
    assert added.notna().all() and added.dt.day_of_week.eq(0).all()  # batches arrive on Mondays
    arrived = added
    recent_weeks = arrived[arrived > arrived.max() - pd.Timedelta(days=180)].dt.isocalendar().week.nunique()
    assert recent_weeks >= 20
