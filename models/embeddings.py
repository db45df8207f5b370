"""Learning item embeddings: collaborative factors (implicit ALS) + a torch content model.

The collaborative part sees who watched what: each viewing adds confidence
weighted by how much of the episode was watched and how recently; ALS factors
the user x title confidence matrix. The content part is a small torch MLP from
a title's features (genres, year, episode length, seasons, episodes, kind) to
the collaborative space, trained on titles with enough viewers. A title's
final vector blends the two by how much evidence it has, so a new show with no
viewings still lands next to the titles it resembles.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import scipy.sparse as sp
import torch
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from models.data import Catalog, Events

log = logging.getLogger(__name__)


@dataclass
class ModelParams:
    """Hyperparameters. Each says what it trades off; the job may tune some of them."""

    factors: int = 64  # embedding size: more fits more taste detail, costs memory and time
    # ALS L2 penalty (not scaled by counts): larger = smoother, more popular-leaning. Implicit-feedback
    # ALS wants it far above the textbook 0.01 (20 measured best on MovieLens and the demo data).
    regularization: float = 20.0
    # Users the regularization was chosen on, when selection ran on a user sample (0 = as is). A fit on
    # n users then uses regularization x sqrt(n / regularization_users) (see at_scale): at 20M events,
    # 40 chosen on a 3.7k-user sample scored 0.148 nDCG@10 on all 150k users (popularity 0.156), 250 0.233.
    regularization_users: int = 0
    iterations: int = 15  # ALS sweeps; 10-20 is usually converged
    alpha: float = 3.0  # confidence: c = 1 + alpha * log1p(weighted views / eps); 0 = binary
    eps: float = 1.0  # views below eps count little; above, log-scaled (binges do not dominate)
    recency_half_life_days: float = 120.0  # older viewings fade to recency_floor; 0 disables
    recency_floor: float = 0.35
    content_shrink: float = 20.0  # viewers at which CF and content weigh equally in the blend
    # Titles nobody watched get this quantile of warm titles' vector length (0 = off). Content-only
    # vectors come out short, so at scale new titles rarely win a dot product; 0.75 gave ~12x
    # random cold-start placement on MovieLens and the demo data but cost 0.01 nDCG@10 on MovieLens.
    cold_norm_quantile: float = 0.0
    content_steps: int = 300  # optimizer steps of the content MLP (batches of 1024 titles)
    content_hidden: int = 128
    content_model: str = "mlp"  # "mlp" or "linear" (see content_vectors); the cold-start check picks one
    # What the content model fits: "regression" = the squared distance to the warm titles' CF vectors;
    # "als" = ALS's own loss with the user factors fixed (ViewerSample), so a new title lands where its
    # viewers' tastes point. The job's cold-start check tries both (with each content model form) and
    # keeps the pair that places held-out titles best: "als" on the demo data (12.5x random against 3.8x),
    # "regression" on ml-latest-small (17.2x against 16.3x; served nDCG@10 0.4107 against 0.4022, one run).
    content_objective: str = "regression"
    n_trees: int = 50  # Annoy trees: more = better recall, bigger index
    search_k: int = -1  # Annoy nodes inspected per query (-1 = n_trees * n)
    history_cap: int = 2000  # recent titles kept per user in the published history (all but the heaviest)
    # "Watched next": titles a user watched within seq_window titles of each other are related.
    seq_window: int = 5  # positions in a user's time-ordered titles (consecutive repeats collapsed)
    seq_tau: float = 1.0  # pair weight exp(-(distance - 1) / tau): adjacent titles count most
    seq_pop_exponent: float = 0.5  # divide by (viewers_i * viewers_j) ** exponent, so hits don't dominate
    seq_neighbors: int = 100  # strongest neighbours kept per title (selection may try 200)
    seq_weight: float = 0.5  # weight of the z-scored sequence score next to the embedding score
    candidates: int = 100  # per-user precomputed recommendations (k above this, or filters they cannot fill: live)
    seed: int = 7

    def as_dict(self) -> dict:
        return asdict(self)

    def at_scale(self, events: Events) -> ModelParams:
        """These parameters for a fit on ``events``: the regularization in absolute terms.

        ALS's best L2 penalty grows with the square root of the users it is fitted on
        (held-out nDCG@10 at 1M, 4M and 20M events of the demo data, 7k to 150k users).
        """
        return self.for_users(events.active_users())

    def for_users(self, users: int) -> ModelParams:
        """:meth:`at_scale` for a fit on ``users`` users (the Spark engine counts them on the cluster)."""
        if self.regularization_users <= 0:
            return self
        factor = math.sqrt(max(users, 1) / self.regularization_users)
        return replace(self, regularization=self.regularization * factor, regularization_users=0)


# The content model's sample of viewers: about CONTENT_VIEWERS per title, CONTENT_PAIRS in all (memory
# pairs x factors x 4 B: 256 MB at 64 factors). 64 viewers per title measured as good as 256 on the demo
# data (text_lift 1.50 against 1.52, seed 7) at a quarter of the cost.
CONTENT_VIEWERS = int(os.environ.get("CONTENT_VIEWERS", "64"))
CONTENT_PAIRS = int(os.environ.get("CONTENT_PAIRS", "1000000"))


@dataclass
class ViewerSample:
    """The users' side of ALS's loss, for the content model: Σ u uᵀ over all users and a sample of viewers.

    With the user factors u fixed, ALS's loss as a function of one title's
    vector v is vᵀGv + λ|v|² + Σ over its viewers [c (1 − u·v)² − (u·v)²] +
    const, with G = Σ_u u uᵀ (every unwatched pair counts with confidence 1).
    A content model fitted on this loss puts a title where its viewers' tastes
    point, weighing each direction as ALS does; fitted on the distance to the
    CF vectors, it weighs directions no user's taste distinguishes as much as
    those that decide rankings. Each title's viewers are sampled (every pair
    kept with chance :func:`viewer_rates`), each sampled pair standing for
    ``scale`` of them. Both engines build it the same way: the Spark one on
    the cluster, where the user factors are, collecting only the sample.
    """

    gram: np.ndarray  # float64 [d, d]: Σ_u u uᵀ over all users
    item: np.ndarray  # int64 [pairs], ascending: the title of each sampled (viewer, title) pair
    factors: np.ndarray  # float32 [pairs, d]: the viewer's factors
    confidence: np.ndarray  # float32 [pairs]: the pair's confidence c
    scale: np.ndarray  # float32 [items]: the title's viewers / its sampled viewers (0 when none sampled)

    @classmethod
    def of(cls, gram: np.ndarray, item: np.ndarray, factors: np.ndarray, confidence: np.ndarray, viewers: np.ndarray):
        """From the sampled pairs in any order, and every title's count of viewers."""
        order = np.argsort(item, kind="stable")
        sampled = np.bincount(item, minlength=len(viewers))
        scale = np.where(sampled > 0, viewers / np.maximum(sampled, 1), 0.0).astype(np.float32)
        return cls(
            np.asarray(gram, np.float64), np.asarray(item, np.int64)[order],
            np.ascontiguousarray(factors[order], np.float32), np.asarray(confidence, np.float32)[order], scale,
        )  # fmt: skip


