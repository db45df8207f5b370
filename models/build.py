"""Turning learned embeddings into the parts of a publishable version.

:func:`build_parts` writes the Annoy indexes, item metadata, capped user
histories and the popular fallback; :func:`add_candidates` then opens the
result as the service would (:class:`models.recommender.Recommender`) and
precomputes each user's top titles, so the request path is a lookup.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import scipy.sparse as sp
import torch
from annoy import AnnoyIndex
from scipy.sparse import _sparsetools
from threadpoolctl import threadpool_limits

from models.data import Catalog, Events, stable_argsort
from models.embeddings import Embeddings, ModelParams, one_torch_thread
from models.progress import progress
from models.recommender import BECAUSE_HISTORY, NEIGHBOURS, NO_REASON, SEQUENCE_HISTORY, Recommender

log = logging.getLogger(__name__)

POPULAR_SIZE = 1000
# Users x padded history length per batch: its largest arrays (the "because" similarities, [users, 100,
# history] float32) stay under glibc's 32 MB mmap ceiling, so a freed batch is reused from the heap. At
# 131,072 (64 MB float64 vectors then) every batch was fresh pages, faulted in by the kernel: candidates
# at 150,000 users 12.8-13.2 s -> 11.7-12.0 s, kernel time 2.8-3.1 -> 0.4-0.6 s.
BATCH_ENTRIES = 49_152
MAX_BATCH_USERS = 2048
# The exact nearest-title table costs titles^2 x dimensions (~40-55 s at 100k titles on 2 cores); above
# this many titles versions go without it and workers search Annoy per title instead (cached).
NEIGHBOUR_TABLE_MAX = 200_000
TOPK_CHUNK = 32  # columns per chunk of top_k's first pass
SCORE_BLOCK_ENTRIES = 8_000_000  # users x titles scored at once (32 MB of float32 per thread)
# precompute_candidates' first pass scores this fraction of titles (those with the longest vectors),
# in catalogues of at least FIRST_PASS_MIN_TITLES; smaller ones are scored whole in one pass.
FIRST_PASS_FRACTION = 4
FIRST_PASS_MIN_TITLES = 8192


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
    """CSR (indptr, items, confidences) of each user's distinct titles, newest first, capped.

    ``confidence`` is the users x titles matrix trained on ``events``.
    """
    events = events.in_time_order()
    n_users, n_items = len(events.user_ids), confidence.shape[1]
    pair = events.user.astype(np.int64) * n_items + events.item
    by_pair = stable_argsort(pair)  # by (user, title), then time
    sorted_pairs = pair[by_pair]
    last = np.ones(len(pair), dtype=bool)
    last[:-1] = sorted_pairs[1:] != sorted_pairs[:-1]
    newest = by_pair[last]  # each (user, title)'s latest viewing, in (user, title) order
    pair_users = events.user[newest]
    if not confidence.has_canonical_format or confidence.nnz != len(newest):
        raise ValueError("recent_histories needs the confidence matrix built from these events")
    weights = confidence.data.astype(np.float32)  # one entry per (user, title), in the same order
    # Events are in time order per user, so a viewing's position orders it in time: reverse
    # each user's block of positions (newest first) with one scatter instead of a sort.
    user_start = np.searchsorted(events.user, np.arange(n_users + 1))
    slot = np.full(len(pair), -1, dtype=np.int64)
    slot[user_start[pair_users] + user_start[pair_users + 1] - 1 - newest] = np.arange(len(newest))
    order = slot[slot >= 0]
    u, i, w = pair_users[order], events.item[newest][order], weights[order]
    counts = np.bincount(u, minlength=n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    keep = np.arange(len(u)) - starts[u] < cap
    indptr = np.concatenate([[0], np.cumsum(np.minimum(counts, cap))]).astype(np.int64)
    return indptr, i[keep].astype(np.int32), w[keep]


def popular_items(events: Events, n_items: int, confidence: sp.csr_matrix) -> np.ndarray:
    """Titles by distinct recent-weighted viewers (a title binged by few ranks below one many watched)."""
    viewers = np.asarray((confidence > 0).sum(axis=0)).ravel()
    strength = np.asarray(confidence.sum(axis=0)).ravel()
    return popular_from_counts(viewers, strength)


def popular_from_counts(viewers: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """The popular list from each title's distinct viewers and summed confidence (ties broken by the latter)."""
    score = np.asarray(viewers, dtype=np.float64) + 1e-6 * np.asarray(strength, dtype=np.float64)
    return np.argsort(-score, kind="stable")[: min(POPULAR_SIZE, len(score))].astype(np.int32)


