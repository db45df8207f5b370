"""Synthetic demo data for the recommender: a watch log and a catalogue.

This module owns the demo-data generator and its CLI::

    python -m jobs.make_demo_data --out DIR [--users N] [--items N] [--events N]
                                  [--seed S] [--format csv|parquet] [--quiet]

It writes ``DIR/events.<ext>`` and ``DIR/catalog.<ext>`` in the data contract
read by :mod:`models.data`:

events   ``user_id`` ("u000123"), ``item_id`` ("t00042"), ``timestamp`` (unix
         seconds), ``watch_seconds`` (0 <= s <= episode length); one row per
         viewing (one episode of a show or one film), sorted by timestamp.
catalog  ``item_id``, ``title``, ``kind`` ("show"/"film"), ``genres``
         (pipe-separated), ``year``, ``episode_minutes``, ``seasons``,
         ``episodes``; about 2% of the optional values are blank on purpose;
         and the catalogue rules ``maturity``, ``regions``,
         ``available_from``/``available_until``, ``added_at`` (see
         :func:`_catalog_rules`).

The data has structure a recommender can learn: titles have 1-3 of 18 genres,
one or two of 24 themes (told in a ``description`` synopsis, in varied words)
and a Zipf-like popularity; each user has 1-3 favourite genres, one or two
favourite themes and a heavy-tailed activity level; most picks come from the
favourite genres, and within them many from the favourite themes; shows
are binged (consecutive episodes one episode length apart, sessions repeated
over days), films are watched once, occasionally twice; viewings are abandoned
early more often for titles outside the user's tastes.

Generation is vectorised with numpy (loops only over genres, retry rounds and
output chunks), so 20M events take well under two minutes. Ids are 0-based and
zero-padded. Everything derives from ``--seed`` and a fixed reference date, so
the same arguments always give byte-identical files.

Public API: :func:`generate` (DataFrames, for tests and small sizes) and
:func:`write_demo_data` (chunked writing, used by the CLI).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

DEFAULT_USERS = 5_000
DEFAULT_ITEMS = 2_000
DEFAULT_EVENTS = 300_000
DEFAULT_SEED = 42
FORMATS = ("csv", "parquet")

# Fixed "now" (2026-07-01T00:00:00Z) instead of the wall clock, so output is reproducible.
REFERENCE_TS = 1_782_864_000
WINDOW_DAYS = 180
DAY = 86_400

GENRES = (
    "Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary",
    "Drama", "Family", "Fantasy", "History", "Horror", "Music",
    "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
# Relative frequency of each genre, both in the catalogue and among user tastes:
# a few big genres (Drama, Comedy) and a tail of niche ones (War, Western).
GENRE_WEIGHTS = np.array(
    [1.6, 0.9, 0.7, 2.4, 1.4, 0.8, 3.0, 0.7, 0.8, 0.4, 0.9, 0.3, 0.9, 1.3, 1.0, 1.6, 0.3, 0.25]
)

# Themes: what a title is about beyond its genres. Each title has one or two, each viewer one or
# two favourites, and picks within a favourite genre lean to a favourite theme (THEME_PULL), so a
# synopsis carries taste signal that genre tags do not. Each theme has several phrasings, so no
# single word gives it away.
THEMES = {
    "heist": ("a daring heist", "a vault robbery timed to the second", "a crew of safecrackers planning one last job", "thieves after a priceless diamond"),
    "space": ("a voyage between distant stars", "astronauts stranded aboard a failing station", "a colony on a frozen moon", "the crew of a starship far from Earth"),
    "courtroom": ("a trial that divides the nation", "a young lawyer defending the indefensible", "jurors locked in deliberation", "a judge with a secret"),
    "village": ("a sleepy village where everyone knows everyone", "a rural community shaken by a stranger", "life on the main street of a tiny town", "neighbours in a quiet farming hamlet"),
    "royalty": ("intrigue at a royal court", "a princess who refuses the throne", "rival heirs to an ancient crown", "the king's most trusted adviser"),
    "sea": ("a fishing boat caught in a storm", "divers exploring a sunken wreck", "a lighthouse keeper on a lonely coast", "sailors lost far from any harbour"),
    "sleuth": ("a weary inspector chasing a killer", "a private eye with one last case", "clues hidden in a bundle of old letters", "an amateur investigator and a locked-room puzzle"),
    "kin": ("three generations under one roof", "siblings reunited for a funeral", "a father learning to raise his daughter alone", "a family business on the brink"),
    "kitchen": ("a chef fighting for her restaurant", "recipes passed down from a grandmother", "a food truck crossing the country", "rivalry among cooks in a busy kitchen"),
    "sport": ("an underdog team chasing the championship", "a boxer's comeback", "a coach who believes in misfits", "the final season of a star athlete"),
    "front": ("soldiers behind enemy lines", "a nurse at the front", "resistance fighters in an occupied city", "the last days of a long war"),
    "stage": ("a band on its first tour", "a pianist preparing for the competition of her life", "a singer discovered in a small bar", "an orchestra on the edge of bankruptcy"),
    "campus": ("the last year of high school", "a new teacher at a troubled school", "friends at a strict boarding school", "a mystery among university students"),
    "wild": ("lost in the wilderness with no supplies", "survivors of a plane crash in the mountains", "a hiker trapped by a blizzard", "castaways on a deserted island"),
    "loop": ("a machine that sends her back ten years", "a man reliving the same day again and again", "letters arriving from the future", "a fold in time nobody else notices"),
    "power": ("a campaign for the presidency", "a scandal in parliament", "a spy inside the ministry", "a struggle for control of the capital"),
    "haunt": ("a house with a dark past", "whispers in an abandoned asylum", "a ghost who will not leave", "strange noises in the old manor"),
    "road": ("two strangers sharing a long drive", "a journey across the desert in an old van", "a cross-country trip to scatter ashes", "friends on the highway with no plan"),
    "ward": ("doctors in an overwhelmed emergency room", "a surgeon facing an impossible choice", "an outbreak spreading through the city", "nurses on the night shift"),
    "android": ("an artificial mind that wants to be free", "robots working alongside people", "a programmer and her creation", "a city run by algorithms"),
    "syndicate": ("a crime family's rise and fall", "an informant inside the syndicate", "a boss planning his succession", "debts owed to dangerous people"),
    "gallery": ("a forger copying the old masters", "a painter's final exhibition", "a stolen sculpture and a shady art dealer", "students at a famous art academy"),
    "ruins": ("an expedition to a lost temple", "archaeologists unearthing an ancient city", "a map leading to forgotten ruins", "treasure hunters deep in the jungle"),
    "vengeance": ("a woman returning to settle old scores", "a betrayal that demands payback", "a long-planned act of vengeance", "a brother seeking justice for his sister"),
}
THEME_NAMES = tuple(THEMES)
THEME_PULL = 0.8  # share of a viewer's in-genre picks that also match one of her favourite themes
TONES = (
    "A story of courage and doubt.", "Told over one unforgettable summer.", "Nothing is what it seems.",
    "Funny, tender and sharp.", "Every choice has a price.", "Based on a true story.", "Old friendships are tested.",
    "A slow burn with a shocking end.", "Loyalties shift by the hour.", "Hope survives in unlikely places.",
)  # fmt: skip

# Catalogue shape.
SHOW_SHARE = 0.35
BLANK_SHARE = 0.02  # share of blank values in each optional catalogue column
ZIPF_EXPONENT = 1.05
YEAR_MIN, YEAR_MAX = 1960, 2026
YEAR_RECENCY_SCALE = 9.0  # mean age in years of a title

# User behaviour.
ACTIVITY_SIGMA = 1.2  # lognormal spread of users' activity levels
ACTIVITY_CAP = 12.0  # no user is more than this many times the mean activity
FAVOURITE_SHARE = (0.78, 0.92)  # per-user share of picks from favourite genres
MEAN_SHOW_EPISODES_IN_TASTE = 9.0  # episodes watched of a show the user likes
MEAN_SHOW_EPISODES_OUT_OF_TASTE = 2.5
FILM_REWATCH_SHARE = 0.04
ABANDON_IN_TASTE = 0.08
ABANDON_OUT_OF_TASTE = 0.25
SESSION_BREAK_SHARE = 0.3  # chance that the next episode waits for another day
DEDUP_RETRIES = 8  # resampling rounds for a title the user already picked

# Viewing activity by hour of day (UTC): quiet nights, prime-time evenings.
HOUR_WEIGHTS = np.array(
    [2.0, 1.2, 0.7, 0.4, 0.3, 0.3, 0.4, 0.6, 0.8, 1.0, 1.1, 1.2,
     1.4, 1.4, 1.4, 1.5, 1.7, 2.1, 2.8, 3.6, 4.2, 4.0, 3.4, 2.6]
)  # fmt: skip

ADJECTIVES = (
    "Silent", "Crimson", "Hidden", "Broken", "Golden", "Last", "Lost", "Dark",
    "Wild", "Frozen", "Burning", "Hollow", "Quiet", "Electric", "Savage", "Gentle",
    "Secret", "Final", "Distant", "Iron", "Velvet", "Shattered", "Endless", "Scarlet",
    "Midnight", "Northern", "Forgotten", "Restless", "Bitter", "Brave", "Fallen", "Silver",
    "Wicked", "Little", "Lonely", "Eternal", "Painted", "Stolen", "Hungry", "Bright",
    "Twisted", "Perfect", "Sleeping", "Rising", "Falling", "Crooked", "Emerald", "Lunar",
    "Sacred", "Reckless", "Paper", "Glass", "Neon", "Ashen", "Southern", "Invisible",
    "Borrowed", "Sunken", "Violet", "Winter", "Summer", "Blue", "Black", "White",
    "Red", "Open", "Deep", "Long", "Second", "Lucky", "Cold", "Strange",
    "Royal", "Wandering", "Smoking", "Tender", "Fearless", "Ruthless", "Hard", "Haunted",
)  # fmt: skip
NOUNS = (
    "Harbor", "Protocol", "Kingdom", "Empire", "Garden", "River", "Horizon", "Signal",
    "Shadow", "Crown", "Witness", "Frontier", "Circuit", "Orchard", "Lantern", "Covenant",
    "Island", "Station", "Paradox", "Heist", "Verdict", "Legacy", "Storm", "Mirror",
    "Compass", "Echo", "Voyage", "Outpost", "Sanctuary", "Tide", "Cartel", "Dynasty",
    "Hunt", "Code", "Summit", "Ember", "Labyrinth", "Oracle", "Canyon", "Meridian",
    "District", "Reckoning", "Harvest", "Archive", "Exodus", "Ritual", "Bureau", "Carnival",
    "Citadel", "Frequency", "Highway", "Lighthouse", "Manor", "Mission", "Nation", "Ocean",
    "Pact", "Quarry", "Rebellion", "Season", "Tower", "Union", "Valley", "Wolf",
    "Bridge", "Circle", "Doctrine", "Engine", "Fortune", "Game", "Hotel", "Journey",
    "Knight", "Line", "Machine", "Night", "Order", "Promise", "Road", "Secret",
    "Sky", "Theory", "Border", "City", "Diary", "Family", "Ghost", "House",
    "Affair", "Alibi",
)  # fmt: skip
PLACES = (
    "Avalon", "Brooklyn", "Cairo", "the North", "Eden", "Marrakesh", "Paris", "the Valley",
    "Tomorrow", "Nowhere", "Kyoto", "Riverside", "Glass Bay", "Old Town", "Saturn", "the Deep",
    "Lisbon", "the Moon", "Harlow", "Dunmore", "the South", "Venice", "Atlantis", "Ironwood",
)  # fmt: skip
NAMES = (
    "Clara", "Jonah", "Mara", "Theo", "Ines", "Felix", "Nora", "Oscar", "Lena", "Milo",
    "Ada", "Rafael", "Iris", "Hugo", "Vera", "Silas", "June", "Amos", "Greta", "Tobias",
    "Noor", "Elias", "Rosa", "Caspar", "Hazel", "Luca", "Maya", "Otto", "Selma", "Ezra",
)  # fmt: skip


@dataclass
class _Catalog:
    """The generated catalogue as arrays; row ``i`` is item index ``i``."""

    title: np.ndarray  # str
    is_show: np.ndarray  # bool
    genres: np.ndarray  # int8 (items, 3), -1 where the title has fewer genres
    in_genre: np.ndarray  # bool (items, len(GENRES))
    year: np.ndarray  # int64
    episode_seconds: np.ndarray  # int32, length of one episode (or the film)
    seasons: np.ndarray  # int64
    episodes: np.ndarray  # int64, 1 for films
    popularity: np.ndarray  # float64, relative pick weight


@dataclass
class _Users:
    """Per-user taste and event budget."""

    favourites: np.ndarray  # int8 (users, 3), -1 padded
    taste_cdf: np.ndarray  # float32 (users, 3), cumulative weight over favourites
    favourite_share: np.ndarray  # float32, share of picks from favourite genres
    budget: np.ndarray  # int64, events of each user; sums to the requested total


@dataclass
class _Themes:
    """What each title is about and what each viewer likes, beyond genres (-1 padded)."""

    of_title: np.ndarray  # int8 (items, 2)
    of_user: np.ndarray  # int8 (users, 2)
    synopsis: np.ndarray  # str (items,)


def _make_themes(rng: np.random.Generator, catalog: _Catalog, n_users: int) -> _Themes:
    n, k = len(catalog.title), len(THEME_NAMES)
    title_rng, user_rng = (np.random.default_rng(s) for s in rng.bit_generator.seed_seq.spawn(2))  # titles: items only
    of_title = np.full((n, 2), -1, dtype=np.int8)
    of_title[:, 0] = title_rng.integers(0, k, n)
    second = title_rng.random(n) < 0.5
    of_title[second, 1] = (of_title[second, 0] + title_rng.integers(1, k, int(second.sum()))) % k
    phrase = title_rng.integers(0, 4, (n, 2))
    tone = title_rng.integers(0, len(TONES), n)
    opener = title_rng.integers(0, 3, n)
    of_user = np.full((n_users, 2), -1, dtype=np.int8)
    of_user[:, 0] = user_rng.integers(0, k, n_users)
    second = user_rng.random(n_users) < 0.5
    of_user[second, 1] = (of_user[second, 0] + user_rng.integers(1, k, int(second.sum()))) % k
    synopsis = []
    for row in range(n):
        kind = "series" if catalog.is_show[row] else "film"
        first = THEMES[THEME_NAMES[of_title[row, 0]]][phrase[row, 0]]
        about = (f"A {kind} about {first}", f"This {kind} follows {first}", f"{first[0].upper()}{first[1:]}")[opener[row]]
        if of_title[row, 1] >= 0:
            about += f", and {THEMES[THEME_NAMES[of_title[row, 1]]][phrase[row, 1]]}"
        synopsis.append(f"{about}. {TONES[tone[row]]}")
    return _Themes(of_title, of_user, np.array(synopsis, dtype=object))


@dataclass
class _Events:
    """Events as parallel arrays of indices, sorted by timestamp."""

    user: np.ndarray  # int32
    item: np.ndarray  # int32
    timestamp: np.ndarray  # int64
    watch_seconds: np.ndarray  # int32


class _Progress:
    """Numbered, timed step lines on stderr; silent when ``enabled`` is false."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.step = 0
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        self.step += 1
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"[make_demo_data step {self.step}, {elapsed:5.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Sampling helpers


