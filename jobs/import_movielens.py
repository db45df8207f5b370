"""Import a MovieLens download into the recommender's data contract.

This module owns one thing: turning a MovieLens folder into the two files
the service loads, ``events.<ext>`` and ``catalog.<ext>``.

It reads two layouts and works out which one it has from the files present:

* ``ml-latest-small`` (and the other "latest"/"25m"-style downloads, which
  share the format): ``ratings.csv`` + ``movies.csv``, UTF-8 with a header.
* ``ml-100k``: ``u.data`` (tab-separated), ``u.item`` and ``u.genre``
  (pipe-separated, latin-1), no headers.

Output contract:

* events: ``user_id``, ``item_id`` (strings), ``timestamp`` (unix seconds),
  ``watch_seconds`` (always blank: MovieLens records ratings, not watch time,
  so each rating counts as one viewing), plus ``rating`` (an extra column;
  the loader ignores extras).
* catalog: ``item_id``, ``title`` (without the trailing "(YYYY)"), ``description``
  (the genres and, from ``tags.csv`` when present, the users' most used tags), ``genres``
  (pipe-separated, blank when none), ``year``, ``episode_minutes``,
  ``seasons``, ``episodes`` (blank: these are films) and ``kind`` = "film".

Every input row is checked. A bad row stops the import with the file name
and line number, and nothing is written. Usage::

    python -m jobs.import_movielens SRC --out DIR [--format csv|parquet]

Benchmarks and other jobs should call :func:`import_movielens` directly.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
import pandas as pd

LATEST_SMALL = "ml-latest-small"
ML_100K = "ml-100k"

# The files that identify each layout. All of them must be present.
LAYOUT_FILES: dict[str, tuple[str, ...]] = {
    LATEST_SMALL: ("ratings.csv", "movies.csv"),
    ML_100K: ("u.data", "u.item", "u.genre"),
}

FORMATS = ("csv", "parquet")
EVENT_COLUMNS = ["user_id", "item_id", "timestamp", "watch_seconds", "rating"]
CATALOG_COLUMNS = [
    "item_id", "title", "genres", "year",
    "episode_minutes", "seasons", "episodes", "kind", "description",
]
MAX_TAGS = 20  # most used distinct tags of a film kept in its description

# MovieLens puts the year at the end of the title: "Heat (1995)". Series have a
# range, "(2006–2007)" (en dash) or "(2007-)". For those we keep the start
# year: it is the first release year, which is what `year` means for a film.
# Titles can have trailing whitespace, and spaces inside the brackets are
# allowed. If nothing matches, the title stays as it is and the year is blank.
_TITLE_YEAR = re.compile(r"\s*\(\s*(\d{4})\s*(?:[-\u2013]\s*(?:\d{4})?\s*)?\)\s*$")
# ml-100k release dates look like "01-Jan-1995". Only the year is used, and the
# regex avoids %b, whose month names depend on the locale.
_RELEASE_DATE = re.compile(r"\d{1,2}-[A-Za-z]{3}-(\d{4})")
_NO_GENRES = "(no genres listed)"  # ml-latest-small's marker for "none"
_UNKNOWN_GENRE = "unknown"  # ml-100k's catch-all flag, which we treat as "none"
_MAX_RATING = 5.0  # every MovieLens release rates on a 0.5/1 to 5 scale
_LINE = "_line"  # the column in which _read_rows records source line numbers
# Every text column uses the nullable string dtype, explicitly. pandas 2 and 3
# have different defaults, and the files should come out the same on both.
_TEXT = "string"


class MovieLensError(Exception):
    """The base class for import failures. ``exit_code`` is the CLI exit status."""

    exit_code = 1


class LayoutError(MovieLensError):
    """SRC is not a MovieLens folder we can read (a usage error, exit 2)."""

    exit_code = 2


class MalformedRowError(MovieLensError):
    """A row or header in an input file cannot be read. Names the file and line."""

    def __init__(self, path: Path, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


class ImportResult(TypedDict):
    """What :func:`import_movielens` returns: the layout, the counts and the paths it wrote."""

    layout: str
    format: str
    events: int  # rows in the events file (one per rating)
    users: int  # distinct user_id values in events
    titles: int  # rows in the catalog (includes titles nobody rated)
    events_path: Path
    catalog_path: Path


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def import_movielens(src: Path, out: Path, fmt: str = "csv") -> ImportResult:
    """Convert the MovieLens download in ``src`` into ``out/events.<fmt>`` and ``out/catalog.<fmt>``.

    Raises :class:`LayoutError` if ``src`` is not a layout we know, and
    :class:`MalformedRowError` if any input row is invalid. All input is
    checked before anything is written, so a failed import leaves ``out``
    as it was.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}; got {fmt!r}")
    src, out = Path(src), Path(out)
    layout = detect_layout(src)
    if layout == LATEST_SMALL:
        events, catalog = _read_latest_small(src)
    else:
        events, catalog = _read_ml100k(src)

    out.mkdir(parents=True, exist_ok=True)
    events_path = out / f"events.{fmt}"
    catalog_path = out / f"catalog.{fmt}"
    _write(events, events_path, fmt)
    _write(catalog, catalog_path, fmt)
    return ImportResult(
        layout=layout,
        format=fmt,
        events=len(events),
        users=int(events["user_id"].nunique()),
        titles=len(catalog),
        events_path=events_path,
        catalog_path=catalog_path,
    )


