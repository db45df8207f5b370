"""Tests for jobs.import_movielens: both layouts, edge cases, errors, the CLI and the real dataset.

The fixtures under tests/fixtures/movielens/ are invented (no MovieLens rows:
the licence forbids redistributing them). The real-data test reads
ml-latest-small from the shared datasets folder next to the repo, and skips
if that folder is absent.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from jobs.import_movielens import (
    CATALOG_COLUMNS,
    EVENT_COLUMNS,
    LayoutError,
    MalformedRowError,
    import_movielens,
    main,
    split_titles,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "movielens"
LATEST_SMALL = FIXTURES / "latest_small"
ML100K = FIXTURES / "ml100k"
REAL_LATEST_SMALL = REPO_ROOT.parent / "shared" / "datasets" / "ml-latest-small"


def read_csv_as_text(path: Path) -> list[dict[str, str]]:
    """Read a CSV exactly as written: every cell as text, blanks as ""."""
    return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")


def film(item_id: str, title: str, genres: str, year: str, tags: str = "") -> dict[str, str]:
    """An expected catalog row as CSV text. MovieLens titles are films with no episodes; the description
    is the genres and the users' tags (none in the fixtures unless given)."""
    described = " ".join(part for part in (
        f"Genres: {genres.replace('|', ', ')}." if genres else "", f"Tags: {tags}." if tags else "") if part)
    return {"item_id": item_id, "title": title, "genres": genres, "year": year,
            "episode_minutes": "", "seasons": "", "episodes": "", "kind": "film", "description": described}


def event(user_id: str, item_id: str, timestamp: str, rating: str) -> dict[str, str]:
    """An expected event row as CSV text. watch_seconds is always blank."""
    return {"user_id": user_id, "item_id": item_id, "timestamp": timestamp,
            "watch_seconds": "", "rating": rating}


# --------------------------------------------------------------------------
# ml-latest-small layout
# --------------------------------------------------------------------------


def test_latest_small_catalog_handles_title_edge_cases(tmp_path: Path) -> None:
    result = import_movielens(LATEST_SMALL, tmp_path)

    assert list(pd.read_csv(result["catalog_path"], nrows=0).columns) == CATALOG_COLUMNS
    assert read_csv_as_text(result["catalog_path"]) == [
        film("1", "Harbor Lights", "Drama|Romance", "1994"),
        film("2", "Clockwork Garden, The", "Fantasy|Sci-Fi", "2001"),  # quoted, comma in title
        film("3", "Untitled Lighthouse Project", "", ""),  # no year; "(no genres listed)"
        film("4", "Paper Moons", "Comedy", "2007"),  # open series range "(2007-)"
        film("5", "Quiet Storm", "Documentary", "2015"),  # trailing whitespace after the year
        film("6", "Café Nocturne", "Crime|Mystery", "2003"),  # UTF-8
        film("7", "Shadow Play (Jeu d'ombres)", "Drama", "1999"),  # only the last (...) is the year
        film("8", "Kettle, Cat and Compass", "Animation|Children", "2010"),  # "(2010–2012)" en dash
    ]


def test_latest_small_events_are_one_viewing_per_rating(tmp_path: Path) -> None:
    result = import_movielens(LATEST_SMALL, tmp_path)

    assert list(pd.read_csv(result["events_path"], nrows=0).columns) == EVENT_COLUMNS
    assert read_csv_as_text(result["events_path"]) == [
        event("1", "1", "1100000000", "4.0"),
        event("1", "2", "1100000060", "3.5"),
        event("1", "3", "1100000120", "5.0"),
        event("2", "1", "1200000000", "2.5"),
        event("2", "4", "1200000300", "0.5"),
        event("3", "5", "1300000000", "4.0"),
        event("3", "2", "1300000010", "4.5"),
        event("3", "8", "1300000020", "3.0"),
    ]
    assert result == {
        "layout": "ml-latest-small", "format": "csv",
        "events": 8, "users": 3, "titles": 8,  # titles 6 and 7 are unrated but still in the catalog
        "events_path": tmp_path / "events.csv", "catalog_path": tmp_path / "catalog.csv",
    }


