"""Experiment: BERTScore-like features from MiniLM's contextual token embeddings added to the verifier,
measured as bench/verifier_crossfit.py measures it (QQP tuning split only, 5-fold cross-fitted logistic
regression, candidates at cosine >= --floor, veto guards refusing as a lookup does; false hits of the verifier
over those of the best single cosine threshold serving as many of the tuning duplicates).

    python bench/verifier_tokens.py ../shared/data/pairs/qqp/qqp-train.tsv --cache-dir /tmp/qqpbench-emb \
        [--token-cache /tmp/qqpbench-tok] [--seeds 19 1 2 3 4]

Token embeddings: all-MiniLM-L6-v2's last hidden state per word-piece (sentence-transformers
output_value="token_embeddings"), [CLS]/[SEP] dropped, each unit-normalised, kept in --token-cache as fp16.
Per pair (query tokens A, cached tokens B), S = A @ B.T; a token's "best match" is its row/column max of S.
No product code changes: FEATURES are the verifier's; the token features are added columns here.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
from blendgate.retriever.embedder import Embedder
from blendgate.semcache import verifier_training as vt
from blendgate.semcache.guards import STOPWORDS, check
from blendgate.semcache.pair_words import WordRarity
from blendgate.semcache.pairs import qqp_split
from blendgate.semcache.rephrasings import rephrasings
from blendgate.semcache.verifier import FEATURE_SIGNS, VETO_GUARDS
from verifier_crossfit import SHARES, false_hits_at

# Pieces of contractions and single letters that the uncased word-piece tokenizer splits off: not content.
_NOT_CONTENT = STOPWORDS | {"s", "t", "n", "d", "m", "ll", "re", "ve", "don", "doesn", "didn", "isn", "aren",
                            "can", "won", "wasn", "weren", "shouldn", "wouldn", "couldn", "hasn", "haven"}

TOKEN_FEATURES = ("bs_p", "bs_r", "bs_f", "bs_p_idf", "bs_r_idf", "bs_f_idf",
                  "min_all", "min_content", "second_content", "min_content_word",
                  "below_50", "below_60", "below_70", "min_content_novel")
# Signs when constrained: similarities only up, counts of poorly matched tokens only down.
TOKEN_SIGNS = {"bs_p": 1, "bs_r": 1, "bs_f": 1, "bs_p_idf": 1, "bs_r_idf": 1, "bs_f_idf": 1, "min_all": 1,
               "min_content": 1, "second_content": 1, "min_content_word": 1, "below_50": -1, "below_60": -1,
               "below_70": -1, "min_content_novel": 1}


class TokenStore:
    """Per question: word-piece ids (no [CLS]/[SEP]) and unit-normalised contextual token vectors (fp16)."""

    def __init__(self, embedder: Embedder, cache_dir: Path) -> None:
        self.model = embedder.model
        self.tokenizer = embedder.model.tokenizer
        self.cache_dir = cache_dir
        self.index: dict[str, int] = {}
        self.offsets = np.zeros(1, dtype=np.int64)
        self.ids = np.zeros(0, dtype=np.int32)
        self.vectors = np.zeros((0, 384), dtype=np.float16)

    def load(self, sentences: list[str]) -> None:
        unique = sorted(set(sentences))
        key = hashlib.sha256("\n".join(unique).encode()).hexdigest()[:16]
        path = self.cache_dir / f"minilm-tokens-{key}.npz"
        if path.exists():
            data = np.load(path)
            offsets, ids, vectors = data["offsets"], data["ids"], data["vectors"]
        else:
            started = time.time()
            encoded = self.tokenizer(unique, truncation=True, max_length=self.model.max_seq_length)["input_ids"]
            out = self.model.encode(unique, batch_size=64, output_value="token_embeddings", convert_to_numpy=False,
                                    show_progress_bar=False)
            lengths, id_parts, vec_parts = [], [], []
            for ids_one, emb in zip(encoded, out):
                emb = emb.float().numpy()
                assert emb.shape[0] == len(ids_one), (emb.shape, len(ids_one))
                emb = emb[1:-1]
                emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
                lengths.append(len(emb))
                id_parts.append(np.asarray(ids_one[1:-1], dtype=np.int32))
                vec_parts.append(emb.astype(np.float16))
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            ids, vectors = np.concatenate(id_parts), np.concatenate(vec_parts)
            np.savez(path, offsets=offsets, ids=ids, vectors=vectors)
            print(f"token embeddings of {len(unique)} questions in {time.time() - started:.0f} s -> {path}")
        self.index = {s: i for i, s in enumerate(unique)}
        self.offsets, self.ids, self.vectors = offsets, ids, vectors

    def get(self, sentence: str) -> tuple[np.ndarray, np.ndarray]:
        i = self.index[sentence]
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.vectors[a:b]


class PieceInfo:
    """Per word-piece id: whether its word is content, grouped per question (a word = a piece and its ##
    continuations); word-piece IDF over the tuning questions, as WordRarity: ln((N + 1) / (count + 1))."""

    def __init__(self, tokenizer, tune_questions: list[str], store: TokenStore) -> None:
        self.vocab = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
        unique = sorted(set(tune_questions))
        counts: Counter[int] = Counter()
        for q in unique:
            counts.update(set(store.get(q)[0].tolist()))
        self.questions = len(unique)
        self.idf_table = np.full(len(self.vocab), math.log((self.questions + 1) / 2))
        for piece, c in counts.items():
            self.idf_table[piece] = math.log((self.questions + 1) / (max(c, 1) + 1))

    def words(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(word index per piece, content flag per piece)."""
        pieces = [self.vocab[i] for i in ids]
        word_of, words, k = [], [], -1
        for p in pieces:
            if p.startswith("##") and k >= 0:
                words[k] += p[2:]
            else:
                k += 1
                words.append(p)
            word_of.append(k)
        content_word = [any(ch.isalnum() for ch in w) and w not in _NOT_CONTENT and (len(w) > 1 or w.isdigit())
                        for w in words]
        word_of = np.array(word_of, dtype=np.int64)
        return word_of, np.array([content_word[k] for k in word_of], dtype=bool)