def detect_layout(src: Path) -> str:
    """Return ``LATEST_SMALL`` or ``ML_100K`` depending on the files in ``src``.

    Raises :class:`LayoutError`, with what we expected and what we found.
    """
    expected = "; or ".join(f"{name} ({', '.join(files)})" for name, files in LAYOUT_FILES.items())
    if not src.is_dir():
        what = "does not exist" if not src.exists() else "is not a directory"
        raise LayoutError(f"{src} {what}; expected a MovieLens folder with {expected}")

    present = {p.name for p in src.iterdir() if p.is_file()}
    complete = [name for name, files in LAYOUT_FILES.items() if present.issuperset(files)]
    if len(complete) == 1:
        return complete[0]
    if len(complete) > 1:
        # This should not happen with a real download. Guessing would import
        # the wrong data without telling anyone, so stop instead.
        raise LayoutError(f"{src} has the files of both {' and '.join(complete)}; point SRC at only one of them")

    lines = [f"{src} is not a MovieLens folder we can read.", f"  expected: {expected}"]
    lines.append(f"  found: {_summarise_names(present)}")
    for name, files in LAYOUT_FILES.items():
        have = [f for f in files if f in present]
        if have:  # a partial match is most likely a broken download, so say what is missing
            missing = [f for f in files if f not in present]
            lines.append(f"  looks like {name} but is missing: {', '.join(missing)}")
    # Unzipping usually creates a folder, so users often give us its parent.
    nested = sorted(
        p.name for p in src.iterdir()
        if p.is_dir() and any({f.name for f in p.iterdir()}.issuperset(fs) for fs in LAYOUT_FILES.values())
    )
    if nested:
        lines.append(f"  hint: did you mean {src / nested[0]}?")
    raise LayoutError("\n".join(lines))