def test_latest_small_reads_columns_by_header_name(tmp_path: Path) -> None:
    src = copy_fixture(LATEST_SMALL, tmp_path)
    ratings = pd.read_csv(src / "ratings.csv", dtype=str)
    ratings[["timestamp", "rating", "movieId", "userId"]].to_csv(src / "ratings.csv", index=False)

    result = import_movielens(src, tmp_path / "out")

    assert read_csv_as_text(result["events_path"])[0] == event("1", "1", "1100000000", "4.0")


# --------------------------------------------------------------------------
# ml-100k layout
# --------------------------------------------------------------------------


def test_ml100k_catalog_uses_release_date_and_genre_flags(tmp_path: Path) -> None:
    result = import_movielens(ML100K, tmp_path)

    assert read_csv_as_text(result["catalog_path"]) == [
        film("1", "Harbor Lights", "Drama|Romance", "1994"),
        film("2", "Amélie des Neiges", "Comedy|Romance", "1999"),  # latin-1 in, UTF-8 out
        film("3", "Night Ferry", "Thriller", "1996"),  # no release date: year from title
        film("4", "Lantern Street", "", ""),  # no date, no title year; "unknown" genre only
        film("5", "Copper Canyon", "Western", "1996"),  # the date (1996) wins over the title (1995); unknown dropped
        film("6", "Children's Hour Again", "Children's|Musical", "1997"),
    ]
    # The output is UTF-8 whatever the input encoding was.
    assert "Amélie" in result["catalog_path"].read_text(encoding="utf-8")


def test_ml100k_events(tmp_path: Path) -> None:
    result = import_movielens(ML100K, tmp_path)

    assert read_csv_as_text(result["events_path"]) == [
        event("7", "1", "880000000", "4.0"),
        event("7", "2", "880000100", "5.0"),
        event("12", "3", "881000000", "1.0"),
        event("12", "1", "881000050", "3.0"),
        event("30", "5", "882000000", "2.0"),
        event("30", "6", "882000500", "5.0"),
        event("7", "4", "880000200", "3.0"),
    ]
    assert (result["layout"], result["events"], result["users"], result["titles"]) == ("ml-100k", 7, 3, 6)


# --------------------------------------------------------------------------
# Formats and title parsing
# --------------------------------------------------------------------------


@pytest.mark.parametrize("src", [LATEST_SMALL, ML100K], ids=["latest_small", "ml100k"])
def test_parquet_holds_the_same_data_as_csv(src: Path, tmp_path: Path) -> None:
    as_csv = import_movielens(src, tmp_path / "csv")
    as_parquet = import_movielens(src, tmp_path / "parquet", fmt="parquet")

    assert as_parquet["events_path"] == tmp_path / "parquet" / "events.parquet"
    for key in ("events_path", "catalog_path"):
        from_parquet = pd.read_parquet(as_parquet[key])
        from_csv = pd.read_csv(as_csv[key], dtype=from_parquet.dtypes.to_dict())
        pd.testing.assert_frame_equal(from_parquet, from_csv)
    events = pd.read_parquet(as_parquet["events_path"])
    assert events["timestamp"].dtype == "int64"
    assert events["watch_seconds"].isna().all()


def test_unknown_format_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="csv, parquet"):
        import_movielens(LATEST_SMALL, tmp_path, fmt="json")


