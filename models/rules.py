"""Catalogue rules and request filters: which titles a request may be shown.

One published version's ``items.json`` carries, per title, its genres, kind,
year and the catalogue rules (``maturity``, ``regions``, ``available_from``,
``available_until``, ``added_at``; see :mod:`models.data`). :class:`CatalogRules`
turns them into boolean arrays once per version, so a request's eligibility is
a few whole-array ``&`` operations (and cached: pages ask the same filters
many times). :class:`Filters` is what a request asks for; the availability
window is applied to every request, filtered or not.

Rules:

* ``genre`` — any of the given genres (a title with none of them is out).
* ``kind`` — ``show`` or ``film``.
* ``year_min`` / ``year_max`` — titles with an unknown year are out when either is given.
* ``max_maturity`` — titles rated above it are out, and so are unrated ones.
* ``region`` — titles licensed elsewhere are out; titles with no ``regions`` are everywhere.
* availability — ``available_from <= now < available_until`` (blank = open).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

KINDS = ("show", "film")
MASK_CACHE = 256  # distinct filter combinations kept per version
# ISO 3166-1 alpha-2: the region codes a request may name.
ISO_REGIONS = frozenset(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW
    BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK
    FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS
    IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM
    MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS
    PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK
    TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF YE YT ZA ZM ZW""".split()
)


class FilterError(ValueError):
    """A filter value the catalogue cannot answer (unknown genre, region, kind); the message names valid ones."""


@dataclass(frozen=True)
class Filters:
    genres: tuple[str, ...] = ()
    kind: str | None = None
    year_min: int | None = None
    year_max: int | None = None
    max_maturity: int | None = None
    region: str | None = None

    def with_genres(self, genres: tuple[str, ...]) -> Filters:
        """These filters narrowed to ``genres`` (a page's genre row inside a genre filter)."""
        if self.genres:
            genres = tuple(g for g in genres if g in self.genres)
        return Filters(genres or ("\0none",), self.kind, self.year_min, self.year_max, self.max_maturity, self.region)


class CatalogRules:
    """The rule columns of one version as arrays, and the eligibility masks requests ask for."""

    def __init__(self, items: dict):
        n = len(items["item_id"])
        self.n = n
        genres = items.get("genres") or [[] for _ in range(n)]
        self.genre_masks: dict[str, np.ndarray] = {}
        for row, names in enumerate(genres):
            for name in names:
                self.genre_masks.setdefault(name, np.zeros(n, dtype=bool))[row] = True
        self.genre_names = sorted(self.genre_masks)
        self.kind = np.array([str(k).lower() for k in (items.get("kind") or [""] * n)], dtype=object)
        self.year = _floats(items.get("year"), n)
        self.maturity = _floats(items.get("maturity"), n)
        regions = items.get("regions") or [[] for _ in range(n)]
        self.everywhere = np.array([not r for r in regions], dtype=bool)
        self.region_masks: dict[str, np.ndarray] = {}
        for row, codes in enumerate(regions):
            for code in codes:
                self.region_masks.setdefault(code, np.zeros(n, dtype=bool))[row] = True
        self.opens = _floats(items.get("available_from"), n)
        self.closes = _floats(items.get("available_until"), n)
        self.added_at = _floats(items.get("added_at"), n)
        self.windowed = bool(np.isfinite(self.opens).any() or np.isfinite(self.closes).any())
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, filters: Filters) -> None:
        unknown = [g for g in filters.genres if g not in self.genre_masks]
        if unknown:
            raise FilterError(f"unknown genre {unknown[0]!r}; this catalogue has: {', '.join(self.genre_names)}")
        if filters.kind is not None and filters.kind not in KINDS:
            raise FilterError(f"unknown kind {filters.kind!r}; use one of: {', '.join(KINDS)}")
        if filters.region is not None and filters.region not in ISO_REGIONS:
            listed = ", ".join(sorted(self.region_masks)) or "none (every title is licensed everywhere)"
            raise FilterError(
                f"unknown region {filters.region!r}; use an ISO 3166-1 alpha-2 code such as GB or US "
                f"(regions named in this catalogue: {listed})"
            )

    def available(self, now: float) -> np.ndarray:
        open_ = ~(self.opens > now)  # NaN compares False: blank = open
        return open_ & ~(self.closes <= now)

    def eligible(self, filters: Filters | None, now: float | None = None) -> np.ndarray:
        """Titles these filters allow right now (read-only array; cached per filters and minute)."""
        now = time.time() if now is None else now
        key = (filters, int(now // 60) if self.windowed else 0)
        with self._lock:
            mask = self._cache.get(key)
            if mask is not None:
                self._cache.move_to_end(key)
                return mask
        mask = self.available(now) if self.windowed else np.ones(self.n, dtype=bool)
        if filters is not None:
            if filters.genres:
                any_genre = np.zeros(self.n, dtype=bool)
                for name in filters.genres:
                    if name in self.genre_masks:
                        any_genre |= self.genre_masks[name]
                mask &= any_genre
            if filters.kind is not None:
                mask &= self.kind == filters.kind
            if filters.year_min is not None:
                mask &= self.year >= filters.year_min
            if filters.year_max is not None:
                mask &= self.year <= filters.year_max
            if filters.max_maturity is not None:
                mask &= self.maturity <= filters.max_maturity  # NaN (unrated) is out
            if filters.region is not None:
                mask &= self.everywhere | self.region_masks.get(filters.region, np.zeros(self.n, dtype=bool))
        mask.flags.writeable = False
        self._remember(key, mask)
        return mask

    def _remember(self, key: tuple, mask: np.ndarray) -> None:
        """Keep ``mask`` among the newest ``MASK_CACHE`` (keys carry the minute: old ones age out)."""
        with self._lock:
            self._cache[key] = mask
            while len(self._cache) > MASK_CACHE:
                self._cache.popitem(last=False)

    def new_titles(self, days: float, now: float | None = None) -> np.ndarray:
        """Titles added in the ``days`` up to the newest arrival (now, on a catalogue fed every day).

        A catalogue whose newest title is weeks old (a stalled feed, the demo
        data) still has a "new" row: its latest arrivals.
        """
        now = time.time() if now is None else now
        key = ("new", days, int(now // 60))
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        mask = self._new_titles(days, now)
        mask.flags.writeable = False
        self._remember(key, mask)
        return mask

    def _new_titles(self, days: float, now: float) -> np.ndarray:
        arrived = np.isfinite(self.added_at) & (self.added_at <= now)
        if not arrived.any():
            return np.zeros(self.n, dtype=bool)
        until = float(self.added_at[arrived].max())
        return arrived & (self.added_at > until - days * 86400)


def _floats(values, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
