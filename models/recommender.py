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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from annoy import AnnoyIndex


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
        self.vectors = np.load(folder / "item_vectors.npy", mmap_mode="r")
        self.gram = np.load(folder / "gram.npy")
        self.n_items, self.dim = self.vectors.shape
        norms = np.linalg.norm(self.vectors, axis=1)
        self._unit = np.asarray(self.vectors) / np.maximum(norms, 1e-9)[:, None]
        self.items = orjson.loads((folder / "items.json").read_bytes())
        self.item_ids: list[str] = self.items["item_id"]
        self.titles: list[str] = self.items["title"]
        self.item_index = {item_id: row for row, item_id in enumerate(self.item_ids)}
        self.user_ids: list[str] = orjson.loads((folder / "users.json").read_bytes())
        self.user_index = {user_id: row for row, user_id in enumerate(self.user_ids)}
        self.hist_indptr = np.load(folder / "history_indptr.npy", mmap_mode="r")
        self.hist_items = np.load(folder / "history_items.npy", mmap_mode="r")
        self.hist_weights = np.load(folder / "history_weights.npy", mmap_mode="r")
        self.popular = np.load(folder / "popular.npy")
        candidates = folder / "candidates.npy"
        self.candidates = np.load(candidates, mmap_mode="r") if candidates.is_file() else None
        self.candidate_scores = (
            np.load(folder / "candidate_scores.npy", mmap_mode="r") if self.candidates is not None else None
        )
        self.rec_index = AnnoyIndex(self.dim, "dot")
        self.rec_index.load(str(folder / "recommend.ann"))  # mmap: shared between processes
        self.sim_index = AnnoyIndex(self.dim, "angular")
        self.sim_index.load(str(folder / "similar.ann"))

    @property
    def version(self) -> str:
        return self.meta.get("model_version", self.folder.name)

    def close(self) -> None:
        self.rec_index.unload()
        self.sim_index.unload()

    # -- history -------------------------------------------------------------------
    def history(self, user_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Item indices (newest first) and confidences the model knows for ``user_id``."""
        row = self.user_index.get(user_id)
        if row is None:
            return np.empty(0, np.int32), np.empty(0, np.float32)
        start, end = self.hist_indptr[row], self.hist_indptr[row + 1]
        return np.asarray(self.hist_items[start:end]), np.asarray(self.hist_weights[start:end])

    # -- scoring ---------------------------------------------------------------------
    def user_vector(self, items: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Least-squares user factor against fixed item vectors (the ALS user step).

        Solves (VᵀV + Vₕᵀ(Cₕ - I)Vₕ + λI) u = Vₕᵀ Cₕ 1, which is exactly how
        implicit ALS would place this user, so a user seen tonight and a user
        with fresh events are scored the same way.
        """
        vh = np.asarray(self.vectors[items], dtype=np.float64)
        confidence = np.asarray(weights, dtype=np.float64)
        a = self.gram.astype(np.float64) + (vh.T * (confidence - 1.0)) @ vh
        a[np.diag_indices_from(a)] += self.regularization
        b = vh.T @ confidence
        return np.linalg.solve(a, b).astype(np.float32)

    def recommend_from_history(
        self, items: np.ndarray, weights: np.ndarray, k: int, exclude: set[int] | None = None
    ) -> list[tuple[int, float]]:
        """Top ``k`` unseen titles for a history, through the Annoy index."""
        exclude = set(int(i) for i in items) if exclude is None else exclude
        query = self.user_vector(items, weights)
        wanted = k + len(exclude)
        found, scores = self.rec_index.get_nns_by_vector(
            query, wanted, search_k=self.search_k, include_distances=True
        )
        out = [(i, s) for i, s in zip(found, scores) if i not in exclude]
        return out[:k]

    def because(self, recommended: list[int], history: np.ndarray, limit: int = 2) -> list[list[int]]:
        """For each recommended title, the history titles most similar to it (cosine)."""
        if len(history) == 0 or not recommended:
            return [[] for _ in recommended]
        hist = np.asarray(history[:200])
        sims = self._unit[recommended] @ self._unit[hist].T  # [k, h]
        take = min(limit, sims.shape[1])
        top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        out = []
        for row, cols in enumerate(top):
            cols = cols[np.argsort(-sims[row, cols])]
            out.append([int(hist[c]) for c in cols if sims[row, c] > 0] or [int(hist[cols[0]])])
        return out

    # -- the three questions the service answers ------------------------------------
    def recommend(
        self,
        user_id: str,
        k: int,
        fresh_items: np.ndarray | None = None,
        fresh_weights: np.ndarray | None = None,
    ) -> tuple[str, list[Recommendation]]:
        """("personalized" | "popular", recommendations) for a user.

        ``fresh_*`` are events that arrived after this version was built; they
        join the history, are excluded, and force a fresh computation.
        """
        items, weights = self.history(user_id)
        if fresh_items is not None and len(fresh_items):
            items, weights = merge_history(fresh_items, fresh_weights, items, weights)
        if len(items) == 0:
            return "popular", self.popular_items(k, exclude=set())
        row = self.user_index.get(user_id)
        fresh = fresh_items is not None and len(fresh_items) > 0
        if not fresh and row is not None and self.candidates is not None and k <= self.candidates.shape[1]:
            cands = self.candidates[row]
            picked = [(int(i), float(s)) for i, s in zip(cands[:k], self.candidate_scores[row, :k]) if i >= 0]
        else:
            picked = self.recommend_from_history(items, weights, k)
        if not picked:
            return "popular", self.popular_items(k, exclude=set(int(i) for i in items))
        reasons = self.because([i for i, _ in picked], items)
        recs = [Recommendation(i, s, r) for (i, s), r in zip(picked, reasons)]
        if len(recs) < k:  # tiny catalogues or heavy users: top up from the popular list
            seen = set(int(i) for i in items) | {r.item for r in recs}
            recs += self.popular_items(k - len(recs), exclude=seen)
        return "personalized", recs

    def popular_items(self, k: int, exclude: set[int]) -> list[Recommendation]:
        out = []
        for rank, item in enumerate(self.popular):
            if int(item) in exclude:
                continue
            out.append(Recommendation(int(item), float(1.0 / (1 + rank)), []))
            if len(out) == k:
                break
        return out

    def similar(self, item: int, k: int) -> list[tuple[int, float]]:
        found, dist = self.sim_index.get_nns_by_item(item, k + 1, include_distances=True)
        # Annoy's angular distance is sqrt(2 - 2 cos); report the cosine.
        return [(i, 1.0 - d * d / 2.0) for i, d in zip(found, dist) if i != item][:k]


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