@pytest.mark.parametrize(("raw", "title", "year"), [
    ("Heat (1995)", "Heat", 1995),
    ("Heat (1995)  ", "Heat", 1995),
    ("Heat ( 1995 )", "Heat", 1995),
    ("Some Show (2007-)", "Some Show", 2007),
    ("Some Show (2006\u20132007)", "Some Show", 2006),
    ("No Year Here", "No Year Here", None),
    ("Year (1995) Not At End", "Year (1995) Not At End", None),
    ("Big Number (12345)", "Big Number (12345)", None),
    ("(1995)", "(1995)", 1995),  # stripping would leave no title, so keep it
])
def test_split_titles(raw: str, title: str, year: int | None) -> None:
    titles, years = split_titles(pd.Series([raw], dtype="string"))
    assert titles.iat[0] == title
    assert (None if pd.isna(years.iat[0]) else int(years.iat[0])) == year


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_unrecognised_folder_names_expected_and_found_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")

    with pytest.raises(LayoutError) as excinfo:
        import_movielens(tmp_path, tmp_path / "out")

    message = str(excinfo.value)
    for expected in ("ml-latest-small", "ratings.csv", "movies.csv", "ml-100k", "u.data", "u.item", "u.genre"):
        assert expected in message
    assert "found: notes.txt, ratings.csv" in message
    assert "missing: movies.csv" in message
    assert not (tmp_path / "out").exists()


def test_parent_folder_gets_a_hint(tmp_path: Path) -> None:
    copy_fixture(LATEST_SMALL, tmp_path, name="ml-latest-small")
    with pytest.raises(LayoutError, match="did you mean .*ml-latest-small"):
        import_movielens(tmp_path, tmp_path / "out")


def test_missing_folder_is_a_layout_error(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="does not exist"):
        import_movielens(tmp_path / "nope", tmp_path / "out")


def test_cli_bad_layout_exits_2_with_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a MovieLens folder" in err
    assert "found: no files" in err


# Each case: fixture, file, line number to replace, replacement text, words the error must contain.
MALFORMED_CASES = [
    (LATEST_SMALL, "ratings.csv", 3, "1,abc,3.5,1100000060", "movieId 'abc' is not a non-negative integer"),
    (LATEST_SMALL, "ratings.csv", 4, "1,3,5.0", "expected 4 fields"),
    (LATEST_SMALL, "ratings.csv", 5, "2,1,7.5,1200000000", "rating '7.5'"),
    (LATEST_SMALL, "ratings.csv", 2, "1,99,4.0,1100000000", "movieId 99 is not in movies.csv"),
    (LATEST_SMALL, "ratings.csv", 1, "user,movie,rating,timestamp", "header lacks userId, movieId"),
    (LATEST_SMALL, "movies.csv", 1, 'movieId,"title"x,genres', "',' expected after '\"'"),
    (LATEST_SMALL, "movies.csv", 4, "1,Duplicate (2000),Drama", "movieId 1 appears more than once"),
    (LATEST_SMALL, "movies.csv", 3, '2,"Unclosed, The (2001),Drama', "quoted field starting here runs on to line 9"),
    (LATEST_SMALL, "movies.csv", 5, "4,Paper Moons (2007-),Comedy,extra", "expected 3 fields"),
    (ML100K, "u.data", 2, "7\t2\t5", "expected 4 fields"),
    (ML100K, "u.data", 3, "12\t3\t1\tyesterday", "timestamp 'yesterday'"),
    (ML100K, "u.item", 2, "2|Short Row (1999)|12-Mar-1999", "expected 24 fields"),
    (ML100K, "u.item", 3,
     "3|Night Ferry (1996)|sometime|||" + "|".join(["0"] * 19), "release date 'sometime'"),
    (ML100K, "u.item", 4,
     "4|Lantern Street||||" + "|".join(["0"] * 18 + ["x"]), "flag for genre 'Western' is 'x'"),
    (ML100K, "u.genre", 2, "Action|one", "genre index 'one'"),
]


@pytest.mark.parametrize(("fixture", "filename", "line", "text", "problem"), MALFORMED_CASES,
                         ids=[f"{c[1]}:{c[2]}:{c[4][:24]}" for c in MALFORMED_CASES])