def _second(values: np.ndarray) -> float:
    return float(np.partition(values, 1)[1]) if len(values) > 1 else (float(values[0]) if len(values) else 1.0)


def token_features(ids_q, vec_q, ids_c, vec_c, info: PieceInfo, word_cache: dict) -> np.ndarray:
    """TOKEN_FEATURES of one pair (query pieces and vectors, cached pieces and vectors)."""
    if len(ids_q) == 0 or len(ids_c) == 0:
        return np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1], dtype=float)
    s = vec_q.astype(np.float32) @ vec_c.astype(np.float32).T
    row, col = s.max(axis=1), s.max(axis=0)  # each query piece's best match in cached; each cached piece's
    p, r = float(row.mean()), float(col.mean())
    iq, ic = info.idf_table[ids_q], info.idf_table[ids_c]
    pw, rw = float(iq @ row / iq.sum()), float(ic @ col / ic.sum())
    key_q, key_c = ids_q.tobytes(), ids_c.tobytes()
    if key_q not in word_cache:
        word_cache[key_q] = info.words(ids_q)
    if key_c not in word_cache:
        word_cache[key_c] = info.words(ids_c)
    (wq, cq), (wc, cc) = word_cache[key_q], word_cache[key_c]
    content = np.concatenate([row[cq], col[cc]])
    min_content = float(content.min()) if len(content) else 1.0
    second = min(_second(row[cq]) if cq.any() else 1.0, _second(col[cc]) if cc.any() else 1.0)
    # word level: a content word's best match is the mean of its pieces' best matches
    word_min = 1.0
    for best, w, c in ((row, wq, cq), (col, wc, cc)):
        if c.any():
            sums = np.bincount(w[c], weights=best[c])
            n = np.bincount(w[c])
            word_min = min(word_min, float((sums[n > 0] / n[n > 0]).min()))
    # content pieces whose id does not occur on the other side at all (the words that changed)
    novel_q, novel_c = cq & ~np.isin(ids_q, ids_c), cc & ~np.isin(ids_c, ids_q)
    novel = np.concatenate([row[novel_q], col[novel_c]])
    return np.array([p, r, 2 * p * r / (p + r), pw, rw, 2 * pw * rw / (pw + rw), min(row.min(), col.min()),
                     min_content, second, word_min, float((content < 0.5).sum()), float((content < 0.6).sum()),
                     float((content < 0.7).sum()), float(novel.min()) if len(novel) else 1.0])


