"""Turning learned embeddings into the parts of a publishable version.

:func:`build_parts` writes the Annoy indexes, item metadata, capped user
histories and the popular fallback; :func:`add_candidates` then opens the
result as the service would (:class:`models.recommender.Recommender`) and
precomputes each user's top titles, so the request path is a lookup.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import scipy.sparse as sp
from annoy import AnnoyIndex

from models.data import Catalog, Events
from models.embeddings import Embeddings, ModelParams
from models.recommender import Recommender
from models.progress import progress

log = logging.getLogger(__name__)

POPULAR_SIZE = 1000


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def annoy_bytes(vectors: np.ndarray, metric: str, n_trees: int, seed: int) -> bytes:
    index = AnnoyIndex(vectors.shape[1], metric)
    index.set_seed(seed)
    for row, vector in enumerate(vectors):
        index.add_item(row, vector)
    index.build(n_trees, n_jobs=-1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.ann"
        index.save(str(path))
        index.unload()
        return path.read_bytes()


def recent_histories(events: Events, confidence: sp.csr_matrix, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (indptr, items, confidences) of each user's distinct titles, newest first, capped."""
    n_users = len(events.user_ids)
    # Last time each (user, title) pair was watched, then order within the user by it.
    order = np.lexsort((events.timestamp, events.item, events.user))
    u, i, t = events.user[order], events.item[order], events.timestamp[order]
    last = np.ones(len(u), dtype=bool)
    last[:-1] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    u, i, t = u[last], i[last], t[last]
    by_recency = np.lexsort((-t, u))
    u, i = u[by_recency], i[by_recency]
    counts = np.bincount(u, minlength=n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(u)) - starts[u]
    keep = rank < cap
    u, i = u[keep], i[keep]
    weights = np.asarray(confidence[u, i]).ravel().astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(np.minimum(counts, cap))]).astype(np.int64)
    return indptr, i.astype(np.int32), weights


def popular_items(events: Events, n_items: int, confidence: sp.csr_matrix) -> np.ndarray:
    """Titles by distinct recent-weighted viewers (a title binged by few ranks below one many watched)."""
    viewers = np.asarray((confidence > 0).sum(axis=0)).ravel().astype(np.float64)
    strength = np.asarray(confidence.sum(axis=0)).ravel()
    score = viewers + 1e-6 * strength  # ties broken by total confidence
    return np.argsort(-score, kind="stable")[: min(POPULAR_SIZE, n_items)].astype(np.int32)


def catalog_columns(catalog: Catalog) -> dict:
    items = catalog.items

    def optional(name: str) -> list:
        return [None if not np.isfinite(v) else int(v) for v in items[name].to_numpy(dtype=np.float64)]

    return {
        "item_id": items["item_id"].astype(str).tolist(),
        "title": items["title"].astype(str).tolist(),
        "genres": [list(g) for g in items["genres"]],
        "year": optional("year"),
        "episode_minutes": optional("episode_minutes"),
        "seasons": optional("seasons"),
        "episodes": optional("episodes"),
        "kind": items["kind"].astype(str).tolist(),
    }


def build_parts(
    catalog: Catalog, events: Events, embeddings: Embeddings, params: ModelParams
) -> dict[str, bytes]:
    """Every part of a version except the per-user candidates."""
    vectors = embeddings.vectors
    started = time.perf_counter()
    parts = {
        "recommend.ann": annoy_bytes(vectors, "dot", params.n_trees, params.seed),
        "similar.ann": annoy_bytes(vectors, "angular", params.n_trees, params.seed),
    }
    log.info("annoy indexes built in %.1fs (%d titles, %d trees)", time.perf_counter() - started, len(vectors), params.n_trees)
    indptr, hist_items, hist_weights = recent_histories(events, embeddings.confidence, params.history_cap)
    parts.update(
        {
            "item_vectors.npy": npy_bytes(vectors.astype(np.float32)),
            "gram.npy": npy_bytes((vectors.T.astype(np.float64) @ vectors.astype(np.float64)).astype(np.float32)),
            "items.json": orjson.dumps(catalog_columns(catalog)),
            "users.json": orjson.dumps([str(u) for u in events.user_ids]),
            "history_indptr.npy": npy_bytes(indptr),
            "history_items.npy": npy_bytes(hist_items),
            "history_weights.npy": npy_bytes(hist_weights),
            "popular.npy": npy_bytes(popular_items(events, len(catalog), embeddings.confidence)),
        }
    )
    return parts


def open_parts(parts: dict[str, bytes], meta: dict, folder: Path) -> Recommender:
    """Write parts to ``folder`` and open them exactly as a serving worker would."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in parts.items():
        (folder / name).write_bytes(blob)
    (folder / "meta.json").write_bytes(orjson.dumps(meta))
    return Recommender(folder, meta)


def precompute_candidates(
    recommender: Recommender, seen: sp.csr_matrix, users: np.ndarray, size: int, show_progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``size`` unseen titles for each user in ``users`` (row order of ``seen``).

    Uses the same user step and Annoy query as a live request; ``seen`` holds
    each user's full training history, which is excluded.
    """
    candidates = np.full((len(users), size), -1, dtype=np.int32)
    scores = np.zeros((len(users), size), dtype=np.float32)
    indptr, indices = recommender.hist_indptr, recommender.hist_items
    weights = recommender.hist_weights
    for out_row, user in enumerate(progress(users, "candidates", show=show_progress)):
        start, end = indptr[user], indptr[user + 1]
        if end == start:
            continue
        exclude = set(seen.indices[seen.indptr[user] : seen.indptr[user + 1]].tolist())
        picked = recommender.recommend_from_history(
            np.asarray(indices[start:end]), np.asarray(weights[start:end]), size, exclude
        )
        if picked:
            candidates[out_row, : len(picked)] = [i for i, _ in picked]
            scores[out_row, : len(picked)] = [s for _, s in picked]
    return candidates, scores