def _top_k_distinct(rng: np.random.Generator, n: int, weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``n`` rows of up to 3 distinct indices drawn without replacement by ``weights``.

    Gumbel-top-k: perturbed log-weights sorted per row are a weighted sample
    without replacement, which keeps this vectorised. Row ``r`` keeps its first
    ``counts[r]`` picks; the rest are -1.
    """
    keys = np.log(weights)[None, :] + rng.gumbel(size=(n, len(weights)))
    picks = np.argsort(-keys, axis=1)[:, :3].astype(np.int8)
    picks[np.arange(3)[None, :] >= counts[:, None]] = -1
    return picks


def _ids(prefix: str, n: int, min_width: int) -> pa.Array:
    """Zero-padded string ids ``prefix + 0..n-1`` as an Arrow array (the lookup table for ``take``)."""
    width = max(min_width, len(str(n - 1)))
    digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(n)), pa.string()), width=width, padding="0")
    return pc.binary_join_element_wise(prefix, digits, "")


def _blank(rng: np.random.Generator, values: np.ndarray) -> pd.Series:
    """Nullable Int64 copy of ``values`` with about BLANK_SHARE of entries missing."""
    return pd.Series(values, dtype="Int64").mask(rng.random(len(values)) < BLANK_SHARE)


# ---------------------------------------------------------------------------
# Catalogue


def _titles(rng: np.random.Generator, n: int) -> np.ndarray:
    """Plausible, unique titles from word lists; repeats get a sequel number ("... 2")."""
    adjective = np.array(ADJECTIVES)[rng.integers(0, len(ADJECTIVES), n)].astype(object)
    noun = np.array(NOUNS)[rng.integers(0, len(NOUNS), n)].astype(object)
    noun2 = np.array(NOUNS)[rng.integers(0, len(NOUNS), n)].astype(object)
    place = np.array(PLACES)[rng.integers(0, len(PLACES), n)].astype(object)
    name = np.array(NAMES)[rng.integers(0, len(NAMES), n)].astype(object)
    patterns = [
        "The " + adjective + " " + noun,  # The Silent Harbor
        adjective + " " + noun,  # Midnight Protocol
        noun + " of " + place,  # Kingdom of Avalon
        name + "'s " + noun,  # Clara's Garden
        noun + " and " + noun2,  # Crown and Ember
    ]
    choice = rng.choice(len(patterns), size=n, p=[0.3, 0.3, 0.12, 0.12, 0.16])
    titles = pd.Series(np.choose(choice, patterns))
    repeat = titles.groupby(titles).cumcount().to_numpy()
    # Base titles never end in a digit, so "X 2" cannot collide with another base title.
    return np.where(repeat > 0, titles + " " + (repeat + 1).astype(str), titles).astype(object)


def _make_catalog(rng: np.random.Generator, n: int) -> _Catalog:
    is_show = rng.random(n) < SHOW_SHARE
    counts = rng.choice([1, 2, 3], size=n, p=[0.4, 0.4, 0.2])
    genres = _top_k_distinct(rng, n, GENRE_WEIGHTS, counts)
    in_genre = np.zeros((n, len(GENRES)), dtype=bool)
    rows = np.repeat(np.arange(n), counts)
    in_genre[rows, genres[genres >= 0]] = True  # genres >= 0 flattens row-major, matching rows

    # Skewed recent: most titles are from the last decade or two.
    year = np.maximum(YEAR_MAX - np.floor(rng.exponential(YEAR_RECENCY_SCALE, n)), YEAR_MIN).astype(np.int64)
    seasons = np.where(is_show, np.minimum(rng.geometric(0.4, n), 10), 1)
    per_season = rng.integers(6, 25, n)
    episodes = np.where(is_show, seasons * per_season, 1)
    film_minutes = np.clip(np.rint(rng.normal(112, 20, n)), 80, 180)
    show_minutes = rng.integers(20, 61, n)
    minutes = np.where(is_show, show_minutes, film_minutes).astype(np.int32)

    # Zipf popularity over a random rank order that favours recent titles.
    recency = 0.8 * (year >= YEAR_MAX - 2) + 0.3 * (year >= YEAR_MAX - 10)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-(rng.gumbel(size=n) + recency), kind="stable")] = np.arange(n)
    popularity = (rank + 1.0) ** -ZIPF_EXPONENT

    return _Catalog(
        title=_titles(rng, n),
        is_show=is_show,
        genres=genres,
        in_genre=in_genre,
        year=year,
        episode_seconds=minutes * 60,
        seasons=seasons.astype(np.int64),
        episodes=episodes.astype(np.int64),
        popularity=popularity,
    )


def _catalog_frame(catalog: _Catalog, rng: np.random.Generator) -> pd.DataFrame:
    """The catalogue in contract form, with a few optional values blanked."""
    n = len(catalog.title)
    names = np.array(("",) + GENRES, dtype=object)
    first, second, third = (names[catalog.genres[:, j] + 1] for j in range(3))
    genres = first + np.where(second != "", "|" + second, "") + np.where(third != "", "|" + third, "")
    genres = np.where(rng.random(n) >= BLANK_SHARE, genres, None)
    return pd.DataFrame(
        {
            "item_id": _ids("t", n, 5).to_numpy(zero_copy_only=False),
            "title": catalog.title,
            "kind": np.where(catalog.is_show, "show", "film"),
            "genres": pd.array(genres, dtype="string"),
            "year": _blank(rng, catalog.year),
            "episode_minutes": _blank(rng, catalog.episode_seconds // 60),
            "seasons": _blank(rng, catalog.seasons),
            "episodes": _blank(rng, catalog.episodes),
            **_catalog_rules(catalog, np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])),
        }
    )


REGIONAL_SHARE, EXPIRING_SHARE, UPCOMING_SHARE = 0.15, 0.06, 0.03
KIDS_GENRES = ("Animation", "Family")
MATURE_GENRES = ("Horror", "Crime", "Thriller", "War")
REGION_GROUPS = (("GB", "IE"), ("US", "CA"), ("DE", "AT", "CH"), ("FR", "BE"), ("ES", "PT"), ("NL", "BE"), ("SE", "NO", "DK"))


def _iso_date(seconds: np.ndarray) -> np.ndarray:
    return np.datetime_as_string(seconds.astype("datetime64[s]"), unit="D").astype(object)


def _catalog_rules(catalog: _Catalog, rng: np.random.Generator) -> dict:
    """The catalogue rules (``maturity``, ``regions``, availability, ``added_at``), from their own random stream.

    Most titles are licensed everywhere, some only in a group of countries;
    a few leave the catalogue within the next months (some already gone by
    the reference date), a few are listed (added) but not yet released; kids'
    titles (Animation/Family) are rated 0 or 7 and make about a fifth of the
    catalogue; Horror/Crime/Thriller/War lean 16-18. New titles arrive every
    week: ``added_at`` spreads over two years before the reference date, with
    a weekly batch in the last months.
    """
    n = len(catalog.title)
    names = np.array(("",) + GENRES, dtype=object)
    genre_names = [set(names[catalog.genres[i] + 1]) - {""} for i in range(n)]
    kids = np.array([bool(g & set(KIDS_GENRES)) for g in genre_names])
    mature = np.array([bool(g & set(MATURE_GENRES)) for g in genre_names])
    ages = rng.choice(np.array([0, 7, 13, 16, 18]), size=n, p=[0.05, 0.15, 0.35, 0.3, 0.15])
    ages = np.where(kids, rng.choice(np.array([0, 7]), size=n), ages)
    ages = np.where(mature & ~kids, rng.choice(np.array([16, 18]), size=n, p=[0.4, 0.6]), ages)
    labels = {0: "TV-G", 7: "PG", 13: "PG-13", 16: "TV-14", 18: "TV-MA"}
    maturity = np.array([labels[a] if rng.random() < 0.3 else str(a) for a in ages.tolist()], dtype=object)
    maturity[rng.random(n) < BLANK_SHARE] = None  # unrated
    regional = rng.random(n) < REGIONAL_SHARE
    groups = rng.integers(len(REGION_GROUPS), size=n)
    regions = np.array([("|".join(REGION_GROUPS[g]) if r else None) for g, r in zip(groups.tolist(), regional.tolist())], dtype=object)
    # Arrival: most titles long ago, a weekly batch (Mondays) over the last 26 weeks.
    weeks_ago = np.where(rng.random(n) < 0.25, rng.integers(0, 26, size=n), rng.integers(26, 104, size=n))
    monday = REFERENCE_TS - ((REFERENCE_TS // DAY + 3) % 7) * DAY  # 1970-01-01 was a Thursday
    added = monday - weeks_ago * 7 * DAY
    upcoming = rng.random(n) < UPCOMING_SHARE
    expiring = ~upcoming & (rng.random(n) < EXPIRING_SHARE)
    opens = np.where(upcoming, REFERENCE_TS + rng.integers(7, 200, size=n) * DAY, 0)
    closes = np.where(expiring, REFERENCE_TS + rng.integers(-30, 240, size=n) * DAY, 0)
    return {
        "maturity": pd.array(maturity, dtype="string"),
        "regions": pd.array(regions, dtype="string"),
        "available_from": pd.array(np.where(upcoming, _iso_date(opens), None), dtype="string"),
        "available_until": pd.array(np.where(expiring, _iso_date(closes), None), dtype="string"),
        "added_at": pd.array(_iso_date(added), dtype="string"),
    }


# ---------------------------------------------------------------------------
# Users and viewing behaviour


def _make_users(rng: np.random.Generator, n_users: int, n_events: int) -> _Users:
    counts = rng.choice([1, 2, 3], size=n_users, p=[0.3, 0.45, 0.25])
    favourites = _top_k_distinct(rng, n_users, GENRE_WEIGHTS, counts)
    weights = rng.gamma(2.0, size=(n_users, 3)) * (favourites >= 0)
    taste_cdf = (np.cumsum(weights, axis=1) / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    taste_cdf[:, -1] = 1.0  # guard against rounding so every draw lands on a favourite

    # Heavy-tailed activity, capped so no single user is absurdly active.
    activity = rng.lognormal(0.0, ACTIVITY_SIGMA, n_users)
    activity = np.minimum(activity, ACTIVITY_CAP * activity.mean())
    # Everyone gets one event; the rest are shared out by activity.
    budget = 1 + rng.multinomial(n_events - n_users, activity / activity.sum())
    share = rng.uniform(*FAVOURITE_SHARE, n_users).astype(np.float32)
    return _Users(favourites=favourites, taste_cdf=taste_cdf, favourite_share=share, budget=budget.astype(np.int64))


class _TitlePicker:
    """Draws titles for (user, explore) pairs: favourite genre by taste, then title by popularity."""

    def __init__(self, catalog: _Catalog, users: _Users, themes: _Themes):
        self.catalog = catalog
        self.users = users
        self.themes = themes
        self.pools = [np.flatnonzero(catalog.in_genre[:, g]) for g in range(len(GENRES))]
        self.cdfs = [np.cumsum(catalog.popularity[pool]) for pool in self.pools]
        self.global_cdf = np.cumsum(catalog.popularity)
        has_theme = np.zeros((len(catalog.title), len(THEME_NAMES)), dtype=bool)
        for slot in range(2):
            rows = np.flatnonzero(themes.of_title[:, slot] >= 0)
            has_theme[rows, themes.of_title[rows, slot]] = True
        # Titles of genre g about theme t, by popularity (pairs with no title are absent).
        self.theme_pools: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for g in range(len(GENRES)):
            for t in range(len(THEME_NAMES)):
                pool = np.flatnonzero(catalog.in_genre[:, g] & has_theme[:, t])
                if len(pool):
                    self.theme_pools[(g, t)] = (pool, np.cumsum(catalog.popularity[pool]))

    @staticmethod
    def _draw(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), len(cdf) - 1)

    def pick(self, rng: np.random.Generator, user: np.ndarray, explore: np.ndarray) -> np.ndarray:
        item = np.empty(len(user), dtype=np.int32)
        slot = (rng.random(len(user), dtype=np.float32)[:, None] > self.users.taste_cdf[user]).sum(axis=1)
        genre = self.users.favourites[user, np.minimum(slot, 2)]
        genre[explore] = -1
        for g, (pool, cdf) in enumerate(zip(self.pools, self.cdfs, strict=True)):
            where = np.flatnonzero(genre == g)
            if len(where) and len(pool):
                item[where] = pool[self._draw(rng, cdf, len(where))]
            elif len(where):  # a favourite genre no title has (tiny catalogues): explore instead
                genre[where] = -1
        where = np.flatnonzero(genre == -1)
        item[where] = self._draw(rng, self.global_cdf, len(where))
        # Within a favourite genre, a share of picks go to titles about a favourite theme as well.
        themed = np.flatnonzero((genre >= 0) & (rng.random(len(user)) < THEME_PULL))
        if len(themed):
            favourite = self.themes.of_user[user[themed]]
            slot = np.where((favourite[:, 1] >= 0) & (rng.random(len(themed)) < 0.5), 1, 0)
            theme = favourite[np.arange(len(themed)), slot]
            for (g, t), (pool, cdf) in self.theme_pools.items():
                at = themed[(genre[themed] == g) & (theme == t)]
                if len(at):
                    item[at] = pool[self._draw(rng, cdf, len(at))]
        return item

    def in_taste(self, user: np.ndarray, item: np.ndarray) -> np.ndarray:
        favourites = self.users.favourites[user]
        hits = self.catalog.in_genre[item[:, None], np.maximum(favourites, 0)] & (favourites >= 0)
        return hits.any(axis=1)


def _isin_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def _repeated(keys: np.ndarray) -> np.ndarray:
    """True for every occurrence of a key after its first one."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    repeated = np.zeros(len(keys), dtype=bool)
    repeated[order[1:]] = sorted_keys[1:] == sorted_keys[:-1]
    return repeated


def _pick_new_titles(
    rng: np.random.Generator,
    picker: _TitlePicker,
    user: np.ndarray,
    explore: np.ndarray,
    seen: list[np.ndarray],
    n_items: int,
) -> np.ndarray:
    """Titles for a batch of picks, resampling ones the user already watched.

    ``seen`` holds sorted ``user * n_items + item`` keys of earlier picks; the
    keys of this batch's distinct picks are appended to it (kept as separate
    sorted parts, which is cheaper than re-sorting everything each round).

    Real users rarely start the same title twice, so repeats are redrawn a few
    rounds. A heavy user may have exhausted the popular titles of their genres,
    so later rounds explore the whole catalogue by popularity and the last ones
    uniformly (the long tail). Whatever is still a repeat after that stays, as
    a rewatch.
    """
    item = picker.pick(rng, user, explore)
    keys = user.astype(np.int64) * n_items + item
    dup = _repeated(keys)
    for sorted_keys in seen:
        dup |= _isin_sorted(keys, sorted_keys)
    seen.append(np.sort(keys[~dup]))
    for attempt in range(DEDUP_RETRIES):
        redo = np.flatnonzero(dup)
        if len(redo) == 0:
            break
        if attempt >= DEDUP_RETRIES - 2:
            item[redo] = rng.integers(0, n_items, len(redo), dtype=np.int32)
        else:
            wider = explore[redo] | (attempt >= DEDUP_RETRIES // 2)
            item[redo] = picker.pick(rng, user[redo], wider)
        keys[redo] = user[redo].astype(np.int64) * n_items + item[redo]
        still = _repeated(keys[redo])
        for sorted_keys in seen:
            still |= _isin_sorted(keys[redo], sorted_keys)
        seen.append(np.sort(keys[redo[~still]]))
        dup[:] = False
        dup[redo[still]] = True
    return item


def _engagements(
    rng: np.random.Generator, catalog: _Catalog, users: _Users, themes: _Themes, log: _Progress
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user, title) engagements whose viewing counts add up to each user's budget exactly.

    An engagement is one film watch (occasionally two) or a run of episodes of
    one show. Each round gives every user with budget left enough engagements
    to (probably) cover it, then cuts each user's list at the budget; the few
    users still short get another round. Returns user, item, length, in_taste.
    """
    n_items = len(catalog.title)
    picker = _TitlePicker(catalog, users, themes)
    remaining = users.budget.copy()
    seen: list[np.ndarray] = []
    parts: list[tuple[np.ndarray, ...]] = []
    mean_length = 3.0  # first guess of views per engagement; then measured
    rounds = 0
    while (remaining > 0).any():
        rounds += 1
        todo = np.flatnonzero(remaining > 0).astype(np.int32)
        # Slight overshoot (cut off below) beats many rounds.
        per_user = np.ceil(remaining[todo] / mean_length * 1.15).astype(np.int64) + 1
        user = np.repeat(todo, per_user)
        explore = rng.random(len(user), dtype=np.float32) >= users.favourite_share[user]
        item = _pick_new_titles(rng, picker, user, explore, seen, n_items)
        in_taste = picker.in_taste(user, item)

        mean_show = np.where(in_taste, MEAN_SHOW_EPISODES_IN_TASTE, MEAN_SHOW_EPISODES_OUT_OF_TASTE)
        show_views = np.minimum(rng.geometric(1.0 / mean_show), catalog.episodes[item])
        film_views = 1 + (rng.random(len(user)) < FILM_REWATCH_SHARE)
        length = np.where(catalog.is_show[item], show_views, film_views).astype(np.int64)
        mean_length = max(float(length.mean()), 1.0)

        # Cut each user's run of engagements where it reaches the remaining budget.
        ends = np.cumsum(length)
        group_start = np.repeat(np.cumsum(per_user) - per_user, per_user)
        before = ends - length - (ends[group_start] - length[group_start])
        budget = np.repeat(remaining[todo], per_user)
        keep = before < budget
        length = np.minimum(length, budget - before)[keep]
        user, item, in_taste = user[keep], item[keep], in_taste[keep]
        remaining -= np.bincount(user, weights=length, minlength=len(remaining)).astype(np.int64)
        parts.append((user, item, length.astype(np.int32), in_taste))
        log(f"round {rounds}: {len(user):,} engagements, {int(remaining.sum()):,} views left to place")
    user, item, length, in_taste = (np.concatenate(column) for column in zip(*parts, strict=True))
    return user, item, length, in_taste


def _viewings(
    rng: np.random.Generator,
    catalog: _Catalog,
    user: np.ndarray,
    item: np.ndarray,
    length: np.ndarray,
    in_taste: np.ndarray,
    log: _Progress,
) -> _Events:
    """Expand engagements into timed viewings, sorted by timestamp.

    Works on arrays of one entry per viewing (20M in the benchmark), so big
    temporaries are deleted as soon as they are used to keep peak memory low.
    """
    n_eng = len(user)
    n = int(length.sum())
    first = (np.cumsum(length, dtype=np.int64) - length).astype(np.int64)
    eng = np.repeat(np.arange(n_eng, dtype=np.int32), length)
    position = (np.arange(n, dtype=np.int64) - first[eng]).astype(np.int32)
    is_show = catalog.is_show[item]
    ep_seconds = catalog.episode_seconds[item][eng]

    # Mostly near-complete viewings; early abandonment, more often out of taste.
    abandon_p = np.where(in_taste, ABANDON_IN_TASTE, ABANDON_OUT_OF_TASTE).astype(np.float32)
    abandoned = rng.random(n, dtype=np.float32) < abandon_p[eng]
    u = rng.random(n, dtype=np.float32)
    completion = np.where(abandoned, 0.05 + 0.35 * u, 1.0 - 0.3 * u * u)
    del u
    watch = np.minimum((completion * ep_seconds).astype(np.int32), ep_seconds)
    del completion

    # Gap to the previous viewing of the same engagement: the next episode
    # starts right after the last one (binge) unless the session ends - by
    # chance, after an abandoned episode, or always between two film watches.
    break_p = np.where(is_show, SESSION_BREAK_SHARE, 1.0).astype(np.float32)
    continues = position > 0
    prev_abandoned = np.zeros(n, dtype=bool)
    prev_abandoned[1:] = abandoned[:-1]
    new_session = continues & ((rng.random(n, dtype=np.float32) < break_p[eng]) | prev_abandoned)
    del abandoned, prev_abandoned
    gap = np.zeros(n, dtype=np.int32)
    binge = np.flatnonzero(continues & ~new_session)
    gap[binge] = watch[binge - 1] + rng.integers(10, 300, len(binge), dtype=np.int32)
    later = np.flatnonzero(new_session)
    # Shows resume after ~half a day to a few days; a film rewatch comes weeks later.
    show_gap = 10 * 3600 + rng.exponential(30 * 3600, len(later))
    film_gap = 3 * DAY + rng.exponential(20 * DAY, len(later))
    gap[later] = np.where(is_show[eng[later]], show_gap, film_gap).astype(np.int32)
    del binge, later, show_gap, film_gap, new_session, continues
    offset = np.cumsum(gap, dtype=np.int64)
    del gap
    base = offset[first]
    span = offset[first + length - 1] - base
    offset -= base[eng]
    # The rare engagement longer than the window (a long show, many sessions) is
    # squeezed in proportionally rather than clipped at the reference date.
    limit = (WINDOW_DAYS - 1) * DAY
    rows = np.flatnonzero((span > limit)[eng])
    offset[rows] = offset[rows] * limit // span[eng[rows]]
    span = np.minimum(span, limit)
    log(f"timed {n:,} viewings")

    # Each engagement starts on a random day (so it fits in the window) at an evening-heavy hour.
    span_days = np.ceil(span / DAY).astype(np.int64)
    day = np.floor(rng.random(n_eng) * np.maximum(WINDOW_DAYS - span_days, 1)).astype(np.int64)
    hour = rng.choice(24, size=n_eng, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    start = REFERENCE_TS - WINDOW_DAYS * DAY + day * DAY + hour * 3600 + rng.integers(0, 3600, n_eng)
    # Fits by construction: day + span_days <= WINDOW_DAYS, so every viewing is before REFERENCE_TS.
    timestamp = start[eng] + offset
    del offset, start

    order = np.argsort(timestamp, kind="stable")
    log(f"sorted {n:,} viewings by time")
    return _Events(
        user=user[eng[order]],
        item=item[eng[order]],
        timestamp=timestamp[order],
        watch_seconds=watch[order],
    )


# ---------------------------------------------------------------------------
# Orchestration and output


def _simulate(
    users: int, items: int, events: int, seed: int, log: _Progress
) -> tuple[_Events, pd.DataFrame]:
    _check_sizes(users, items, events)
    # Independent streams: the catalogue depends only on (items, seed).
    catalog_rng, users_rng, events_rng, themes_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    catalog = _make_catalog(catalog_rng, items)
    themes = _make_themes(themes_rng, catalog, users)
    catalog_frame = _catalog_frame(catalog, catalog_rng)
    catalog_frame["description"] = pd.array(themes.synopsis, dtype="string")
    log(f"catalogue: {items:,} titles ({int(catalog.is_show.sum()):,} shows) with synopses")
    people = _make_users(users_rng, users, events)
    log(f"users: {users:,} with tastes and activity levels")
    engagements = _engagements(events_rng, catalog, people, themes, log)
    viewings = _viewings(events_rng, catalog, *engagements, log)
    return viewings, catalog_frame


@dataclass
class TrueTastes:
    """The simulated viewers' hidden tastes, for online simulations (bench/online.py): what a model should learn."""

    favourites: np.ndarray  # int8 (users, 3), -1 padded
    weights: np.ndarray  # float64 (users, 3), each row sums to 1 over the favourites
    in_genre: np.ndarray  # bool (items, genres)
    popularity: np.ndarray  # float64 (items,)
    episode_seconds: np.ndarray  # int (items,)
    title_themes: np.ndarray  # int8 (items, 2), -1 padded
    user_themes: np.ndarray  # int8 (users, 2), -1 padded

    def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """How much each user likes each title, 0..1: the taste weight of her favourite genres it has,
        halved unless it is also about one of her favourite themes."""
        users, items = np.asarray(users), np.asarray(items)
        fav = self.favourites[users]  # [n, 3]
        hits = self.in_genre[items[:, None], np.maximum(fav, 0)] & (fav >= 0)
        genre = (hits * self.weights[users]).sum(axis=1)
        mine, its = self.user_themes[users], self.title_themes[items]
        theme = ((mine[:, :, None] == its[:, None, :]) & (mine[:, :, None] >= 0)).any(axis=(1, 2))
        return genre * np.where(theme, 1.0, 0.5)


def true_tastes(users: int = DEFAULT_USERS, items: int = DEFAULT_ITEMS, events: int = DEFAULT_EVENTS,
                seed: int = DEFAULT_SEED) -> TrueTastes:  # fmt: skip
    """The tastes :func:`generate` used for these arguments (the same random streams), without the events."""
    _check_sizes(users, items, events)
    catalog_rng, users_rng, _, themes_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    catalog = _make_catalog(catalog_rng, items)
    themes = _make_themes(themes_rng, catalog, users)
    people = _make_users(users_rng, users, events)
    cdf = people.taste_cdf.astype(np.float64)
    weights = np.diff(np.concatenate([np.zeros((users, 1)), cdf], axis=1), axis=1) * (people.favourites >= 0)
    return TrueTastes(people.favourites, weights, catalog.in_genre, catalog.popularity, catalog.episode_seconds,
                      themes.of_title, themes.of_user)  # fmt: skip


def _check_sizes(users: int, items: int, events: int) -> None:
    if users < 1 or items < 1:
        raise ValueError(f"users and items must be >= 1 (got users={users}, items={items})")
    if events < users:
        raise ValueError(f"events ({events}) must be >= users ({users}): every user gets at least one event")


def _events_table(viewings: _Events, user_ids: pa.Array, item_ids: pa.Array, lo: int, hi: int) -> pa.Table:
    return pa.table(
        {
            "user_id": user_ids.take(pa.array(viewings.user[lo:hi])),
            "item_id": item_ids.take(pa.array(viewings.item[lo:hi])),
            "timestamp": pa.array(viewings.timestamp[lo:hi], type=pa.int64()),
            "watch_seconds": pa.array(viewings.watch_seconds[lo:hi].astype(np.int64), type=pa.int64()),
        }
    )


def generate(
    users: int = DEFAULT_USERS,
    items: int = DEFAULT_ITEMS,
    events: int = DEFAULT_EVENTS,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generate ``(events_df, catalog_df)`` in memory (for tests and small sizes).

    Same content as :func:`write_demo_data` writes for the same arguments.
    """
    viewings, catalog_frame = _simulate(users, items, events, seed, _Progress(progress))
    table = _events_table(viewings, _ids("u", users, 6), _ids("t", items, 5), 0, events)
    return table.to_pandas(), catalog_frame


def write_demo_data(
    out_dir: str | Path,
    users: int = DEFAULT_USERS,
    items: int = DEFAULT_ITEMS,
    events: int = DEFAULT_EVENTS,
    seed: int = DEFAULT_SEED,
    fmt: str = "csv",
    progress: bool = True,
    chunk_rows: int = 1_000_000,
) -> dict[str, Path]:
    """Generate the demo data and write ``events.<fmt>`` and ``catalog.<fmt>`` into ``out_dir``.

    Events are converted to strings and written in chunks of ``chunk_rows``
    so memory stays bounded. Returns ``{"events": path, "catalog": path}``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    viewings, catalog_frame = _simulate(users, items, events, seed, _Progress(progress))
    paths = {"events": out / f"events.{fmt}", "catalog": out / f"catalog.{fmt}"}
    # Write under a temporary name and rename at the end, so a crash never leaves a
    # truncated file that looks complete.
    partial = {name: path.with_name(path.name + ".partial") for name, path in paths.items()}

    catalog_table = pa.Table.from_pandas(catalog_frame, preserve_index=False)
    catalog_table = catalog_table.cast(  # plain string rather than pandas' large_string
        pa.schema([pa.field(f.name, pa.string() if pa.types.is_large_string(f.type) else f.type)
                   for f in catalog_table.schema])
    )  # fmt: skip
    user_ids, item_ids = _ids("u", users, 6), _ids("t", items, 5)
    schema = _events_table(viewings, user_ids, item_ids, 0, 0).schema
    if fmt == "csv":
        # Events need no quoting: ids are plain.
        # Synopses have commas: the catalogue quotes where needed.
        options = pacsv.WriteOptions(quoting_style="none", quoting_header="none")
        pacsv.write_csv(catalog_table, partial["catalog"], write_options=pacsv.WriteOptions(quoting_style="needed", quoting_header="none"))
        writer = pacsv.CSVWriter(partial["events"], schema, write_options=options)
    else:
        pq.write_table(catalog_table, partial["catalog"])
        writer = pq.ParquetWriter(partial["events"], schema)
    with writer, tqdm(total=events, unit="row", unit_scale=True, desc="writing events", disable=not progress) as bar:
        for lo in range(0, events, chunk_rows):
            hi = min(lo + chunk_rows, events)
            writer.write_table(_events_table(viewings, user_ids, item_ids, lo, hi))
            bar.update(hi - lo)
    for name, path in paths.items():
        partial[name].replace(path)
    return paths


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.make_demo_data",
        description=(
            "Write a synthetic but structured watch log (events) and catalogue of shows and films "
            "for demos, tests and benchmarks. Output is byte-identical for the same arguments."
        ),
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="output directory (created if missing); receives events.<ext> and catalog.<ext>",
    )
    parser.add_argument(
        "--users",
        type=_positive_int,
        default=DEFAULT_USERS,
        metavar="N",
        help=f"number of users; every user gets at least one event (default {DEFAULT_USERS})",
    )
    parser.add_argument(
        "--items",
        type=_positive_int,
        default=DEFAULT_ITEMS,
        metavar="N",
        help=f"number of titles (shows and films) in the catalogue (default {DEFAULT_ITEMS})",
    )
    parser.add_argument(
        "--events",
        type=_positive_int,
        default=DEFAULT_EVENTS,
        metavar="N",
        help=f"exact number of viewing rows; must be >= --users (default {DEFAULT_EVENTS})",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=DEFAULT_SEED,
        metavar="S",
        help=f"random seed (>= 0); same seed and sizes give byte-identical files (default {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="csv",
        dest="fmt",
        help="output file format: csv (default) or parquet (via pyarrow)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.events < args.users:
        parser.error(f"--events ({args.events}) must be >= --users ({args.users}): every user gets one event or more")
    start = time.perf_counter()
    paths = write_demo_data(
        args.out, args.users, args.items, args.events, args.seed, args.fmt, progress=not args.quiet
    )
    print(
        f"wrote {paths['events']} ({args.events:,} rows) and {paths['catalog']} ({args.items:,} rows) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
