"""The served model: what a published version *does* with a user's history.

One class, :class:`Recommender`, opened from a folder of published parts
(memory-mapped, so every gunicorn worker on a host shares one copy). The
nightly job opens exactly the same class on the version it is about to
publish to precompute candidates and to evaluate it, so offline metrics
measure what the service returns.

Parts (all written by :mod:`models.build`):

``recommend.ann``   Annoy ``dot`` index over item vectors (user -> items)
``similar.ann``     Annoy ``angular`` index over item vectors (item -> items)
``item_vectors.npy`` float32 [items, d]; ``gram.npy`` float32 [d, d] = VᵀV
``items.json``      columns of catalogue metadata, row = item index
``users.json``      user ids, row = user index
``history_*.npy``   CSR of each user's recent titles (newest first) and confidences
``popular.npy``     item indices, most popular first (the fallback)
``candidates.npy`` / ``candidate_scores.npy``  per-user precomputed top titles (-1 padded)
``candidate_because.npy``  uint8 [users, candidates, 2]: each candidate's "because" titles as positions
                    in the user's published history (255 = none; older versions: int32 titles, -1 = none)
``neighbours.npy`` / ``neighbour_cosines.npy``  each title's ``NEIGHBOURS`` nearest titles by cosine (exact)

A version whose metadata has ``user_store`` has no per-user parts (``users.json`` to
``candidate_because.npy``): each user's history, candidates and "because" are one record in
Redis (:func:`models.store.pack_user`), read per request through ``read_user`` (set by the
service, :mod:`app.live_model`), so a worker's memory does not grow with users.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import orjson
from annoy import AnnoyIndex

from models.rules import CatalogRules, Filters
from models.store import NO_REASON, CorruptUser, UserRecord, unpack_user

log = logging.getLogger(__name__)

BECAUSE_HISTORY = 200  # most recent history titles searched for a "because" (positions fit a uint8)
ANNOY_CANDIDATES = 300  # titles asked of Annoy per query before exact re-scoring
POPULAR_CANDIDATES = 200  # most popular titles always re-scored alongside
SEQUENCE_CANDIDATES = 50  # strongest watched-next titles re-scored alongside
SEQUENCE_HISTORY = 2000  # history titles whose watched-next neighbours count (a whole published history)
FILTERED_SEARCH = int(os.environ.get("FILTERED_SEARCH", "30"))  # Annoy nodes per tree for a filtered request's first pool
EXACT_POOL = 5000  # filtered requests with at most this many eligible titles score them all exactly
SMALL_SETS = 16  # fixed small sets (a page's new arrivals per filters) whose vectors a worker keeps gathered
TEXT_DIM = 384  # all-MiniLM-L6-v2 (models.text)
NEIGHBOURS = 100  # nearest titles of a title in the published table (similar titles, "because you watched" rows)
NEARBY_SEEDS = 10  # recent titles whose nearest titles join a page's shared pool (nearby_titles)
NEIGHBOUR_CACHE = int(os.environ.get("NEIGHBOUR_CACHE", "10000"))  # titles cached per worker: ~1 KB each


@dataclass
class Recommendation:
    item: int
    score: float
    because: list[int]


class Recommender:
    """Read-only view of one published version."""

    def __init__(self, folder: str | Path, meta: dict | None = None):
        folder = Path(folder)
        self.folder = folder
        self.meta = meta if meta is not None else orjson.loads((folder / "meta.json").read_bytes())
        params = self.meta.get("params", {})
        self.regularization = float(params.get("user_regularization", params.get("regularization", 0.05)))
        self.search_k = int(params.get("search_k", -1))
        self.vectors = _mapped(folder / "item_vectors.npy")
        self.gram = np.load(folder / "gram.npy")
        self.n_items, self.dim = self.vectors.shape
        norms = np.linalg.norm(self.vectors, axis=1)
        self._unit = np.asarray(self.vectors) / np.maximum(norms, 1e-9)[:, None]
        self.items = orjson.loads((folder / "items.json").read_bytes())
        self.item_ids: list[str] = self.items["item_id"]
        self.titles: list[str] = self.items["title"]
        self.item_index = {item_id: row for row, item_id in enumerate(self.item_ids)}
        self.user_store: dict | None = self.meta.get("user_store")  # per-user records in Redis
        self.read_user: Callable[[str], UserRecord | None] | None = None  # the service's reader of them
        self._user_ids: list[str] | None = None
        self.user_index: dict[str, int] = {}
        self.hist_indptr = self.hist_items = self.hist_weights = None
        self.candidates = self.candidate_scores = self.candidate_because = None
        if self.user_store is None:  # per-user parts, memory-mapped
            self._user_ids = orjson.loads((folder / "users.json").read_bytes())
            self.user_index = {user_id: row for row, user_id in enumerate(self.user_ids)}
            self.hist_indptr = _mapped(folder / "history_indptr.npy")
            self.hist_items = _mapped(folder / "history_items.npy")
            self.hist_weights = _mapped(folder / "history_weights.npy")
            candidates = folder / "candidates.npy"
            self.candidates = _mapped(candidates) if candidates.is_file() else None
            self.candidate_scores = _mapped(folder / "candidate_scores.npy") if self.candidates is not None else None
            because = folder / "candidate_because.npy"  # optional: versions published before it compute live
            self.candidate_because = _mapped(because) if self.candidates is not None and because.is_file() else None
        self.popular = np.load(folder / "popular.npy")
        self.popular_head = self.popular[:POPULAR_CANDIDATES].tolist()
        self.seq_indptr = _mapped(folder / "seq_indptr.npy")
        self.seq_indices = _mapped(folder / "seq_indices.npy")
        self.seq_weights = _mapped(folder / "seq_weights.npy")
        self.seq_weight = float(params.get("seq_weight", 0.0))
        # Mean and covariance of the item vectors give the mean and spread of a query's
        # scores over the whole catalogue without scoring it (for the z-scored blend).
        vectors64 = np.asarray(self.vectors, dtype=np.float64)
        self.vector_mean = vectors64.mean(axis=0)
        self.vector_cov = np.cov(vectors64, rowvar=False, bias=True).reshape(self.dim, self.dim)
        del vectors64
        # mmap: shared between processes. Offline experiments open parts without indexes
        # (batch ranking only); a published version always has both (ModelStore checks).
        self.rec_index = _annoy(folder / "recommend.ann", self.dim, "dot")
        self.sim_index = _annoy(folder / "similar.ann", self.dim, "angular")
        # Optional parts: synopsis vectors and their index (GET /search), the 2-D map (the dashboard).
        self.text_index = _annoy(folder / "text.ann", TEXT_DIM, "angular")
        text = folder / "text_vectors.npy"
        self.text_vectors = _mapped(text) if text.is_file() else None
        self.map = np.load(folder / "map.npy") if (folder / "map.npy").is_file() else None
        self._small_sets: OrderedDict = OrderedDict()
        self._small_sets_lock = threading.Lock()
        # Each title's nearest titles, exact, tabled by the job (models.build.nearest_titles); versions
        # published before the table search Annoy and keep the answers in a per-worker cache.
        table = folder / "neighbours.npy"
        if table.is_file():
            self.neighbour_table = (_mapped(table), _mapped(folder / "neighbour_cosines.npy"))
            self.neighbours = self._tabled_neighbours
        else:
            self.neighbour_table = None
            self.neighbours = lru_cache(maxsize=NEIGHBOUR_CACHE)(self._neighbours)

    @property
    def version(self) -> str:
        return self.meta.get("model_version", self.folder.name)

    def close(self) -> None:
        for index in (self.rec_index, self.sim_index, self.text_index):
            if index is not None:
                index.unload()

    def with_histories(self, user_ids, indptr: np.ndarray, items: np.ndarray, weights: np.ndarray) -> Recommender:
        """This version's item side with other users' histories (CSR, newest first), sharing everything else.

        The Spark engine ranks each partition of users on its executors this way,
        with the same code the job and the service use.
        """
        view = copy.copy(self)
        view.user_store, view.read_user = None, None
        view._user_ids = list(user_ids)
        view.user_index = {user_id: row for row, user_id in enumerate(view.user_ids)}
        view.hist_indptr, view.hist_items, view.hist_weights = indptr, items, weights
        view.candidates = view.candidate_scores = view.candidate_because = None
        return view

    # -- the user side ---------------------------------------------------------------
    @property
    def user_ids(self) -> list[str]:
        """Every user id of this version (read on first use when the users are records: tools, not requests)."""
        if self._user_ids is None:
            self._user_ids = orjson.loads((self.folder / "users.json").read_bytes())
        return self._user_ids

    def user(self, user: str | UserRecord | None) -> UserRecord | None:
        """The published record of a user id (None: unknown to this version); a record passes through."""
        if not isinstance(user, str):
            return user
        if self.user_store is not None:
            return self.read_user(user) if self.read_user is not None else None
        row = self.user_index.get(user)
        if row is None:
            return None
        start, end = self.hist_indptr[row], self.hist_indptr[row + 1]
        if self.candidates is None:
            candidates, scores = np.empty(0, np.int32), np.empty(0, np.float32)
        else:
            candidates, scores = self.candidates[row], self.candidate_scores[row]
        because = self.candidate_because[row] if self.candidate_because is not None else None
        return UserRecord(np.asarray(self.hist_items[start:end]), np.asarray(self.hist_weights[start:end]), candidates, scores, because)

    def decode_user(self, raw: bytes | None) -> UserRecord | None:
        """A stored record checked against this version (a corrupt one counts as unknown, and is logged)."""
        if raw is None:
            return None
        try:
            return unpack_user(raw, self.n_items)
        except CorruptUser as exc:
            log.warning("version %s: ignoring a corrupt user record (%s)", self.version, exc)
            return None

    def history(self, user: str | UserRecord | None) -> tuple[np.ndarray, np.ndarray]:
        """Item indices (newest first) and confidences the model knows for ``user``."""
        record = self.user(user)
        if record is None:
            return np.empty(0, np.int32), np.empty(0, np.float32)
        return record.items, record.weights

    # -- scoring ---------------------------------------------------------------------
    def user_vector(self, items: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Least-squares user factor against fixed item vectors (the ALS user step).

        Solves (VᵀV + Vₕᵀ(Cₕ - I)Vₕ + λI) u = Vₕᵀ Cₕ 1, which is exactly how
        implicit ALS would place this user, so a user seen tonight and a user
        with fresh events are scored the same way.
        """
        items, weights = np.asarray(items), np.asarray(weights)
        if 0 < len(items) < self.dim and (weights >= 1.0).all():  # most users: the h x h Woodbury form
            return self._solve_one_short(items, weights)
        return self._solve_direct(*self._history_terms(items[None], weights[None]))[0]

    def _solve_one_short(self, items: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """:meth:`_solve_short` for one user, with G⁻¹ (d x d, per version) instead of the batch's V G⁻¹ rows."""
        vh = np.asarray(self.vectors[items], dtype=np.float64)  # [h, d]
        wh = vh @ self._gram_inverse  # Vₕ G⁻¹ (G is symmetric)
        confidence = np.asarray(weights, dtype=np.float64)
        root = np.sqrt(confidence - 1.0)
        y = confidence @ wh
        inner = root[:, None] * (vh @ wh.T) * root[None, :]
        inner[np.diag_indices(len(items))] += 1.0
        s = np.linalg.solve(inner, root * (vh @ y))
        return (y - (root * s) @ wh).astype(np.float32)

    @cached_property
    def _gram_inverse(self) -> np.ndarray:
        """(VᵀV + λI)⁻¹, float64 d x d."""
        return np.linalg.inv(self.gram.astype(np.float64) + self.regularization * np.eye(self.dim))

    def user_vectors(self, items: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """:meth:`user_vector` for many users at once: ``items`` [n, h] padded with -1.

        The job solves users in batches of similar history length; padding adds
        zero rows, so each user gets the same factor as alone. Batches of
        histories shorter than the embedding (most users) take the Woodbury
        form of the same solve, h x h instead of d x d. Batches solve in float32,
        the precision implicit's ALS itself fits in (a request's one user in
        float64): at 150,000 users the scores agree to 3e-6 of their size, and
        the user step costs a third less (4.8 -> 3.2 CPU-seconds).
        """
        present, vh, confidence = self._history_terms(items, weights)
        if items.shape[1] < self.dim and len(items) > 1 and (confidence[present] >= 1.0).all():
            return self._solve_short(items, present, vh, confidence)
        return self._solve_direct(present, vh, confidence)

    def _history_terms(self, items: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        present = items >= 0
        if len(items) > 1:  # a batch (the job): one gather; padding (-1) reads the zero last row
            vh = self._vectors_padded[items]  # [n, h, d] float32
        else:
            vh = np.where(present[..., None], self.vectors[np.maximum(items, 0)], 0.0).astype(np.float64)
        return present, vh, np.where(present, weights, 0.0).astype(vh.dtype)

    def _solve_direct(self, present: np.ndarray, vh: np.ndarray, confidence: np.ndarray) -> np.ndarray:
        vh_t = vh.transpose(0, 2, 1)
        a = self.gram.astype(vh.dtype) + (vh_t * (confidence - 1.0)[:, None, :]) @ vh
        a[:, np.arange(self.dim), np.arange(self.dim)] += self.regularization
        b = vh_t @ confidence[..., None]
        return np.linalg.solve(a, b)[..., 0].astype(np.float32)

    def _solve_short(self, items: np.ndarray, present: np.ndarray, vh: np.ndarray, confidence: np.ndarray) -> np.ndarray:
        """The same solve through Woodbury: with G = VᵀV + λI, D = Cₕ - I >= 0 and Wₕ = Vₕ G⁻¹,
        u = y - Wₕᵀ D^½ (I + D^½ Vₕ Wₕᵀ D^½)⁻¹ D^½ Vₕ y where y = G⁻¹ Vₕᵀ Cₕ 1 = Wₕᵀ Cₕ 1.
        """
        wh = self._gram_solved_rows[items]  # [n, h, d]; padding (-1) reads the zero last row
        root = np.sqrt(np.maximum(confidence - 1.0, 0.0))  # padding: 0
        y = np.einsum("nhd,nh->nd", wh, confidence)
        inner = root[:, :, None] * (vh @ wh.transpose(0, 2, 1)) * root[:, None, :]
        inner[:, np.arange(items.shape[1]), np.arange(items.shape[1])] += 1.0
        z = root * np.einsum("nhd,nd->nh", vh, y)
        s = np.linalg.solve(inner, z[..., None])[..., 0]
        return (y - np.einsum("nhd,nh->nd", wh, root * s)).astype(np.float32)

    @cached_property
    def _gram_solved_rows(self) -> np.ndarray:
        """V G⁻¹ (solved in float64, kept float32 [items + 1, d], the last row zero for padding); only
        batch solves build it, never a serving worker."""
        g = self.gram.astype(np.float64) + self.regularization * np.eye(self.dim)
        solved = np.linalg.solve(g, np.asarray(self.vectors, dtype=np.float64).T).T
        return np.vstack([solved, np.zeros((1, self.dim))]).astype(np.float32)

    @cached_property
    def _vectors_padded(self) -> np.ndarray:
        """V as float32 [items + 1, d], the last row zero for padding; batch solves only, as above."""
        return np.vstack([np.asarray(self.vectors, dtype=np.float32), np.zeros((1, self.dim), np.float32)])

    def sequence_scores(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Titles "watched next" to the history and their summed strengths (sparse: (items, values))."""
        history = np.asarray(history[:SEQUENCE_HISTORY])
        if self.seq_weight <= 0 or len(history) == 0:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        starts, ends = self.seq_indptr[history], self.seq_indptr[history + 1]
        if int((ends - starts).sum()) == 0:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        lengths = ends - starts
        positions = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
        items, inverse = np.unique(self.seq_indices[positions], return_inverse=True)
        return items.astype(np.int64), np.bincount(inverse, weights=self.seq_weights[positions].astype(np.float64))

    def blended_scores(
        self, query: np.ndarray, pool: np.ndarray, seq_items: np.ndarray, seq_values: np.ndarray,
        pool_vectors: np.ndarray | None = None,
    ) -> np.ndarray:
        """Embedding score z-scored over the catalogue, plus ``seq_weight`` x the z-scored sequence score.

        Exactly what the job's batch ranking computes over every title, restricted to ``pool``.
        ``pool_vectors``: the pool's rows of the item vectors, when the caller keeps them (a fixed set
        scored for many requests, :meth:`small_set`; ``pool`` is then sorted).
        """
        q = np.asarray(query, dtype=np.float64)
        vectors = self.vectors[pool] if pool_vectors is None else pool_vectors
        dot = (vectors @ np.asarray(query, dtype=np.float32)).astype(np.float64)  # float32, as the job's
        spread = np.sqrt(max(float(q @ self.vector_cov @ q), 1e-12))
        score = (dot - float(q @ self.vector_mean)) / spread
        if len(seq_items):
            mean = seq_values.sum() / self.n_items
            sd = np.sqrt(max((seq_values**2).sum() / self.n_items - mean**2, 1e-24))
            if pool_vectors is not None and len(pool):  # sorted pool: find the few watched-next titles in it
                at = np.minimum(np.searchsorted(pool, seq_items), len(pool) - 1)
                hit = pool[at] == seq_items
                value = np.zeros(len(pool))
                value[at[hit]] = seq_values[hit]
            else:
                at = np.minimum(np.searchsorted(seq_items, pool), len(seq_items) - 1)
                value = np.where(seq_items[at] == pool, seq_values[at], 0.0)
            score = score + self.seq_weight * (value - mean) / sd
        return score

    def small_set(self, key, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The titles of ``mask`` (at most ``EXACT_POOL``; sorted) and their vectors, gathered once per ``key``
        (a page's "new" row scores the same few thousand titles for every user: gathering them is most of it)."""
        with self._small_sets_lock:
            found = self._small_sets.get(key)
            if found is not None:
                self._small_sets.move_to_end(key)
                return found
        titles = np.flatnonzero(mask)
        found = titles, np.ascontiguousarray(self.vectors[titles])
        with self._small_sets_lock:
            self._small_sets[key] = found
            while len(self._small_sets) > SMALL_SETS:
                self._small_sets.popitem(last=False)
        return found

    def top_of_small_set(
        self, key, mask: np.ndarray, allowed: np.ndarray, query: np.ndarray, sequence: tuple[np.ndarray, np.ndarray], k: int
    ) -> list[tuple[int, float]]:
        """Exact top ``k`` of the titles in ``mask`` that ``allowed`` lets through (see :meth:`small_set`)."""
        titles, vectors = self.small_set(key, mask)
        if len(titles) == 0:
            return []
        scores = self.blended_scores(query, titles, *sequence, pool_vectors=vectors)
        scores[~allowed[titles]] = -np.inf
        top = top_k(scores, k)
        return [(t, s) for t, s in zip(titles[top].tolist(), scores[top].tolist()) if s > -np.inf]

    def nearest_unseen(
        self, query: np.ndarray, k: int, exclude: set[int], history: np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        """Top ``k`` titles for ``query`` (and ``history``'s watched-next titles) through Annoy, minus ``exclude``.

        Annoy releases the GIL while it searches, so the job runs these in threads.
        """
        # Annoy's trees split by direction, so high-norm vectors (popular titles, which
        # inner-product scoring favours) are easily missed; the popular head and the
        # strongest watched-next titles join the candidates and all are re-scored exactly.
        found = self.rec_index.get_nns_by_vector(query, max(k, ANNOY_CANDIDATES) + len(exclude), search_k=self.search_k)
        seq_items, seq_values = self.sequence_scores(history if history is not None else np.empty(0, np.int64))
        strongest = seq_items[np.argsort(-seq_values)[: SEQUENCE_CANDIDATES + len(exclude)]].tolist()
        pool = np.fromiter(
            (i for i in dict.fromkeys([*found, *self.popular_head, *strongest]) if i not in exclude), dtype=np.int64
        )
        if len(pool) == 0:
            return []
        scores = self.blended_scores(query, pool, seq_items, seq_values)
        top = top_k(scores, k)
        return list(zip(pool[top].tolist(), scores[top].tolist()))

    def recommend_from_history(
        self, items: np.ndarray, weights: np.ndarray, k: int, exclude: set[int] | None = None
    ) -> list[tuple[int, float]]:
        """Top ``k`` unseen titles for a history, through the Annoy index."""
        exclude = set(int(i) for i in items) if exclude is None else exclude
        return self.nearest_unseen(self.user_vector(items, weights), k, exclude, history=np.asarray(items))

    def because(self, recommended: list[int], history: np.ndarray, limit: int = 2) -> list[list[int]]:
        """For each recommended title, the history titles most similar to it (cosine)."""
        if len(history) == 0 or not recommended:
            return [[] for _ in recommended]
        # One user: the same rule as because_rows (the best explains; the next only if cosine > 0), in fewer calls.
        history = np.asarray(history[:BECAUSE_HISTORY])
        sims = self._unit[np.asarray(recommended)] @ self._unit[history].T  # [k, h]
        order = np.argsort(-sims, axis=1, kind="stable")[:, :limit]
        best = np.take_along_axis(sims, order, axis=1)
        titles, best = history[order].tolist(), best.tolist()
        return [[t for n, (t, c) in enumerate(zip(row, cos)) if n == 0 or c > 0] for row, cos in zip(titles, best)]

    def candidate_reasons(self, record: UserRecord, keep: list[int]) -> list[list[int]]:
        """The published "because" titles of the user's candidates at positions ``keep``."""
        because = record.because[keep]
        if because.dtype != np.uint8:  # versions before history positions stored the titles
            return [[t for t in pair if t >= 0] for pair in because.tolist()]
        history = record.items
        return [[int(history[p]) for p in pair if p != NO_REASON] for pair in because.tolist()]

    def because_rows(self, recommended: np.ndarray, history: np.ndarray, limit: int = 2) -> np.ndarray:
        """:meth:`because` for many users: [n, k] titles and [n, h] histories (-1 = none) -> [n, k, limit]
        positions in ``history`` (uint8, :data:`NO_REASON` = none; ``h`` is at most ``BECAUSE_HISTORY``).

        The most similar history title always explains; the next ones only if
        similar at all (cosine > 0). A few whole-array numpy calls rather than
        several per row: on arrays this small each call costs microseconds.
        """
        out = np.full((*recommended.shape, limit), NO_REASON, dtype=np.uint8)
        if history.shape[1] == 0:
            return out
        sims = self._unit[np.maximum(recommended, 0)] @ self._unit[np.maximum(history, 0)].transpose(0, 2, 1)
        sims = np.where((history >= 0)[:, None, :], sims, -np.inf)  # [n, k, h]; padding sorts last
        for slot in range(min(limit, history.shape[1])):  # best, then next best: cheaper than a sort
            best = sims.argmax(axis=2)  # [n, k]
            similar = np.take_along_axis(sims, best[..., None], axis=2)[..., 0] > 0
            keep = (similar | (slot == 0)) & (recommended >= 0)
            out[:, :, slot] = np.where(keep, best, NO_REASON)
            np.put_along_axis(sims, best[..., None], -np.inf, axis=2)
        return out

    # -- the three questions the service answers ------------------------------------
    @cached_property
    def rules(self) -> CatalogRules:
        """Eligibility arrays of this version's catalogue rules (models.rules)."""
        return CatalogRules(self.items)

    def recommend(
        self,
        user: str | UserRecord | None,
        k: int,
        fresh_items: np.ndarray | None = None,
        fresh_weights: np.ndarray | None = None,
        filters: Filters | None = None,
        exclude: set[int] | None = None,
        now: float | None = None,
    ) -> tuple[str, list[Recommendation]]:
        """("personalized" | "popular", recommendations) for a user.

        ``fresh_*`` are events that arrived after this version was built; they
        join the history, are excluded, and force a fresh computation.
        Only titles ``filters`` allow right now (the availability window
        always applies) and not in ``exclude`` are returned, and ``k`` of them
        whenever ``k`` such unseen titles exist: when the precomputed
        candidates run out, the search goes deeper (a wider Annoy search,
        then exact scoring over every eligible title).
        """
        eligible = self.rules.eligible(filters, now)
        exclude = exclude or set()
        record = self.user(user)
        items, weights = self.history(record)
        if fresh_items is not None and len(fresh_items):
            items, weights = merge_history(fresh_items, fresh_weights, items, weights)
        if len(items) == 0:
            return "popular", self.popular_items(k, exclude=exclude, eligible=eligible)
        if self.meta.get("ranking") == "popularity":  # a popularity-only baseline (models.experiments.publish_baseline)
            return "popular", self.popular_items(k, exclude=set(items.tolist()) | exclude, eligible=eligible)
        fresh = fresh_items is not None and len(fresh_items) > 0
        picked, reasons = None, None
        published = None if fresh else self.published_top(record, k, eligible, exclude)
        if published is not None:
            keep, picked = published
            if record.because is not None:
                reasons = self.candidate_reasons(record, keep)
        seen = set(items.tolist()) if picked is None or len(picked) < k else set()  # only ranking and top-ups need it
        if picked is None:
            picked = self.ranked(items, weights, k, eligible, seen | exclude)
        if not picked:
            return "popular", self.popular_items(k, exclude=seen | exclude, eligible=eligible)
        if reasons is None:
            reasons = self.because([i for i, _ in picked], items)
        recs = [Recommendation(i, s, r) for (i, s), r in zip(picked, reasons)]
        if len(recs) < k:  # tiny catalogues or heavy users: top up from the popular list
            recs += self.popular_items(k - len(recs), exclude=seen | exclude | {r.item for r in recs}, eligible=eligible)
        return "personalized", recs

    def published_top(
        self, user: str | UserRecord | None, k: int, eligible: np.ndarray, exclude: set[int]
    ) -> tuple[list[int], list[tuple[int, float]]] | None:
        """The exact top ``k`` of ``eligible`` titles not in ``exclude``, from the user's published candidates
        (their best unseen titles of the whole catalogue, best first), when those hold ``k`` of them.

        (positions in the candidate list, [(title, score)]); None when the candidates run short (the
        caller ranks live) or the user has none. Valid only for the published history (no fresh events).
        """
        record = self.user(user)
        if record is None or len(record.candidates) == 0:
            return None
        cands = record.candidates
        real = cands >= 0  # -1 pads the lists of versions with per-user parts
        ok = real.copy()
        ok[real] = eligible[cands[real]]
        keep = np.flatnonzero(ok).tolist()
        if exclude:  # a few hundred set lookups: cheaper than np.isin on arrays this small
            titles = cands.tolist()
            keep = [n for n in keep if titles[n] not in exclude]
        # Fewer than k is still the whole answer when the list is not full (the user has seen nearly everything).
        if len(keep) < k and (len(keep) != np.count_nonzero(real) or k > len(cands)):
            return None
        keep = keep[:k]
        return keep, list(zip(cands[keep].tolist(), record.scores[keep].tolist()))

    def ranked(
        self,
        items: np.ndarray,
        weights: np.ndarray,
        k: int,
        eligible: np.ndarray,
        exclude: set[int],
        query: np.ndarray | None = None,
        sequence: tuple[np.ndarray, np.ndarray] | None = None,
        nearest: list[int] | None = None,
    ) -> list[tuple[int, float]]:
        """Top ``k`` eligible titles not in ``exclude`` for a history (``query``/``sequence``: its precomputed terms).

        1. The usual candidate pool (Annoy's nearest, the popular head, the
           strongest watched-next titles), cut to eligible titles: enough
           unless the filters leave a small share of the catalogue.
        2. Otherwise every eligible title is scored exactly when there are
           at most ``EXACT_POOL`` of them, else a wider Annoy search first.
        """
        history = np.asarray(items)
        query = self.user_vector(items, weights) if query is None else query
        seq_items, seq_values = self.sequence_scores(history) if sequence is None else sequence
        if exclude:  # one mask for the filters and the exclusions: cheaper than np.isin on every pool
            eligible = eligible.copy()
            eligible[np.fromiter(exclude, dtype=np.int64, count=len(exclude))] = False
        n_eligible = int(np.count_nonzero(eligible))
        if n_eligible > EXACT_POOL:
            for wide in (ANNOY_CANDIDATES, max(10 * k, 1000) * max(1, self.n_items // n_eligible)):
                if wide >= self.n_items // 4:
                    break
                # The nodes searched grow with ``wide``, not with the exclusions (a long history would
                # otherwise multiply the cost): excluded titles just leave fewer in the pool.
                if wide == ANNOY_CANDIDATES and nearest is not None:
                    found = nearest  # a page finds its pool once for all its rows (nearby_titles)
                else:
                    found = self.nearest_pool(query, wide + len(exclude), wide)
                strongest = seq_items[np.argsort(-seq_values)[: SEQUENCE_CANDIDATES + len(exclude)]].tolist()
                pool = np.fromiter(dict.fromkeys([*found, *self.popular_head, *strongest]), dtype=np.int64)
                pool = pool[eligible[pool]]
                if len(pool) >= k:
                    return self._top(query, pool, seq_items, seq_values, k)
        pool = np.flatnonzero(eligible)  # exact over every eligible title
        return self._top(query, pool, seq_items, seq_values, k)

    def nearby_titles(self, user: str | UserRecord | None, history: np.ndarray, query: np.ndarray, n: int) -> list[int]:
        """Titles close to a user, found without a search: the user's published candidates and the tabled
        nearest titles of their ``NEARBY_SEEDS`` most recent titles (a page's shared pool; re-scored exactly
        by the caller). Versions without the neighbour table ask Annoy for ``n`` near ``query``.
        """
        if self.neighbour_table is None:
            return self.nearest_pool(query, n)
        parts = [self.neighbour_table[0][np.asarray(history[:NEARBY_SEEDS], dtype=np.int64)].ravel()]
        record = self.user(user)
        if record is not None and len(record.candidates):
            parts.insert(0, record.candidates)
        pool = np.concatenate(parts)
        return pool[pool >= 0].tolist()

    def nearest_pool(self, query: np.ndarray, n: int, width: int = ANNOY_CANDIDATES) -> list[int]:
        """Annoy's ``n`` nearest to ``query``, searching nodes in proportion to ``width`` (not to ``n``)."""
        search_k = self.rec_index.get_n_trees() * (FILTERED_SEARCH if width == ANNOY_CANDIDATES else width)
        return self.rec_index.get_nns_by_vector(query, n, search_k=search_k)

    def _top(self, query, pool: np.ndarray, seq_items, seq_values, k: int) -> list[tuple[int, float]]:
        if len(pool) == 0:
            return []
        scores = self.blended_scores(query, pool, seq_items, seq_values)
        top = top_k(scores, k)
        return list(zip(pool[top].tolist(), scores[top].tolist()))

    def popular_items(self, k: int, exclude: set[int], eligible: np.ndarray | None = None) -> list[Recommendation]:
        """The most popular titles (then, past the published popular list, the highest-norm vectors)."""
        out, popular = [], self.popular
        n = min(len(popular), 2 * (k + len(exclude)) + 32)  # a head that usually holds k: looked at in one go
        while True:
            head = popular[:n]
            ranks = np.flatnonzero(eligible[head]) if eligible is not None else np.arange(len(head))
            found = ((rank, item) for rank, item in zip(ranks.tolist(), head[ranks].tolist()) if item not in exclude)
            out = [Recommendation(item, 1.0 / (1 + rank), []) for rank, item in itertools.islice(found, k)]
            if len(out) == k:
                return out
            if n == len(popular):
                break
            n = min(len(popular), 4 * n)
        if eligible is not None and len(out) < k and len(self.popular) < self.n_items:
            taken = exclude | {r.item for r in out} | set(self.popular.tolist())
            rest = np.flatnonzero(eligible)
            rest = rest[~np.isin(rest, np.fromiter(taken, dtype=np.int64))] if taken else rest
            norms = np.linalg.norm(self.vectors[rest], axis=1)
            for item in rest[np.argsort(-norms, kind="stable")][: k - len(out)].tolist():
                out.append(Recommendation(item, 1.0 / (1 + len(self.popular) + len(out)), []))
        return out

    def diversify(self, picked: list, k: int, diversity: float) -> list:
        """Maximal marginal relevance: re-rank ``picked`` (objects with ``.item`` and ``.score``, best first) to ``k``.

        Each step takes the title maximising ``(1 - diversity) * relevance -
        diversity * (highest cosine to a title already taken)``, relevance being
        the score rescaled to [0, 1] within ``picked``. 0 keeps the order; 1
        ignores relevance after the first title.
        """
        if diversity <= 0 or len(picked) <= 1:
            return picked[:k]
        n = len(picked)
        scores = [p.score for p in picked]
        low, high = min(scores), max(scores)
        gain = np.array(scores)  # relevance rescaled to [0, 1], x (1 - diversity)
        gain = (gain - low) * ((1 - diversity) / (high - low)) if high > low else np.full(n, 1.0 - diversity)
        unit = self._unit[[p.item for p in picked]]
        # after[j, i]: title i's value once j is taken. A title's value is its gain minus diversity x its
        # highest cosine to the taken ones, i.e. the minimum of after[j, i] over the taken j.
        after = gain - diversity * (unit @ unit.T).astype(np.float64)
        np.fill_diagonal(after, -np.inf)  # a taken title is not taken again
        best = int(gain.argmax())  # nothing is taken yet: relevance alone
        chosen, value = [best], after[best].copy()
        for _ in range(min(k, n) - 1):  # two small numpy calls a step
            best = int(value.argmax())
            chosen.append(best)
            np.minimum(value, after[best], out=value)
        return [picked[i] for i in chosen]

    def similar(
        self, item: int, k: int, eligible: np.ndarray | None = None, exclude: set[int] | None = None
    ) -> list[tuple[int, float]]:
        """Nearest titles by cosine, never ``item`` itself; only ``eligible`` ones not in ``exclude``."""
        exclude = exclude or set()
        if k + 1 <= NEIGHBOURS:
            found, cosine = self.neighbours(item)
            keep = found != item
            if eligible is not None:
                keep &= eligible[found]
            out = [(i, c) for i, c in zip(found[keep].tolist(), cosine[keep].tolist()) if i not in exclude][:k]
            if len(out) == k or len(found) < NEIGHBOURS:
                return out
        n = max(k + 1 + len(exclude), 10 * NEIGHBOURS)  # the cached list was not enough: search wider
        search_k = self.sim_index.get_n_trees() * max(100, 3 * (k + 1))
        while n * 10 < self.n_items // 4:
            found, dist = self.sim_index.get_nns_by_item(item, n, search_k=max(search_k, n), include_distances=True)
            out = [
                (i, 1.0 - d * d / 2.0)
                for i, d in zip(found, dist)
                if i != item and i not in exclude and (eligible is None or eligible[i])
            ][:k]
            if len(out) == k or len(found) < n:
                return out
            n *= 10
        pool = np.flatnonzero(eligible) if eligible is not None else np.arange(self.n_items)  # exact
        pool = pool[(pool != item) & ~np.isin(pool, np.fromiter(exclude, dtype=np.int64))] if len(pool) else pool
        cosine = self._unit[pool] @ self._unit[item]
        top = top_k(cosine, k)
        return list(zip(pool[top].tolist(), cosine[top].tolist()))


    @cached_property
    def title_rows(self) -> dict[str, tuple[int, ...]]:
        """Lower-cased title -> its rows (titles repeat: remakes, sequels with the same name)."""
        out: dict[str, list[int]] = {}
        for row, title in enumerate(self.titles):
            out.setdefault(title.lower(), []).append(row)
        return {title: tuple(rows) for title, rows in out.items()}

    def search_text(self, vector: np.ndarray, n: int, eligible: np.ndarray, exclude: set[int]) -> list[tuple[int, float]]:
        """Up to ``n`` eligible titles whose synopses are closest to ``vector`` (cosine), best first.

        The Annoy index first; when filters leave too few of its answers, every
        eligible title with a synopsis is scored exactly.
        """
        found, dist = self.text_index.get_nns_by_vector(
            vector, n, search_k=self.text_index.get_n_trees() * n, include_distances=True
        )
        out = [(i, 1.0 - d * d / 2.0) for i, d in zip(found, dist) if eligible[i] and i not in exclude]
        if len(out) >= n // 2 or self.text_vectors is None:
            return out
        pool = np.flatnonzero(eligible)
        if exclude:
            pool = pool[~np.isin(pool, np.fromiter(exclude, dtype=np.int64))]
        cosine = self.text_vectors[pool].astype(np.float32) @ np.asarray(vector, dtype=np.float32)
        keep = np.abs(self.text_vectors[pool]).sum(axis=1) > 0  # titles without a synopsis never match by meaning
        pool, cosine = pool[keep], cosine[keep]
        top = top_k(cosine, n)
        return list(zip(pool[top].tolist(), cosine[top].astype(float).tolist()))

    def _tabled_neighbours(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        found, cosines = self.neighbour_table
        row = found[item]
        n = int(np.count_nonzero(row >= 0))  # -1 pads a catalogue of at most NEIGHBOURS titles
        return row[:n], cosines[item, :n]

    def _neighbours(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``NEIGHBOURS`` nearest titles of ``item`` by cosine (itself included when found) and their cosines."""
        search_k = self.sim_index.get_n_trees() * 100
        found, dist = self.sim_index.get_nns_by_item(item, NEIGHBOURS, search_k=search_k, include_distances=True)
        # Annoy's angular distance is sqrt(2 - 2 cos); report the cosine.
        return np.array(found, dtype=np.int32), 1.0 - np.square(np.array(dist, dtype=np.float32)) / 2.0


def open_version(store, version: str, cache_dir) -> Recommender:
    """A version materialised from ``store`` and opened, its user records read straight from Redis
    (tools and tests; the service reads them through :mod:`app.live_model`)."""
    model = Recommender(store.materialize(version, cache_dir))
    if model.user_store is not None:
        model.read_user = lambda user_id: model.decode_user(store.read_user(version, model.user_store, user_id))
    return model


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest scores, best first, ties by position: ``argsort(-scores, stable)[:k]``,
    without sorting the whole array (a partition finds the k-th score; only those at or above it are sorted)."""
    if len(scores) <= 4 * k:
        return np.argsort(-scores, kind="stable")[:k]
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]
    at_least = np.flatnonzero(scores >= kth)
    return at_least[np.argsort(-scores[at_least], kind="stable")][:k]


def _annoy(path: Path, dim: int, metric: str) -> AnnoyIndex | None:
    if not path.is_file():
        return None
    index = AnnoyIndex(dim, metric)
    index.load(str(path))
    return index


def _mapped(path: Path) -> np.ndarray:
    """A read-only memory-mapped .npy as a plain ndarray view (shared page cache, no copy).

    ``np.memmap`` runs Python code on every index; the plain view does not.
    """
    return np.asarray(np.load(path, mmap_mode="r"))


def merge_history(
    newer_items: np.ndarray, newer_weights: np.ndarray, items: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fresh events in front of the stored history; a title seen in both has its confidences summed."""
    all_items = np.concatenate([np.asarray(newer_items, np.int32), np.asarray(items, np.int32)])
    all_weights = np.concatenate([np.asarray(newer_weights, np.float32), np.asarray(weights, np.float32)])
    unique, first, inverse = np.unique(all_items, return_index=True, return_inverse=True)
    summed = np.bincount(inverse, weights=all_weights).astype(np.float32)
    order = np.argsort(first)
    return unique[order].astype(np.int32), summed[order]