def catalog_json(catalog: Catalog) -> bytes:
    """The ``items.json`` part: catalogue metadata by column."""
    return orjson.dumps(catalog_columns(catalog))


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
        # Catalogue rules (models.rules): None = unrestricted / unrated.
        "maturity": optional("maturity") if "maturity" in items else [None] * len(items),
        "regions": [list(r) for r in items["regions"]] if "regions" in items else [[] for _ in range(len(items))],
        "available_from": optional("available_from") if "available_from" in items else [None] * len(items),
        "available_until": optional("available_until") if "available_until" in items else [None] * len(items),
        "added_at": optional("added_at") if "added_at" in items else [None] * len(items),
    }


def build_parts(
    catalog: Catalog, events: Events, embeddings: Embeddings, params: ModelParams, indexes: bool = True,
    items_json: bytes | None = None,
) -> dict[str, bytes]:
    """Every part of a version except the per-user candidates.

    ``indexes=False`` leaves out the Annoy indexes: enough for the batch
    ranking of offline experiments, never for a published version.
    ``items_json``: :func:`catalog_json` of ``catalog``, when the caller builds many.
    """
    # Histories are single-threaded numpy; Annoy's build runs in its own threads without the GIL.
    with ThreadPoolExecutor(1) as beside:
        histories = beside.submit(recent_histories, events, embeddings.confidence, params.history_cap)
        parts = item_parts(
            catalog, embeddings.vectors, embeddings.sequence, popular_items(events, len(catalog), embeddings.confidence),
            params, indexes, items_json,
        )  # fmt: skip
        parts.update(user_parts(events.user_ids, *histories.result()))
    return parts


def item_parts(
    catalog: Catalog, vectors: np.ndarray, sequence: sp.csr_matrix, popular: np.ndarray, params: ModelParams,
    indexes: bool = True, items_json: bytes | None = None,
) -> dict[str, bytes]:
    """The item side of a version: vectors, Annoy indexes, metadata, watched-next, the popular list (any engine)."""
    parts = {}
    if indexes:
        started = time.perf_counter()
        parts["recommend.ann"] = annoy_bytes(vectors, "dot", params.n_trees, params.seed)
        parts["similar.ann"] = annoy_bytes(vectors, "angular", params.n_trees, params.seed)
        log.info("annoy indexes built in %.1fs (%d titles, %d trees)", time.perf_counter() - started, len(vectors), params.n_trees)
        if len(vectors) <= NEIGHBOUR_TABLE_MAX:
            started = time.perf_counter()
            found, cosines = nearest_titles(vectors, NEIGHBOURS)
            parts["neighbours.npy"], parts["neighbour_cosines.npy"] = npy_bytes(found), npy_bytes(cosines)
            log.info("nearest-title table built in %.1fs (%d x %d)", time.perf_counter() - started, *found.shape)
    parts.update(
        {
            "item_vectors.npy": npy_bytes(vectors.astype(np.float32)),
            "gram.npy": npy_bytes((vectors.T.astype(np.float64) @ vectors.astype(np.float64)).astype(np.float32)),
            "items.json": items_json if items_json is not None else catalog_json(catalog),
            "popular.npy": npy_bytes(popular),
            "seq_indptr.npy": npy_bytes(sequence.indptr.astype(np.int64)),
            "seq_indices.npy": npy_bytes(sequence.indices.astype(np.int32)),
            "seq_weights.npy": npy_bytes(sequence.data.astype(np.float32)),
        }
    )
    return parts