def token_matrix(pairs, store: TokenStore, info: PieceInfo, transform=None) -> np.ndarray:
    cache: dict = {}
    rows = []
    for p in pairs:
        iq, vq = store.get(p.query)
        ic, vc = store.get(p.cached)
        if transform is not None:
            vq, vc = transform(vq, "query"), transform(vc, "cached")
        rows.append(token_features(iq, vq, ic, vc, info, cache))
    return np.stack(rows) if rows else np.zeros((0, len(TOKEN_FEATURES)))


def table(name, held, y, cosines, candidate, vetoed, total) -> tuple[str, list[float]]:
    duplicate = y.astype(bool)
    verifier = np.where(candidate & ~vetoed, held, -np.inf)
    threshold = np.where(candidate, cosines, -np.inf)
    cells, ratios = [], []
    for share in SHARES:
        needed = int(np.ceil(share * total))
        mine, theirs = false_hits_at(verifier, duplicate, needed), false_hits_at(threshold, duplicate, needed)
        ratios.append(mine / max(theirs, 1))
        cells.append(f"{mine}/{theirs} = {ratios[-1]:.2f}")
    return f"| {name} | " + " | ".join(cells) + " |", ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("qqp", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/qqpbench-emb"))
    parser.add_argument("--token-cache", type=Path, default=Path("/tmp/qqpbench-tok"))
    parser.add_argument("--floor", type=float, default=0.89)
    parser.add_argument("--seeds", type=int, nargs="+", default=[19])
    parser.add_argument("--variants", default="main", help="main | costs")
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    args.token_cache.mkdir(parents=True, exist_ok=True)
    from semcache import Embeddings

    tune, _ = qqp_split(args.qqp)
    embedder = Embedder(device="cpu", batch_size=64)
    embeddings = Embeddings(embedder, args.cache_dir)
    rephrased_pairs = rephrasings([p.cached for p in tune], vt.REPHRASINGS)
    questions = [q for p in (*tune, *rephrased_pairs) for q in (p.cached, p.query)]
    embeddings.load(questions)
    store = TokenStore(embedder, args.token_cache)
    store.load(questions)
    info = PieceInfo(embedder.model.tokenizer, [q for p in tune for q in (p.cached, p.query)], store)

    cosines_all = np.array([float(embeddings(p.cached) @ embeddings(p.query)) for p in tune])
    rarity = WordRarity.from_questions(q for p in tune for q in (p.cached, p.query))
    reph = vt.EmbeddedPairs.embedded(rephrased_pairs, lambda ts: np.stack([embeddings(t) for t in ts]))
    keep = cosines_all >= vt.TRAINING_FLOOR
    chosen = [p for p, k in zip(tune, keep) if k]
    cosines = cosines_all[keep]
    y = np.array([p.same_answer for p in chosen], float)
    base = vt.feature_matrix(chosen, cosines, rarity)
    base_extra = vt.feature_matrix(reph.pairs, reph.cosines, rarity)
    started = time.time()
    tok = token_matrix(chosen, store, info)
    tok_extra = token_matrix(reph.pairs, store, info)
    print(f"token features of {len(chosen) + len(reph.pairs)} pairs in {time.time() - started:.1f} s")
    candidate = cosines >= args.floor
    vetoed = np.array([check(p.query, p.cached).fired(VETO_GUARDS) is not None for p in chosen])
    total = sum(p.same_answer for p in tune)
    print(f"{len(chosen)} training pairs (cosine >= {vt.TRAINING_FLOOR}), {candidate.sum()} candidates, "
          f"{len(reph.pairs)} rephrasings, {total} tuning duplicates")

    # Distribution of the key token features among candidates (diagnostic).
    cand_y = y[candidate].astype(bool)
    for name in ("min_content", "min_content_word", "min_content_novel", "bs_f_idf", "min_all"):
        j = TOKEN_FEATURES.index(name)
        v = tok[candidate, j]
        def q(a):
            return " ".join(f"{x:.3f}" for x in np.quantile(a, [0.05, 0.25, 0.5, 0.75, 0.95]))
        print(f"  {name}: duplicates q05..q95 {q(v[cand_y])}; others {q(v[~cand_y])}")

    def run(name, columns, extra_columns, token_signs, seeds=args.seeds):
        x = np.hstack([base, columns])
        extra = np.hstack([base_extra, extra_columns])
        both = np.vstack([x, extra])
        mean, scale = both.mean(axis=0), both.std(axis=0)
        scale[scale == 0] = 1.0
        signs = tuple(FEATURE_SIGNS) + tuple(token_signs)
        lines, all_ratios = [], []
        for seed in seeds:
            vt.SEED = seed
            held = vt.cross_fitted((x - mean) / scale, y, (extra - mean) / scale, signs)
            line, ratios = table(f"{name} (seed {seed})" if len(seeds) > 1 else name, held, y, cosines,
                                 candidate, vetoed, total)
            lines.append(line)
            all_ratios.append(ratios)
        vt.SEED = 19
        mean_ratios = np.mean(all_ratios, axis=0)
        if len(seeds) > 1:
            lines.append(f"| {name} (mean of {len(seeds)} seeds) | " + " | ".join(f"{r:.2f}" for r in mean_ratios)
                         + " |")
        print("\n".join(lines), flush=True)
        return mean_ratios

    def cols(names, matrix=tok, extra_matrix=tok_extra):
        idx = [TOKEN_FEATURES.index(n) for n in names]
        return matrix[:, idx], extra_matrix[:, idx]

    print("\n| variant | 15% | 20% | 25% |\n|---|---|---|---|")
    if args.variants == "main":
        run("baseline (FEATURES)", np.zeros((len(y), 0)), np.zeros((len(base_extra), 0)), ())
        subsets = {
            "all token features": TOKEN_FEATURES,
            "BERTScore P/R/F": ("bs_p", "bs_r", "bs_f"),
            "BERTScore P/R/F idf": ("bs_p_idf", "bs_r_idf", "bs_f_idf"),
            "min_all": ("min_all",),
            "min_content": ("min_content",),
            "min_content + second_content": ("min_content", "second_content"),
            "min_content_word": ("min_content_word",),
            "min_content_novel": ("min_content_novel",),
            "counts below 0.5/0.6/0.7": ("below_50", "below_60", "below_70"),
            "F idf + min_content + second + min_word": ("bs_f_idf", "min_content", "second_content",
                                                        "min_content_word"),
        }
        for label, names in subsets.items():
            c, e = cols(names)
            run(f"+ {label}, free sign", c, e, (0,) * len(names))
            run(f"+ {label}, signed", c, e, tuple(TOKEN_SIGNS[n] for n in names))
        # The token features' own ranking power among candidates (a single threshold on them, veto guards
        # refusing), for reference.
        for name in ("min_content", "bs_f_idf", "min_content_word"):
            j = TOKEN_FEATURES.index(name)
            print(table(f"single threshold on {name} alone (+veto)", tok[:, j], y, cosines, candidate, vetoed,
                        total)[0])
    return store, info, chosen, reph, run, cols, base, base_extra, y, tok, tok_extra


if __name__ == "__main__":
    main()