def test_malformed_row_names_file_and_line(
    fixture: Path, filename: str, line: int, text: str, problem: str, tmp_path: Path,
) -> None:
    src = copy_fixture(fixture, tmp_path)
    replace_line(src / filename, line, text)

    with pytest.raises(MalformedRowError) as excinfo:
        import_movielens(src, tmp_path / "out")

    assert excinfo.value.path == src / filename
    assert excinfo.value.line == line
    assert f"{filename}, line {line}: " in str(excinfo.value)
    assert problem in str(excinfo.value)
    assert not (tmp_path / "out").exists()  # nothing is written when the input is bad


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    src = copy_fixture(LATEST_SMALL, tmp_path)
    with (src / "movies.csv").open("ab") as handle:
        handle.write(b"9,Caf\xe9 Latin-1 (2004),Drama\n")  # latin-1 bytes in a UTF-8 file: line 10

    with pytest.raises(MalformedRowError, match=r"movies\.csv, line 10: not valid utf-8"):
        import_movielens(src, tmp_path / "out")


def test_cli_malformed_row_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_fixture(ML100K, tmp_path)
    replace_line(src / "u.data", 6, "30\t6\tfive\t882000500")

    assert main([str(src), "--out", str(tmp_path / "out")]) == 1
    assert "u.data, line 6: rating 'five'" in capsys.readouterr().err


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def test_cli_runs_as_module_and_prints_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.import_movielens", str(ML100K), "--out", str(out), "--format", "parquet"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )

    assert proc.returncode == 0, proc.stderr
    assert "Imported ml-100k" in proc.stdout
    assert f"7 rows from 3 users -> {out / 'events.parquet'}" in proc.stdout
    assert f"6 titles -> {out / 'catalog.parquet'}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["catalog.parquet", "events.parquet"]


def test_cli_help_explains_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    help_text = capsys.readouterr().out
    for word in ("SRC", "--out", "--format", "csv", "parquet", "ml-latest-small", "ml-100k", "Exit status"):
        assert word in help_text


# --------------------------------------------------------------------------
# Real dataset
# --------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_LATEST_SMALL.is_dir(), reason=f"real ml-latest-small not found at {REAL_LATEST_SMALL}")
def test_real_ml_latest_small(tmp_path: Path) -> None:
    result = import_movielens(REAL_LATEST_SMALL, tmp_path)

    assert (result["layout"], result["events"], result["users"], result["titles"]) == (
        "ml-latest-small", 100836, 610, 9742)
    catalog = pd.read_csv(result["catalog_path"], dtype={"item_id": str, "title": str})
    events = pd.read_csv(result["events_path"], dtype={"user_id": str, "item_id": str})
    assert len(catalog) == 9742 and catalog["item_id"].is_unique
    assert len(events) == 100836 and events["user_id"].nunique() == 610
    assert events["item_id"].isin(catalog["item_id"]).all()
    # Every title lost its "(YYYY)", and the years that were found are plausible.
    assert not catalog["title"].str.contains(r"\(\d{4}\)\s*$").any()
    assert catalog["year"].dropna().between(1870, 2030).all()
    assert (catalog["kind"] == "film").all()


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def copy_fixture(fixture: Path, tmp_path: Path, name: str = "src") -> Path:
    """Copy a fixture folder so a test can change it without touching the originals."""
    return Path(shutil.copytree(fixture, tmp_path / name))


def replace_line(path: Path, line: int, text: str) -> None:
    """Replace 1-based ``line`` of ``path``, keeping the file's encoding (latin-1 is byte-safe for both)."""
    lines = path.read_bytes().decode("latin-1").split("\n")
    lines[line - 1] = text
    path.write_bytes("\n".join(lines).encode("latin-1"))


def test_latest_small_descriptions_carry_the_users_tags(tmp_path: Path) -> None:
    src = copy_fixture(LATEST_SMALL, tmp_path / "src")
    (src / "tags.csv").write_text(
        "userId,movieId,tag,timestamp\n1,1,Lighthouse,1\n2,1,lighthouse,2\n2,1,slow burn,3\n3,2,Robots,4\n3,9,unknown film,5\n"
    )
    rows = read_csv_as_text(import_movielens(src, tmp_path / "out")["catalog_path"])
    assert rows[0]["description"] == "Genres: Drama, Romance. Tags: lighthouse, slow burn."  # most used first
    assert rows[1]["description"] == "Genres: Fantasy, Sci-Fi. Tags: robots."
    assert rows[2]["description"] == ""  # no genres, no tags: blank