def viewer_rates(viewers: np.ndarray) -> np.ndarray:
    """Each title's chance that a given viewer of it is sampled: about CONTENT_VIEWERS per title, CONTENT_PAIRS in all."""
    warm = max(int((viewers > 0).sum()), 1)
    per_title = max(min(CONTENT_VIEWERS, CONTENT_PAIRS // warm), 1)
    return np.minimum(1.0, per_title / np.maximum(viewers, 1)).astype(np.float64)


def sampled_viewers(items: np.ndarray, rates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Which of these (viewer, title) pairs the sample keeps (a boolean mask): the rule of both engines."""
    return rng.random(len(items)) < rates[items]


def viewer_sample(user_factors: np.ndarray, confidence: sp.csr_matrix, viewers: np.ndarray, seed: int) -> ViewerSample:
    """The first engine's :class:`ViewerSample`, from its user factors and the confidences they were fitted on."""
    users = np.repeat(np.arange(confidence.shape[0]), np.diff(confidence.indptr))
    keep = sampled_viewers(confidence.indices, viewer_rates(viewers), np.random.default_rng(seed))
    u = np.asarray(user_factors, np.float32)
    gram = u.T.astype(np.float64) @ u.astype(np.float64)
    return ViewerSample.of(gram, confidence.indices[keep], u[users[keep]], confidence.data[keep], viewers)


@dataclass
class Embeddings:
    vectors: np.ndarray  # float32 [items, d], final blended vectors
    cf_vectors: np.ndarray  # float32 [items, d], ALS item factors (zero for unseen titles)
    content_vectors: np.ndarray  # float32 [items, d], content model output
    viewers: np.ndarray  # int [items], distinct users per title in training
    confidence: sp.csr_matrix  # users x items confidences the model was trained on
    viewer_sample: ViewerSample | None  # the users' side of ALS's loss, for content_objective "als" (else None)
    sequence: sp.csr_matrix  # items x items "watched next" neighbours (pruned, row-normalised by popularity)
    params: ModelParams
    timings: dict = field(default_factory=dict)


def event_weights(events: Events, catalog: Catalog, params: ModelParams) -> np.ndarray:
    """Per-viewing weight = completion x recency (:func:`viewing_weights`), relative to the newest event."""
    minutes = catalog.items["episode_minutes"].to_numpy(dtype=np.float32)[events.item]
    age_days = (events.timestamp.max() - events.timestamp) / 86400.0 if len(events) else np.zeros(0)
    return viewing_weights(events.watch_seconds, minutes, age_days, params)


def viewing_weights(watch_seconds: np.ndarray, minutes: np.ndarray, age_days: np.ndarray, params: ModelParams) -> np.ndarray:
    """The confidence rule's per-viewing weight, for any engine (the Spark one applies it per batch).

    Completion is watch time over the episode length (unknown -> a full
    viewing); abandoned episodes count little. Recency halves every
    ``recency_half_life_days`` down to ``recency_floor``, by ``age_days``
    before the newest event, so old tastes still count but recent ones lead.
    """
    completion = np.ones(len(watch_seconds), dtype=np.float32)
    known = np.isfinite(watch_seconds) & np.isfinite(minutes) & (minutes > 0)
    completion[known] = np.clip(watch_seconds[known] / (minutes[known] * 60.0), 0.05, 1.0)
    unknown_length = np.isfinite(watch_seconds) & ~known
    # No episode length: 30 minutes of watching counts as a full viewing.
    completion[unknown_length] = np.clip(watch_seconds[unknown_length] / 1800.0, 0.05, 1.0)
    if params.recency_half_life_days > 0 and len(watch_seconds):
        decay = np.power(0.5, np.asarray(age_days, dtype=np.float64) / params.recency_half_life_days)
        recency = params.recency_floor + (1.0 - params.recency_floor) * decay
        return (completion * recency).astype(np.float32)
    return completion


def scaled_confidence(summed_weights: np.ndarray, params: ModelParams) -> np.ndarray:
    """ALS confidence of a (user, title) from its summed viewing weights: log-scaled, so binges do not dominate."""
    return (1.0 + params.alpha * np.log1p(np.asarray(summed_weights) / params.eps)).astype(np.float32)


def confidence_matrix(events: Events, catalog: Catalog, params: ModelParams) -> sp.csr_matrix:
    """users x items matrix of ALS confidences (summed weights, log-scaled)."""
    weights = event_weights(events, catalog, params)
    n_users, n_items = len(events.user_ids), len(catalog)
    summed = sp.csr_matrix((weights, (events.user, events.item)), shape=(n_users, n_items), dtype=np.float32)
    summed.sum_duplicates()
    summed.data = scaled_confidence(summed.data, params)
    return summed


def train_threads() -> int:
    """Threads for ALS: ``TRAIN_THREADS``, else one per core.

    implicit's own default (0) measured as fast as one thread on these 2-core
    machines, and twice as slow as 2 threads, so the count is always given.
    """
    return int(os.environ.get("TRAIN_THREADS", "0")) or os.cpu_count() or 1


def fit_collaborative(confidence: sp.csr_matrix, params: ModelParams, show_progress: bool = True):
    """Implicit ALS on the confidence matrix; returns (item factors, user factors)."""
    threads = train_threads()
    # implicit parallelises itself; a BLAS thread pool underneath it only fights for the cores.
    with threadpool_limits(1, "blas"):
        return _fit_als(confidence, params, threads, show_progress)


def _fit_als(confidence: sp.csr_matrix, params: ModelParams, threads: int, show_progress: bool):
    model = AlternatingLeastSquares(
        factors=params.factors,
        regularization=params.regularization,
        alpha=1.0,  # confidences are already scaled by confidence_matrix
        iterations=params.iterations,
        calculate_training_loss=False,
        random_state=params.seed,
        num_threads=threads,
    )
    model.fit(confidence, show_progress=show_progress)
    return np.asarray(model.item_factors, dtype=np.float32), np.asarray(model.user_factors, dtype=np.float32)


def content_features(catalog: Catalog, use_text: bool = True) -> np.ndarray:
    """Numeric feature matrix [items, f] from the catalogue's content columns (and synopsis vectors, if any)."""
    items = catalog.items
    genres = sorted({g for row in items["genres"] for g in row})
    genre_col = {g: j for j, g in enumerate(genres)}
    multi_hot = np.zeros((len(items), len(genres)), dtype=np.float32)
    for row, names in enumerate(items["genres"]):
        for g in names:
            multi_hot[row, genre_col[g]] = 1.0
    # A title with several genres is split between them, like a TF weight.
    multi_hot /= np.maximum(multi_hot.sum(axis=1, keepdims=True), 1.0) ** 0.5

    def numeric(name: str, transform) -> tuple[np.ndarray, np.ndarray]:
        values = items[name].to_numpy(dtype=np.float64)
        missing = ~np.isfinite(values)
        out = np.where(missing, 0.0, transform(np.where(missing, 0.0, values)))
        return out.astype(np.float32), missing.astype(np.float32)

    year, year_missing = numeric("year", lambda y: (y - 2000.0) / 20.0)
    decades = np.zeros((len(items), 8), dtype=np.float32)  # <1970, 1970s, ..., 2020s
    years = items["year"].to_numpy(dtype=np.float64)
    known = np.isfinite(years)
    decade = np.clip(((years[known] - 1960) // 10).astype(int), 0, 7)
    decades[np.flatnonzero(known), decade] = 1.0
    columns = [multi_hot, year[:, None], year_missing[:, None], decades]
    for name in ("episode_minutes", "seasons", "episodes"):
        value, missing = numeric(name, np.log1p)
        columns += [value[:, None] / 5.0, missing[:, None]]
    kinds = items["kind"].fillna("").astype(str).str.lower().to_numpy()
    columns += [(kinds == "show").astype(np.float32)[:, None], (kinds == "film").astype(np.float32)[:, None]]
    if use_text and catalog.text_vectors is not None:
        columns.append(text_components(catalog.text_vectors))
    return np.hstack(columns).astype(np.float32)


TEXT_COMPONENTS = int(os.environ.get("TEXT_COMPONENTS", "16"))


def text_components(vectors: np.ndarray, components: int = TEXT_COMPONENTS) -> np.ndarray:
    """The synopsis embeddings' main directions (PCA, scaled to unit variance over titles with text).

    384 raw dimensions next to ~40 structured features let a small MLP fit the
    warm titles' noise; the leading components keep what varies across this
    catalogue's synopses (themes, settings) and little else.
    """
    has = np.abs(vectors).sum(axis=1) > 0
    out = np.zeros((len(vectors), components), dtype=np.float32)
    if has.sum() <= components:
        return out
    text = vectors[has].astype(np.float64)
    mean = text.mean(axis=0)
    _, _, axes = np.linalg.svd(text - mean, full_matrices=False)
    projected = (text - mean) @ axes[:components].T
    out[has] = (projected / np.maximum(projected.std(axis=0), 1e-9)).astype(np.float32)
    return out


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread inside the block, and on as many as before after it (the job's later
    torch work, e.g. the nearest-title table, uses every core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def content_vectors(
    catalog: Catalog, cf_items: np.ndarray, viewers: np.ndarray, params: ModelParams, sample: ViewerSample | None = None
) -> np.ndarray:
    """Every title's content-model vector (zeros when fewer than 2 titles have viewers to learn from).

    ``params.content_model``: ``"mlp"`` (structured features and the synopses'
    main directions through a small MLP) or ``"linear"`` (the structured
    features and the whole synopsis vector, one layer). Neither wins
    everywhere: on MovieLens (genres, years, users' tags) the MLP placed cold
    titles better, on the demo data (themes told in synopses) the linear
    model; the job's cold-start check picks one per catalogue
    (models.offline.cold_start_evaluation). ``params.content_objective``
    says what it fits: ALS's loss on ``sample`` ("als", see
    :class:`ViewerSample`) or the warm titles' CF vectors ("regression").
    """
    warm = viewers >= 1
    if warm.sum() < 2:
        return np.zeros_like(cf_items)
    if params.content_model == "linear":
        features = np.hstack([content_features(catalog, use_text=False), text_inputs(catalog.text_vectors, len(cf_items))])
    else:
        features = content_features(catalog)
    if params.content_objective not in CONTENT_OBJECTIVES:
        raise ValueError(f"content_objective must be one of {', '.join(CONTENT_OBJECTIVES)}, not {params.content_objective!r}")
    with one_torch_thread():  # small networks: threads cost more in sync than they save
        if params.content_objective == "als":
            if sample is None:
                raise ValueError("content_objective 'als' needs the viewer sample of the ALS fit")
            model = fit_to_als_loss(features, sample, content_network(features.shape[1], cf_items.shape[1], params), params)
        elif params.content_model == "linear":
            model = fit_linear_content_model(features[warm], cf_items[warm], np.log1p(viewers[warm]).astype(np.float32))
        else:
            model = fit_content_model(features[warm], cf_items[warm], np.log1p(viewers[warm]).astype(np.float32), params)
    with torch.no_grad():
        return model(torch.from_numpy(features)).numpy().astype(np.float32)


def with_content(embeddings: Embeddings, catalog: Catalog, params: ModelParams) -> Embeddings:
    """``embeddings`` with the content model learned again (for ``catalog`` and ``params``) on the same CF vectors."""
    content = content_vectors(catalog, embeddings.cf_vectors, embeddings.viewers, params, embeddings.viewer_sample)
    vectors = blend_vectors(embeddings.cf_vectors, content, embeddings.viewers, params)
    return replace(embeddings, content_vectors=content, vectors=vectors, params=params)


CONTENT_MODELS = ("mlp", "linear")
CONTENT_OBJECTIVES = ("regression", "als")
PARAM_CHOICES = {"content_model": CONTENT_MODELS, "content_objective": CONTENT_OBJECTIVES}  # the CLI refuses others
CONTENT_RIDGE = 0.3  # L2 penalty of the linear content model (per unit of mean title weight)


def text_inputs(vectors: np.ndarray | None, n: int) -> np.ndarray:
    """The synopsis vectors as model inputs: centred over titles with text, zero (and flagged) without."""
    if vectors is None:
        return np.zeros((n, 0), dtype=np.float32)
    has = np.abs(vectors).sum(axis=1) > 0
    out = np.zeros((n, vectors.shape[1] + 1), dtype=np.float32)
    if has.any():
        text = vectors[has].astype(np.float32)
        out[has, :-1] = text - text.mean(axis=0)
    out[:, -1] = has
    return out


def fit_linear_content_model(features: np.ndarray, targets: np.ndarray, sample_weight: np.ndarray) -> torch.nn.Module:
    """Weighted ridge regression features -> collaborative vector, solved exactly, as a torch layer."""
    x = torch.from_numpy(np.hstack([features, np.ones((len(features), 1), np.float32)])).double()
    w = torch.from_numpy(sample_weight / max(float(sample_weight.mean()), 1e-9)).double()[:, None]
    gram = (x * w).T @ x + CONTENT_RIDGE * torch.eye(x.shape[1], dtype=torch.float64)
    solved = torch.linalg.solve(gram, (x * w).T @ torch.from_numpy(targets).double())  # [features + 1, d]
    layer = torch.nn.Linear(features.shape[1], targets.shape[1])
    with torch.no_grad():
        layer.weight.copy_(solved[:-1].T.float())
        layer.bias.copy_(solved[-1].float())
    return layer.eval()


def content_network(inputs: int, outputs: int, params: ModelParams) -> torch.nn.Module:
    """The content model's torch network for ``params.content_model``: one layer, or an MLP with one hidden layer.

    (A second hidden layer collapsed on ALS's loss: 0.001 hit rate against 0.13 on the demo data.)
    """
    torch.manual_seed(params.seed)
    if params.content_model == "linear":
        return torch.nn.Linear(inputs, outputs)
    hidden = params.content_hidden
    return torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, outputs))


class Adam:
    """``torch.optim.Adam``'s update on CPU (its single-tensor form, default betas and eps), step for step.

    Only because ``torch.optim``'s first optimizer imports ``torch._dynamo``: 1-2 s of every
    job for two small networks. tests/test_embeddings.py checks it against ``torch.optim.Adam``.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1**self.steps)
        root_correction = (1 - beta2**self.steps) ** 0.5
        for p, (mean, square) in zip(self.params, self.moments):
            if p.grad is None:
                continue
            grad = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            mean.lerp_(grad, 1 - beta1)
            square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            p.addcdiv_(mean, (square.sqrt() / root_correction).add_(self.eps), value=-step_size)


CONTENT_BATCH = 1024  # titles per optimizer step of the content model
CONTENT_WEIGHT_DECAY = 1.0  # L2 on the content network's weights, per viewer pair of the loss


def fit_to_als_loss(features: np.ndarray, sample: ViewerSample, model: torch.nn.Module, params: ModelParams) -> torch.nn.Module:
    """Train ``model`` (a title's features -> its vector) on ALS's loss with the users' factors fixed.

    Per title with sampled viewers: v̂ᵀGv̂ + scale x Σ_sampled [(c − 1) s² − 2 c s],
    s = u·v̂ (the per-title form of :class:`ViewerSample`'s loss, constants
    dropped), normalised by the viewer pairs it stands for. The L2 term is
    on the network's weights, not ALS's λ on its outputs: that shrank every
    new title's vector (demo data: hit rate 0.20 against 0.31). Titles are
    shuffled once into fixed batches of CONTENT_BATCH whose pairs are
    contiguous, so a step costs batch x (features + sampled viewers) x d.
    ``params.content_steps`` steps of Adam, whatever the catalogue's size.
    """
    rng = np.random.default_rng(params.seed)
    titles = np.flatnonzero(sample.scale > 0)
    titles = titles[rng.permutation(len(titles))]
    rank = np.full(len(sample.scale), -1, np.int64)
    rank[titles] = np.arange(len(titles))
    order = np.argsort(rank[sample.item], kind="stable")  # pairs by the titles' shuffled order
    starts = np.searchsorted(rank[sample.item][order], np.arange(len(titles) + 1))
    x = torch.from_numpy(np.ascontiguousarray(features[titles], np.float32))
    u = torch.from_numpy(sample.factors[order])
    c = sample.confidence[order].astype(np.float64)
    w = sample.scale[sample.item[order]].astype(np.float64)
    pull = torch.from_numpy((2.0 * w * c).astype(np.float32))
    spread = torch.from_numpy((w * (c - 1.0)).astype(np.float32))
    owner = torch.from_numpy(rank[sample.item[order]])
    gram = torch.from_numpy(sample.gram.astype(np.float32))
    pairs = max(float(w.sum()), 1.0)
    size = min(CONTENT_BATCH, len(titles))
    batches = [(lo, min(lo + size, len(titles))) for lo in range(0, len(titles), size)]
    optimizer = Adam(model.parameters(), lr=1e-2)
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    step = 0
    while step < params.content_steps:
        for b in rng.permutation(len(batches)):
            if step == params.content_steps:
                break
            lo, hi = batches[b]
            p_lo, p_hi = starts[lo], starts[hi]
            v = model(x[lo:hi])
            s = (u[p_lo:p_hi] * v[owner[p_lo:p_hi] - lo]).sum(dim=1)
            loss = ((v @ gram) * v).sum() + (spread[p_lo:p_hi] * s * s - pull[p_lo:p_hi] * s).sum()
            loss = loss * (len(titles) / (hi - lo)) / pairs
            loss = loss + CONTENT_WEIGHT_DECAY * sum(p.pow(2).sum() for p in weights) / pairs
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return model.eval()


def fit_content_model(
    features: np.ndarray, targets: np.ndarray, sample_weight: np.ndarray, params: ModelParams
) -> torch.nn.Module:
    """Train an MLP features -> collaborative vector on titles that have viewers."""
    torch.manual_seed(params.seed)
    x = torch.from_numpy(features)
    y = torch.from_numpy(targets)
    w = torch.from_numpy(sample_weight / max(sample_weight.mean(), 1e-9)).float()
    model = torch.nn.Sequential(
        torch.nn.Linear(features.shape[1], params.content_hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(params.content_hidden, params.content_hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(params.content_hidden, targets.shape[1]),
    )
    optimizer = Adam(model.parameters(), lr=3e-3, weight_decay=1e-5)
    # A fixed number of steps, not epochs: the cost stays flat as the catalogue grows.
    generator = torch.Generator().manual_seed(params.seed)
    batch = min(1024, len(x))
    for _ in range(params.content_steps):
        idx = torch.randint(len(x), (batch,), generator=generator)
        optimizer.zero_grad()
        loss = ((model(x[idx]) - y[idx]).pow(2).sum(dim=1) * w[idx]).mean()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


# What each learned stage depends on, beyond the events: a stage is reused from an earlier
# fit on the same events (``reuse``) when these agree (selection trials that change only the
# blend, e.g. seq_weight or content_shrink, then cost just their ranking).
CONFIDENCE_FIELDS = ("alpha", "eps", "recency_half_life_days", "recency_floor")
ALS_FIELDS = (*CONFIDENCE_FIELDS, "factors", "regularization", "regularization_users", "iterations", "seed")
CONTENT_FIELDS = (*ALS_FIELDS, "content_steps", "content_hidden", "content_model", "content_objective")
SEQUENCE_FIELDS = ("seq_window", "seq_tau", "seq_pop_exponent", "seq_neighbors")


def _same(a: ModelParams, b: ModelParams, fields: tuple[str, ...]) -> bool:
    return all(getattr(a, name) == getattr(b, name) for name in fields)


def confidence_and_viewers(events: Events, catalog: Catalog, params: ModelParams) -> tuple[sp.csr_matrix, np.ndarray]:
    """The confidence matrix and each title's distinct viewers: learn_embeddings' first stage."""
    confidence = confidence_matrix(events, catalog, params)
    return confidence, np.bincount(confidence.indices, minlength=confidence.shape[1]).astype(np.int64)


def learn_embeddings(
    events: Events, catalog: Catalog, params: ModelParams, show_progress: bool = True, reuse: Embeddings | None = None,
    confidence: tuple[sp.csr_matrix, np.ndarray] | None = None,
) -> Embeddings:
    """Collaborative factors, content model, and the evidence-weighted blend of the two.

    "Watched next" needs only the events and viewer counts, and is mostly
    single-threaded numpy, so it is built in a thread beside the content
    model, which runs on one core after ALS. (Beside ALS it stalled implicit's
    threads: at 20M events ALS took 31-34 s with it against 25 s alone.)
    ``reuse``: embeddings learned on these same events; each stage whose
    parameters (``*_FIELDS``) are unchanged is taken from it. ``confidence``:
    :func:`confidence_and_viewers` of these events and parameters, built already.
    """
    timings = {}
    started = time.perf_counter()
    if confidence is not None:
        confidence, viewers = confidence
    elif reuse is not None and _same(reuse.params, params, CONFIDENCE_FIELDS):
        confidence, viewers = reuse.confidence, reuse.viewers
    else:
        confidence, viewers = confidence_and_viewers(events, catalog, params)
    timings["confidence_matrix"] = time.perf_counter() - started

    started = time.perf_counter()
    wants_sample = params.content_objective == "als"  # only that objective reads the users' side
    if reuse is not None and _same(reuse.params, params, ALS_FIELDS) and (reuse.viewer_sample is not None or not wants_sample):
        cf_items, user_factors, sample = reuse.cf_vectors, None, reuse.viewer_sample
    else:
        cf_items, user_factors = fit_collaborative(confidence, params, show_progress=show_progress)
    timings["als"] = time.perf_counter() - started

    def timed_sequence() -> sp.csr_matrix:
        if reuse is not None and _same(reuse.params, params, SEQUENCE_FIELDS):
            return reuse.sequence
        began = time.perf_counter()
        result = sequence_neighbors(events, len(catalog), params, viewers)
        timings["sequence"] = time.perf_counter() - began  # overlaps "content_model"
        return result

    with ThreadPoolExecutor(1) as beside:
        sequence_future = beside.submit(timed_sequence)
        started = time.perf_counter()
        if user_factors is not None:
            sample = viewer_sample(user_factors, confidence, viewers, params.seed) if wants_sample else None
            del user_factors
        if reuse is not None and _same(reuse.params, params, CONTENT_FIELDS):
            content = reuse.content_vectors
        else:
            content = content_vectors(catalog, cf_items, viewers, params, sample)
        timings["content_model"] = time.perf_counter() - started
        sequence = sequence_future.result()

    vectors = blend_vectors(cf_items, content, viewers, params)
    return Embeddings(
        vectors=vectors,
        cf_vectors=cf_items,
        content_vectors=content,
        viewers=viewers,
        confidence=confidence,
        viewer_sample=sample,
        sequence=sequence,
        params=params,
        timings=timings,
    )


def blend_vectors(cf_items: np.ndarray, content: np.ndarray, viewers: np.ndarray, params: ModelParams) -> np.ndarray:
    """A title's final vector: collaborative and content vectors weighed by its evidence (distinct viewers)."""
    # 0 viewers -> content only; many viewers -> collaborative.
    trust = (viewers / (viewers + params.content_shrink)).astype(np.float32)[:, None]
    vectors = (trust * cf_items + (1.0 - trust) * content).astype(np.float32)
    cold = viewers == 0
    if params.cold_norm_quantile > 0 and cold.any() and (~cold).any():
        # Regression shrinks predictions towards the mean, so content-only vectors come out
        # short and never win a dot product: give them a typical warm title's length.
        target = np.quantile(np.linalg.norm(cf_items[~cold], axis=1), params.cold_norm_quantile)
        lengths = np.linalg.norm(vectors[cold], axis=1, keepdims=True)
        vectors[cold] *= (target / np.maximum(lengths, 1e-9)).astype(np.float32)
    return vectors


def sequence_neighbors(
    events: Events, n_items: int, params: ModelParams, viewers: np.ndarray | None = None
) -> sp.csr_matrix:
    """Item-item "watched next" strengths from each user's time-ordered titles.

    Two titles within ``seq_window`` positions of each other in a user's
    sequence (episodes of one show in a row count once) add
    exp(-(distance-1)/tau) to their pair, both ways. Dividing by the titles'
    viewer counts (distinct users; computed when not given) to a power keeps
    blockbusters from being everyone's neighbour; each row keeps its
    ``seq_neighbors`` strongest entries. Cost is O(window x events) plus one
    sparse build, with no items x items dense matrix.
    """
    events = events.in_time_order()
    if viewers is None:
        viewers = np.bincount(
            np.unique(events.user.astype(np.int64) * n_items + events.item) % n_items, minlength=n_items
        )
    upper = summed_pairs(list(sequence_pairs(events.user, events.item, params)), n_items)
    if upper.nnz == 0:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    matrix = (upper + upper.T).tocsr()
    scale = popularity_scale(viewers, params)
    matrix.data *= scale[np.repeat(np.arange(n_items), np.diff(matrix.indptr))] * scale[matrix.indices]
    return prune_rows(matrix, params.seq_neighbors)


def summed_pairs(pairs: list[np.ndarray], n: int) -> sp.csr_matrix:
    """[n, n] CSR of ``pairs`` = [rows, columns, values] summed per (row, column), columns ascending in
    each row. The list is emptied, so the pairs' memory goes as soon as they are sorted.

    Two counting sorts (scipy's COO -> CSC -> CSR, each O(entries)) put the
    duplicates side by side, and one linear pass sums them: 45M watched-next
    pairs in 1.2 s, against 3.1 s for ``coo.tocsr()``, which sorts each row's
    entries by comparison before summing. Duplicates are summed in input order.
    """
    rows, cols, values = pairs
    pairs.clear()
    coo = sp.coo_matrix((values, (rows, cols)), shape=(n, n))
    del rows, cols, values
    coo.has_canonical_format = True  # not so: tocsc() then keeps the duplicates (summed below) instead of sorting
    by_column = coo.tocsc()
    del coo
    matrix = by_column.tocsr()  # the second counting sort leaves every row's columns ascending
    del by_column
    matrix.has_canonical_format = False
    matrix.sum_duplicates()  # sorted already: one linear pass
    return matrix


def sequence_pairs(users: np.ndarray, items: np.ndarray, params: ModelParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Watched-next pairs (smaller title, larger title, weight) of time-ordered viewings, one entry per occurrence.

    ``users``/``items`` are in time order per user (every viewing of a user
    together). Episodes of one show in a row count once; two titles within
    ``seq_window`` positions weigh exp(-(distance - 1) / tau). Shared by both
    training engines (Spark calls it on each partition of users).
    """
    new_title = np.ones(len(users), dtype=bool)
    new_title[1:] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])
    users, items = users[new_title], items[new_title]
    # A title next to itself (re-watched after another) is no neighbour.
    pairs = [
        (users[distance:] == users[:-distance]) & (items[distance:] != items[:-distance])
        for distance in range(1, params.seq_window + 1)
    ]
    total = sum(int(np.count_nonzero(pair)) for pair in pairs)
    rows, cols = np.empty(total, items.dtype), np.empty(total, items.dtype)
    weights = np.empty(total, np.float32)
    at = 0
    for distance, pair in enumerate(pairs, 1):  # written in place: no concatenation of 45M pairs at 20M events
        a, b = items[:-distance][pair], items[distance:][pair]
        end = at + len(a)
        np.minimum(a, b, out=rows[at:end])
        np.maximum(a, b, out=cols[at:end])
        weights[at:end] = np.exp(-(distance - 1) / params.seq_tau)
        at = end
    return rows, cols, weights


def popularity_scale(viewers: np.ndarray, params: ModelParams) -> np.ndarray:
    """Per-title factor of a watched-next strength: 1 / (viewers + 1) ** seq_pop_exponent (hits are no one's neighbour)."""
    return (1.0 / (np.asarray(viewers, dtype=np.float64) + 1.0) ** params.seq_pop_exponent).astype(np.float32)


def prune_rows(matrix: sp.csr_matrix, keep: int) -> sp.csr_matrix:
    """Keep each row's ``keep`` largest entries, in column order.

    Only rows longer than ``keep`` are touched, each with one O(row) partial
    sort, so the cost is linear in the entries (a global sort was 5x slower).
    """
    matrix = matrix.tocsr()
    matrix.sort_indices()
    counts = np.diff(matrix.indptr)
    chosen = np.ones(matrix.nnz, dtype=bool)
    for row in np.flatnonzero(counts > keep).tolist():
        start, end = matrix.indptr[row], matrix.indptr[row + 1]
        weakest = np.argpartition(matrix.data[start:end], end - start - keep)[: end - start - keep]
        chosen[start + weakest] = False
    return sp.csr_matrix(
        (matrix.data[chosen], matrix.indices[chosen], np.concatenate([[0], np.cumsum(np.minimum(counts, keep))])),
        shape=matrix.shape,
    )