def split_titles(titles: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Split "Title (YYYY)" into (title without the year, year as nullable Int64).

    Titles without a trailing year keep their text (stripped) and get ``<NA>``.
    """
    stripped = titles.str.strip()
    year = stripped.str.extract(_TITLE_YEAR, expand=False).astype("Int64")
    bare = stripped.str.replace(_TITLE_YEAR, "", regex=True).str.strip()
    # A title that is only "(1995)" would end up empty. Keep the original text,
    # because the catalog requires a title.
    bare = bare.where(bare != "", stripped)
    return bare, year


# --------------------------------------------------------------------------
# Layout readers: each returns (events, catalog) in contract form
# --------------------------------------------------------------------------


def _read_latest_small(src: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    movies_path, ratings_path = src / "movies.csv", src / "ratings.csv"
    # utf-8-sig accepts a byte-order mark, which spreadsheet programs add when re-saving.
    movies = _read_rows(movies_path, columns=["movieId", "title", "genres"],
                        delimiter=",", encoding="utf-8-sig", header=True)
    item_id = _id_column(movies, "movieId", movies_path)
    _reject_duplicates(item_id, movies, movies_path, "movieId")
    title, year = split_titles(movies["title"])
    _reject(title == "", movies, movies_path, lambda i: "title is empty")
    genres = movies["genres"].str.strip()
    genres = genres.where((genres != "") & (genres != _NO_GENRES), None)
    catalog = _catalog_frame(item_id, title, genres, year, _film_tags(src / "tags.csv", item_id))

    ratings = _read_rows(ratings_path, columns=["userId", "movieId", "rating", "timestamp"],
                         delimiter=",", encoding="utf-8-sig", header=True)
    events = _events_frame(ratings, ratings_path, user="userId", item="movieId",
                           rating="rating", timestamp="timestamp")
    _reject_unknown_items(events, ratings, ratings_path, catalog, "movieId", movies_path.name)
    return events, catalog


def _read_ml100k(src: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    genre_path, item_path, data_path = src / "u.genre", src / "u.item", src / "u.data"

    # u.genre maps flag positions in u.item to names. The file ends with a
    # blank line, which _read_rows skips.
    genre_rows = _read_rows(genre_path, columns=["name", "index"], delimiter="|",
                            encoding="latin-1", header=False, quoting=csv.QUOTE_NONE)
    genre_index = _int_column(genre_rows, "index", genre_path, "genre index")
    order = np.argsort(genre_index.to_numpy(), kind="stable")
    if sorted(genre_index) != list(range(len(genre_index))):
        raise MalformedRowError(genre_path, None, f"genre indices must be 0..{len(genre_index) - 1} with no gaps "
                                f"or repeats; found {sorted(genre_index)}")
    genre_names = genre_rows["name"].str.strip().to_numpy()[order]

    # u.item: id | title | release date | video release date | IMDb URL | one 0/1 flag per genre.
    # QUOTE_NONE because the file never quotes fields and some titles contain a '"'.
    flag_columns = [f"flag_{i}" for i in range(len(genre_names))]
    items = _read_rows(item_path,
                       columns=["movie_id", "title", "release_date", "video_release_date", "imdb_url", *flag_columns],
                       delimiter="|", encoding="latin-1", header=False, quoting=csv.QUOTE_NONE)
    item_id = _id_column(items, "movie_id", item_path)
    _reject_duplicates(item_id, items, item_path, "movie id")
    title, title_year = split_titles(items["title"])
    _reject(title == "", items, item_path, lambda i: "title is empty")

    release = items["release_date"].str.strip()
    release_year = release.str.extract(f"^{_RELEASE_DATE.pattern}$", expand=False)
    _reject((release != "") & release_year.isna(), items, item_path,
            lambda i: f"release date {release.iat[i]!r} is not like 01-Jan-1995")
    # The release date decides the year. Only when it is blank do we use the title's "(YYYY)".
    year = release_year.astype("Int64").fillna(title_year)

    flags = items[flag_columns]
    bad_flag = ~flags.isin(["0", "1"])
    if bad_flag.to_numpy().any():
        row, col = (int(x[0]) for x in np.nonzero(bad_flag.to_numpy()))
        raise MalformedRowError(item_path, int(items[_LINE].iat[row]),
                                f"flag for genre {genre_names[col]!r} is {flags.iat[row, col]!r}, expected 0 or 1")
    # "unknown" is MovieLens' way of saying "no genre", so it does not become a genre name.
    keep = np.array([name.lower() != _UNKNOWN_GENRE for name in genre_names])
    on = (flags.to_numpy() == "1") & keep
    joined = ["|".join(genre_names[row]) for row in on]
    genres = pd.Series(joined, index=items.index, dtype=object)
    genres = genres.where(genres != "", None)
    catalog = _catalog_frame(item_id, title, genres, year)

    ratings = _read_rows(data_path, columns=["user_id", "item_id", "rating", "timestamp"],
                         delimiter="\t", encoding="latin-1", header=False, quoting=csv.QUOTE_NONE)
    events = _events_frame(ratings, data_path, user="user_id", item="item_id",
                           rating="rating", timestamp="timestamp")
    _reject_unknown_items(events, ratings, data_path, catalog, "item id", item_path.name)
    return events, catalog


def _events_frame(rows: pd.DataFrame, path: Path, *, user: str, item: str,
                  rating: str, timestamp: str) -> pd.DataFrame:
    user_id = _id_column(rows, user, path)
    item_id = _id_column(rows, item, path)
    seconds = _int_column(rows, timestamp, path, "timestamp")
    ratings = pd.to_numeric(rows[rating].str.strip(), errors="coerce")
    _reject(ratings.isna() | (ratings < 0) | (ratings > _MAX_RATING), rows, path,
            lambda i: f"rating {rows[rating].iat[i]!r} is not a number between 0 and {_MAX_RATING:g}")
    return pd.DataFrame({
        "user_id": user_id,
        "item_id": item_id,
        "timestamp": seconds,
        # The column is present but empty, so the file says outright that
        # there is no watch time, and the loader counts each row as one viewing.
        "watch_seconds": pd.array([pd.NA] * len(rows), dtype="Int64"),
        "rating": ratings.astype("float64"),
    }, columns=EVENT_COLUMNS).reset_index(drop=True)


def _film_tags(path: Path, item_id: pd.Series) -> pd.Series:
    """Each film's users' tags (``tags.csv``, optional): the most used distinct ones, lower-cased, comma-joined."""
    if not path.is_file():
        return pd.Series([""] * len(item_id), index=item_id.index, dtype=object)
    rows = _read_rows(path, columns=["userId", "movieId", "tag", "timestamp"], delimiter=",", encoding="utf-8-sig", header=True)
    tags = rows["tag"].astype(str).str.strip().str.lower()
    frame = pd.DataFrame({"item": rows["movieId"].astype(str).str.strip(), "tag": tags})
    frame = frame[(frame["tag"] != "") & (frame["tag"] != "nan")]
    counted = frame.groupby(["item", "tag"]).size().rename("n").reset_index().sort_values(["item", "n", "tag"], ascending=[True, False, True])
    joined = counted.groupby("item")["tag"].apply(lambda t: ", ".join(t.head(MAX_TAGS)))
    return item_id.astype(str).map(joined).fillna("")


def _description(genres: pd.Series, tags: pd.Series | None) -> pd.Series:
    """The text the job embeds next to the title: genres, then the users' tags."""
    named = genres.fillna("").astype(str).str.replace("|", ", ", regex=False)
    text = named.where(named == "", "Genres: " + named + ".")
    if tags is not None:
        text = (text + tags.where(tags == "", " Tags: " + tags + ".")).str.strip()
    return text.where(text != "", None)  # nothing to say: blank, in CSV and Parquet alike


def _catalog_frame(item_id: pd.Series, title: pd.Series, genres: pd.Series, year: pd.Series,
                   tags: pd.Series | None = None) -> pd.DataFrame:
    n = len(item_id)
    blank = pd.array([pd.NA] * n, dtype="Int64")  # films have no episodes or seasons
    return pd.DataFrame({
        "item_id": item_id.astype(_TEXT),
        "title": title.astype(_TEXT),
        "genres": genres.astype(_TEXT),  # None becomes <NA>, which is written as blank
        "year": year.astype("Int64"),
        "episode_minutes": blank,
        "seasons": blank.copy(),
        "episodes": blank.copy(),
        "kind": pd.Series(["film"] * n, dtype=_TEXT, index=item_id.index),
        "description": _description(genres, tags).astype(_TEXT),
    }, columns=CATALOG_COLUMNS).reset_index(drop=True)


# --------------------------------------------------------------------------
# Reading and validating rows
# --------------------------------------------------------------------------


def _read_rows(path: Path, *, columns: list[str], delimiter: str, encoding: str,
               header: bool, quoting: int = csv.QUOTE_MINIMAL) -> pd.DataFrame:
    """Read a delimited file into text columns, and record each row's line number in ``_LINE``.

    With ``header=True`` the header must include ``columns`` (in any order;
    extra columns are dropped). Otherwise rows are positional and must have
    exactly ``len(columns)`` fields. Blank lines are skipped.

    We use the ``csv`` module rather than ``pandas.read_csv`` because pandas
    fills short rows with blanks and can drop extra fields with only a
    warning. Both are exactly the malformed rows we have to report.
    """
    rows: list[list[str]] = []
    lines: list[int] = []
    start = 1  # the line the current record starts on (the header, at first)
    try:
        with path.open(encoding=encoding, newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter, quoting=quoting, strict=True)
            if header:
                names = next(reader, None)
                if names is None:
                    raise MalformedRowError(path, 1, "file is empty; expected a header row")
                names = [n.strip() for n in names]
                missing = [c for c in columns if c not in names]
                if missing:
                    raise MalformedRowError(path, 1, f"header lacks {', '.join(missing)}; "
                                            f"expected {','.join(columns)}, found {','.join(names)}")
                width, positions = len(names), [names.index(c) for c in columns]
            else:
                width, positions = len(columns), list(range(len(columns)))
            # reader.line_num is the line a record *ends* on. We report the line
            # it starts on, because a stray quote can swallow many lines after it.
            start = reader.line_num + 1
            for row in reader:
                first, start = start, reader.line_num + 1
                if not row:  # the csv module returns [] for an empty line
                    continue
                if len(row) != width:
                    raise MalformedRowError(path, first,
                                            f"expected {width} fields separated by {delimiter!r}, found {len(row)}"
                                            + _runs_on(first, reader.line_num))
                rows.append([row[p] for p in positions])
                lines.append(first)
    except csv.Error as exc:
        raise MalformedRowError(path, start, f"{exc}{_runs_on(start, reader.line_num)}") from exc
    except UnicodeDecodeError as exc:
        raise MalformedRowError(path, _line_of_decode_error(path, encoding), f"not valid {encoding}: {exc.reason}") from exc

    frame = pd.DataFrame(rows, columns=columns, dtype=object)
    frame[_LINE] = np.asarray(lines, dtype=np.int64)
    return frame


def _runs_on(first: int, last: int) -> str:
    # Explains line numbers that seem too far apart: a quoted field that
    # never closes swallows the lines after it.
    return f" (a quoted field starting here runs on to line {last})" if last > first else ""


def _line_of_decode_error(path: Path, encoding: str) -> int | None:
    # The decoder reads ahead in blocks, so reader.line_num is wrong at this
    # point. Decoding the raw bytes finds the exact offset, which gives the line.
    data = path.read_bytes()
    try:
        data.decode(encoding)
    except UnicodeDecodeError as exc:
        return data.count(b"\n", 0, exc.start) + 1
    return None


def _reject(bad: pd.Series, rows: pd.DataFrame, path: Path, describe: Callable[[int], str]) -> None:
    """Raise for the first row where ``bad`` is True. ``describe`` is given its position."""
    mask = np.asarray(bad, dtype=bool)
    if mask.any():
        pos = int(np.argmax(mask))
        raise MalformedRowError(path, int(rows[_LINE].iat[pos]), describe(pos))


def _int_column(rows: pd.DataFrame, column: str, path: Path, label: str) -> pd.Series:
    raw = rows[column].str.strip()
    _reject(~raw.str.fullmatch(r"\d+"), rows, path,
            lambda i: f"{label} {rows[column].iat[i]!r} is not a non-negative integer")
    return raw.astype("int64")


def _id_column(rows: pd.DataFrame, column: str, path: Path) -> pd.Series:
    # Round-tripping through int gives one canonical spelling ("007" -> "7"),
    # so ids in events always match ids in the catalog.
    return _int_column(rows, column, path, column).astype(_TEXT)


def _reject_duplicates(ids: pd.Series, rows: pd.DataFrame, path: Path, label: str) -> None:
    _reject(ids.duplicated(), rows, path, lambda i: f"{label} {ids.iat[i]} appears more than once")


def _reject_unknown_items(events: pd.DataFrame, rows: pd.DataFrame, path: Path,
                          catalog: pd.DataFrame, label: str, catalog_file: str) -> None:
    # An event for a title that is not in the catalog means the files do not
    # belong together (e.g. from different downloads). The loader would
    # silently drop those events, so we refuse.
    unknown = ~events["item_id"].isin(catalog["item_id"])
    _reject(unknown, rows, path, lambda i: f"{label} {events['item_id'].iat[i]} is not in {catalog_file}")


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _write(frame: pd.DataFrame, path: Path, fmt: str) -> None:
    # Write to a temporary file and rename it into place, so a crash during
    # the write never leaves a truncated file for the loader to read.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if fmt == "csv":
            frame.to_csv(tmp, index=False, encoding="utf-8")
        else:
            frame.to_parquet(tmp, index=False, engine="pyarrow")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _summarise_names(names: set[str], limit: int = 12) -> str:
    if not names:
        return "no files"
    shown = sorted(names)
    more = f", … (+{len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.import_movielens",
        description="Convert a MovieLens download into events and catalog files in the "
                    "project's data contract. Each rating becomes one viewing event "
                    "(watch_seconds is left blank).",
        epilog="Layouts: ml-latest-small (ratings.csv, movies.csv) or ml-100k (u.data, u.item, u.genre), "
               "detected from the files in SRC. "
               "Exit status: 0 ok, 1 malformed input row, 2 bad arguments or unrecognised SRC.",
    )
    parser.add_argument("src", type=Path, metavar="SRC", help="folder of an unpacked MovieLens download")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="folder for events.<ext> and catalog.<ext> (created if needed; existing files are replaced)")
    parser.add_argument("--format", choices=FORMATS, default="csv", dest="fmt",
                        help="output file format (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = import_movielens(args.src, args.out, args.fmt)
    except MovieLensError as exc:
        print(f"import_movielens: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"Imported {result['layout']} from {args.src}")
    print(f"  events:  {result['events']} rows from {result['users']} users -> {result['events_path']}")
    print(f"  catalog: {result['titles']} titles -> {result['catalog_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