def nearest_titles(vectors: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each title's ``n`` nearest titles by cosine, itself left out, best first: int32 and float32 [titles, n].

    Exact (blocks of one matrix product and a top-k each), so the
    service's similar titles and "Because you watched" rows are a lookup, not
    an Annoy search per request. Catalogues with fewer than ``n + 1`` titles
    pad with -1 (cosine -inf).
    """
    unit = np.asarray(vectors, dtype=np.float32)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1), 1e-9)[:, None]
    n_items = len(unit)
    keep = min(n, n_items - 1)
    found = np.full((n_items, n), -1, dtype=np.int32)
    cosines = np.full((n_items, n), -np.inf, dtype=np.float32)
    if keep <= 0:
        return found, cosines
    width = padded_width(n_items)  # padding scores -inf
    unit_t = np.zeros((unit.shape[1], width), dtype=np.float32)
    unit_t[:, :n_items] = unit.T
    unit_t = torch.from_numpy(unit_t)
    rows_per_block = max(1, min(2048, SCORE_BLOCK_ENTRIES // width))
    for start in range(0, n_items, rows_per_block):  # torch's own threads use every core
        block = np.arange(start, min(start + rows_per_block, n_items))
        sims = torch.from_numpy(unit[block]) @ unit_t
        sims[:, n_items:] = -np.inf
        sims[torch.arange(len(block)), torch.from_numpy(block)] = -np.inf  # never a title's own neighbour
        top_sims, top = top_k(sims, keep)
        found[block, :keep] = top.numpy()
        cosines[block, :keep] = top_sims.numpy()
    return found, cosines


def user_parts(user_ids, indptr: np.ndarray, items: np.ndarray, weights: np.ndarray) -> dict[str, bytes]:
    """The user side's ids and recent histories (CSR, newest first) as parts."""
    return {
        "users.json": orjson.dumps([str(u) for u in user_ids]),
        "history_indptr.npy": npy_bytes(np.asarray(indptr, dtype=np.int64)),
        "history_items.npy": npy_bytes(np.asarray(items, dtype=np.int32)),
        "history_weights.npy": npy_bytes(np.asarray(weights, dtype=np.float32)),
    }


def open_parts(parts: dict[str, bytes], meta: dict, folder: Path) -> Recommender:
    """Write parts to ``folder`` and open them exactly as a serving worker would."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in parts.items():
        (folder / name).write_bytes(blob)
    (folder / "meta.json").write_bytes(orjson.dumps(meta))
    return Recommender(folder, meta)


def precompute_candidates(
    recommender: Recommender,
    seen: sp.csr_matrix,
    users: np.ndarray,
    size: int,
    show_progress: bool = True,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``size`` unseen titles for each user in ``users`` (row order of ``seen``), best first.

    The user step is the live request's (:meth:`Recommender.user_vectors`);
    ``seen`` holds each user's full training history, which is excluded. The
    ranking is exact: a matrix product over the catalogue per block of users.
    In a batch that is faster than an Annoy search per user and never misses a
    title (Annoy's top 10 at the default search_k shared ~4% of titles with the
    exact top 10 on the 100k-title bench data); Annoy stays for live requests.

    Large catalogues are ranked in two passes that give the same answer. The
    first scores only the titles with the longest vectors (1/FIRST_PASS_FRACTION
    of them) plus any title with a watched-next term that could still make the
    user's top ``size``. A title left out scores q . v <= |q| |v| <= |q| x (the
    longest vector left out); a user whose ``size``-th score is above that bound
    is done, and only the others (~5-10 % on the bench data, where popular
    titles have the long vectors) are scored against every title. Blocks run in
    ``threads`` (default one per core): numpy and torch release the GIL.
    """
    candidates = np.full((len(users), size), -1, dtype=np.int32)
    scores = np.zeros((len(users), size), dtype=np.float32)
    keep = min(size, recommender.n_items)
    columns = CandidateColumns(recommender, keep)
    blend = recommender.seq_weight > 0
    strengths = sp.csr_matrix(  # rows: titles; columns: score columns
        (recommender.seq_weights, columns.position[recommender.seq_indices], recommender.seq_indptr),
        shape=(recommender.n_items, columns.width),
    )
    row_sums = np.asarray(strengths.sum(axis=1), dtype=np.float64).ravel()  # picked @ row_sums: a user's total
    # Split by pass, so the first pass never sees the terms of columns it leaves out.
    near_strengths, far_strengths = split_columns(strengths, columns.first)
    rows_per_block = max(1, SCORE_BLOCK_ENTRIES // columns.first)

    def watched_next_term(recent: np.ndarray) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
        """Recommender.blended_scores's watched-next term for a block, as CSRs over the first pass's
        columns and the rest (each row's constant, -mean x scale, returned apart): summed strengths,
        z-scored per user."""
        users_of, cols = np.nonzero(recent >= 0)
        picked = sp.csr_matrix(
            (np.ones(len(cols), np.float32), (users_of, recent[users_of, cols])), shape=(len(recent), recommender.n_items)
        )
        terms = [sparse_product(picked, near_strengths), sparse_product(picked, far_strengths)]  # thousands a user
        counts = [np.diff(term.indptr) for term in terms]
        nonempty = (counts[0] + counts[1]) > 0  # no watched-next titles: no term at all
        mean = picked @ row_sums / recommender.n_items
        squares = np.zeros(len(recent))
        for term, count in zip(terms, counts):
            filled = count > 0  # (reduceat needs empty rows left out)
            squares[filled] += np.add.reduceat(term.data.astype(np.float64) ** 2, term.indptr[:-1][filled])
        seq_spread = np.sqrt(np.maximum(squares / recommender.n_items - mean**2, 1e-24))
        scale = np.where(nonempty, recommender.seq_weight / seq_spread, 0.0)
        for term, count in zip(terms, counts):
            term.data *= np.repeat(scale.astype(np.float32), count)
        return *terms, -mean * scale

    def fill(rows: np.ndarray) -> None:
        history, weights = padded_histories(recommender, users[rows])
        queries = recommender.user_vectors(history, weights)
        # Recommender.blended_scores over every title. Both z-scores are affine per user, so the
        # block is scored as (q / spread) . v plus the sparse watched-next term, and each row's
        # constant (-mean / spread terms) is added back to the chosen scores only.
        q64 = queries.astype(np.float64)
        spread = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", q64, recommender.vector_cov, q64), 1e-12))
        offset = -(q64 @ recommender.vector_mean) / spread
        scaled = (q64 / spread[:, None]).astype(np.float32)
        for at in range(0, len(rows), rows_per_block):
            block = rows[at : at + rows_per_block]
            row_offset = offset[at : at + rows_per_block].copy()
            if blend:
                near, far, constant = watched_next_term(history[at : at + rows_per_block, :SEQUENCE_HISTORY])
                row_offset += constant
            else:
                near = far = sp.csr_matrix((len(block), columns.width), dtype=np.float32)
            watched = seen[users[block]]
            watched = sp.csr_matrix(
                (watched.data, columns.position[watched.indices], watched.indptr), shape=(len(block), columns.width)
            )
            top_scores, top = columns.rank(scaled[at : at + rows_per_block], near, far, watched)
            unseen = np.isfinite(top_scores)  # a user who has seen almost everything gets fewer
            candidates[block, :keep] = np.where(unseen, columns.title[top], -1)
            scores[block, :keep] = np.where(unseen, top_scores + row_offset[:, None].astype(np.float32), 0.0)

    batches = history_batches(recommender, users)
    # One BLAS and one torch thread per worker thread: the threads already use every core.
    with threadpool_limits(1, "blas"), one_torch_thread(), ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        for _ in progress(pool.map(fill, batches), "candidates", total=len(batches), show=show_progress):
            pass
    if columns.first < columns.width:
        log.info(
            "candidates: first pass over %d of %d titles; %d of %d users (%.1f%%) needed every title",
            columns.first, recommender.n_items, columns.widened, len(users), 100 * columns.widened / max(len(users), 1),
        )  # fmt: skip
    return candidates, scores


class CandidateColumns:
    """The score columns of :func:`precompute_candidates`: titles by descending vector length, padded
    to a multiple of TOPK_CHUNK (padding scores -inf), and the two-pass exact top ``keep``."""

    def __init__(self, recommender: Recommender, keep: int):
        vectors = np.asarray(recommender.vectors, dtype=np.float32)
        n_items = len(vectors)
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        order = stable_argsort(-norms)
        self.n_items, self.keep = n_items, keep
        self.width = padded_width(n_items)
        self.title = np.full(self.width, -1, dtype=np.int32)  # column j scores title[j] (padding: -1)
        self.title[:n_items] = order
        self.position = np.empty(n_items, dtype=np.int64)  # a title's column
        self.position[order] = np.arange(n_items)
        first = padded_width(n_items // FIRST_PASS_FRACTION)
        self.first = first if n_items >= FIRST_PASS_MIN_TITLES and 0 < keep <= first < n_items else self.width
        self.rows = np.zeros((self.width, vectors.shape[1]), dtype=np.float32)  # a column's vector
        self.rows[:n_items] = vectors[order]
        self.vectors_t = np.ascontiguousarray(self.rows.T)
        # Vector lengths by column, a little longer for the float32 rounding of the products.
        self.reach = np.zeros(self.width, dtype=np.float32)
        self.reach[:n_items] = norms[order] * (1 + 1e-4)
        self.left_out = float(self.reach[self.first]) if self.first < n_items else 0.0  # longest left out
        self.widened = 0  # users scored against every title (the second pass)

    def rank(
        self, scaled: np.ndarray, near: sp.csr_matrix, far: sp.csr_matrix, watched: sp.csr_matrix
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each row's top ``keep`` of scaled . v + term over the unwatched columns: scores and columns.
        The watched-next term comes split: ``near`` over the first pass's columns, ``far`` the rest."""
        top_scores, top = self._scored(scaled, _Entries(near, watched), self.first)
        if self.first == self.width:
            return top_scores, top
        length = np.linalg.norm(scaled.astype(np.float64), axis=1).astype(np.float32)
        top_scores, top, crowded = self._with_late_terms(scaled, _Entries(far, watched), length, top_scores, top)
        # A row is final when no column left out can reach its keep-th score (NaN rows never are).
        redo = np.flatnonzero(crowded | ~(top_scores[:, -1] > length * self.left_out))
        self.widened += len(redo)
        step = max(1, SCORE_BLOCK_ENTRIES // self.width)
        for at in range(0, len(redo), step):
            rows = redo[at : at + step]
            entries = _Entries(near[rows] + far[rows], watched[rows])
            top_scores[rows], top[rows] = self._scored(scaled[rows], entries, self.width)
        return top_scores, top

    def _scored(self, scaled: np.ndarray, entries: _Entries, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``keep`` over the first ``width`` columns: one dense block."""
        n = len(scaled)
        block = np.empty((n, width), dtype=np.float32)
        flat = block.reshape(-1)
        np.matmul(scaled, self.vectors_t[:, :width], out=block)
        block[:, self.n_items :] = -np.inf
        at = entries.term_rows * width + entries.term_cols  # every term falls inside ``width``
        # Scatter-add, 1-D: torch's index_add_ is ~1.5x numpy's fancy-index +=.
        torch.from_numpy(flat).index_add_(0, torch.from_numpy(at), torch.from_numpy(entries.term_values))
        hidden = entries.watched_cols < width
        block[entries.watched_rows[hidden], entries.watched_cols[hidden]] = -np.inf
        return tuple(t.numpy() for t in top_k(torch.from_numpy(block), self.keep))

    def _with_late_terms(self, scaled, entries: _Entries, length, top_scores, top):
        """Merge in the columns outside the first pass whose watched-next term may lift them into the
        top ``keep``: those with |q| |v| + term at or above the row's keep-th score, scored exactly.
        Rows with more such columns than ``keep`` are returned as ``crowded`` (to be scored whole)."""
        n, keep = top_scores.shape
        rows_of, cols = entries.term_rows, entries.term_cols  # every one outside the first pass
        at = np.flatnonzero(length[rows_of] * self.reach[cols] + entries.term_values >= top_scores[:, -1][rows_of])
        rows_of, cols, lift = rows_of[at], cols[at], entries.term_values[at]
        unseen = ~entries.watched(rows_of, cols, self.width)
        rows_of, cols, lift = rows_of[unseen], cols[unseen], lift[unseen]
        counts = np.bincount(rows_of, minlength=n)
        crowded = counts > keep
        if len(rows_of) == 0 or crowded.all():
            return top_scores, top, crowded
        fits = ~crowded[rows_of]
        rows_of, cols, lift = rows_of[fits], cols[fits], lift[fits]
        counts[crowded] = 0
        slot = keep + np.arange(len(rows_of)) - (np.cumsum(counts) - counts)[rows_of]
        merged_scores = np.full((n, 2 * keep), -np.inf, dtype=np.float32)
        merged_cols = np.zeros((n, 2 * keep), dtype=top.dtype)
        merged_scores[:, :keep], merged_cols[:, :keep] = top_scores, top
        merged_scores[rows_of, slot] = np.einsum("nd,nd->n", scaled[rows_of], self.rows[cols]) + lift
        merged_cols[rows_of, slot] = cols
        best_scores, best = torch.topk(torch.from_numpy(merged_scores), keep, dim=1)
        return best_scores.numpy(), np.take_along_axis(merged_cols, best.numpy(), 1), crowded


def sparse_product(a: sp.csr_matrix, b: sp.csr_matrix) -> sp.csr_matrix:
    """``a @ b`` for CSRs of one dtype, entry for entry (scipy's own kernel), without scipy's counting pass.

    scipy first counts the product's entries in a pass as costly as a third of the product, then
    fills them. Here the output is allocated for an upper bound instead (each row of ``a`` picks whole
    rows of ``b``: the sum of their lengths) and filled in one pass; pages past the real size are never
    touched, so the bound costs address space, not memory. The watched-next sums at 20M events: 7.6 s
    -> 5.4 s of CPU. ``_sparsetools`` is private: ``test_sparse_product_is_scipys`` pins it.
    """
    if a.dtype != b.dtype or a.shape[1] != b.shape[0]:
        raise ValueError(f"sparse_product: {a.dtype} {a.shape} @ {b.dtype} {b.shape}")
    size = int(np.diff(b.indptr)[a.indices].sum(dtype=np.int64))  # the bound: every picked row's length
    index = np.int32 if max(size, b.shape[1], a.shape[0]) < np.iinfo(np.int32).max else np.int64
    indptr = np.empty(a.shape[0] + 1, dtype=index)
    indices, data = np.empty(size, dtype=index), np.empty(size, dtype=a.dtype)
    _sparsetools.csr_matmat(
        a.shape[0], b.shape[1], a.indptr.astype(index, copy=False), a.indices.astype(index, copy=False), a.data,
        b.indptr.astype(index, copy=False), b.indices.astype(index, copy=False), b.data, indptr, indices, data,
    )  # fmt: skip
    used = int(indptr[-1])
    return sp.csr_matrix((data[:used], indices[:used], indptr), shape=(a.shape[0], b.shape[1]))


def split_columns(matrix: sp.csr_matrix, at: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """``matrix``'s entries in columns before ``at`` and from ``at`` on, as two CSRs of its shape."""
    before = matrix.indices < at
    below = np.concatenate([[0], np.cumsum(before)])[matrix.indptr]  # entries before ``at`` up to each row
    return (
        sp.csr_matrix((matrix.data[before], matrix.indices[before], below), shape=matrix.shape),
        sp.csr_matrix((matrix.data[~before], matrix.indices[~before], matrix.indptr - below), shape=matrix.shape),
    )


class _Entries:
    """A block's watched-next terms and watched titles as (row, column) entries over score columns."""

    def __init__(self, term: sp.csr_matrix, watched: sp.csr_matrix):
        n = term.shape[0]
        self.term_rows = np.repeat(np.arange(n), np.diff(term.indptr))
        self.term_cols, self.term_values = term.indices, term.data
        self.watched_rows = np.repeat(np.arange(n), np.diff(watched.indptr))
        self.watched_cols = watched.indices

    def watched(self, rows: np.ndarray, cols: np.ndarray, width: int) -> np.ndarray:
        """Whether each (row, column) is a watched title."""
        keys = np.sort(self.watched_rows * np.int64(width) + self.watched_cols)
        if len(keys) == 0:
            return np.zeros(len(rows), dtype=bool)
        wanted = rows * np.int64(width) + cols
        return keys[np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)] == wanted


def padded_width(n: int) -> int:
    """``n`` columns rounded up to a multiple of TOPK_CHUNK: the widths :func:`top_k` is fastest on."""
    return -(-n // TOPK_CHUNK) * TOPK_CHUNK


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)``: each row's ``k`` largest values, best first, and their columns.

    Exact, and ~25 % cheaper on wide rows whose width is a multiple of TOPK_CHUNK: only the ``k``
    chunks of TOPK_CHUNK columns with the largest maxima can hold a row's top ``k`` (an entry of any
    other chunk is beaten by ``k`` chunk maxima), and within them only entries at or above the
    ``k``-th largest maximum (there are at least ``k`` such). Equal values may come in another order
    than torch's. (torch's top-k itself is ~10x numpy's argpartition over a 100k-title row.)
    """
    n, width = scores.shape
    if width % TOPK_CHUNK or width < 4 * k * TOPK_CHUNK or k == 0:
        return torch.topk(scores, k, dim=1)
    maxima, chunks = torch.topk(scores.view(n, -1, TOPK_CHUNK).amax(2), k, dim=1, sorted=False)
    columns = (chunks.unsqueeze(2) * TOPK_CHUNK + torch.arange(TOPK_CHUNK)).view(n, -1)
    values = torch.gather(scores, 1, columns)
    rows, at = (values >= maxima.amin(1, keepdim=True)).nonzero(as_tuple=True)
    kept = values[rows, at]
    order = torch.argsort(kept, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]  # by row, best first within each row
    counts = torch.bincount(rows, minlength=n)
    if bool((counts < k).any()):  # only with NaN scores (no order at all): torch's own answer
        return torch.topk(scores, k, dim=1)
    picked = order[(torch.cumsum(counts, 0) - counts).unsqueeze(1) + torch.arange(k)]  # each row's first k
    return kept[picked], columns[rows[picked], at[picked]]


def candidate_reasons(recommender: Recommender, users: np.ndarray, candidates: np.ndarray, limit: int = 2) -> np.ndarray:
    """The "because" titles of every precomputed candidate, [users, size, limit] uint8 positions in each
    user's published history (``NO_REASON`` = none): 2 bytes a candidate instead of 8 for title ids.

    Exactly what :meth:`Recommender.because` would answer at request time,
    computed here in batches so the request path only looks them up.
    """
    reasons = np.full((*candidates.shape, limit), NO_REASON, dtype=np.uint8)

    def fill(rows: np.ndarray) -> None:
        items, _ = padded_histories(recommender, users[rows], cap=BECAUSE_HISTORY)
        reasons[rows] = recommender.because_rows(candidates[rows], items, limit)

    with threadpool_limits(1, "blas"), one_torch_thread(), ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(fill, history_batches(recommender, users, cap=BECAUSE_HISTORY)))
    return reasons


def history_batches(
    recommender: Recommender, users: np.ndarray, cap: int | None = None, entries: int = BATCH_ENTRIES
) -> list[np.ndarray]:
    """Positions in ``users`` of those with a history, in batches of similar history length.

    A batch is padded to its longest history, so sorting by length keeps the
    padding small; ``entries`` (users x longest history) bounds its memory.
    """
    indptr = recommender.hist_indptr
    lengths = indptr[users + 1] - indptr[users]
    if cap is not None:
        lengths = np.minimum(lengths, cap)
    order = np.argsort(lengths, kind="stable")
    order = order[lengths[order] > 0]
    sorted_lengths = lengths[order]
    batches, start = [], 0
    while start < len(order):
        shortest = int(sorted_lengths[start])
        # At most ~25% padding: the batch ends where histories get much longer.
        end = int(np.searchsorted(sorted_lengths, max(shortest * 5 // 4, shortest + 4), side="right"))
        end = min(end, start + MAX_BATCH_USERS, start + max(1, entries // int(sorted_lengths[end - 1])))
        batches.append(order[start:end])
        start = end
    return batches


def padded_histories(recommender: Recommender, users: np.ndarray, cap: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Published histories (newest first) of ``users`` as [n, longest] items (-1 padded) and weights."""
    starts = recommender.hist_indptr[users]
    ends = recommender.hist_indptr[users + 1]
    if cap is not None:
        ends = np.minimum(ends, starts + cap)
    offsets = starts[:, None] + np.arange(int((ends - starts).max(initial=0)))
    valid = offsets < ends[:, None]
    offsets = np.where(valid, offsets, 0)
    items = np.where(valid, recommender.hist_items[offsets], -1)
    weights = np.where(valid, recommender.hist_weights[offsets], 0.0).astype(np.float32)
    return items, weights
