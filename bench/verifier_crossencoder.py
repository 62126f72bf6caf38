"""Experiment: a cross-encoder fine-tuned from all-MiniLM-L6-v2 as the verifier's (or one of its features'),
measured as bench/verifier_crossfit.py measures the verifier (QQP tuning split only, the held-out pairs
untouched): each tuning pair scored by a cross-encoder trained on the other folds, candidates at cosine >=
--floor, veto guards refusing as a lookup does; false hits over those of the best single cosine threshold at
15%, 20% and 25% of the tuning duplicates served. Also the cross-encoder's forward time per pair on this CPU,
since the verifier runs inside the semantic cache's 2 ms miss budget.

    python bench/verifier_crossencoder.py ../shared/data/pairs/qqp/qqp-train.tsv --cache-dir /tmp/qqpbench-emb \
        [--layers 6] [--epochs 2] [--folds 2] [--scores /tmp/ce/scores.npy]

The cross-encoder: the MiniLM encoder's first --layers layers with a linear head on [CLS] (transformers'
BertForSequenceClassification, one logit), fine-tuned with binary cross-entropy on the other folds' pairs at
cosine >= verifier_training.TRAINING_FLOOR in both orders, AdamW, linear warm-up and decay.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from blendgate.retriever.embedder import default_embedder_path
from blendgate.semcache.guards import check
from blendgate.semcache.pair_words import WordRarity
from blendgate.semcache.rephrasings import rephrasings
from blendgate.semcache.verifier import VETO_GUARDS
from blendgate.semcache.verifier_training import REPHRASINGS, SEED, EmbeddedPairs, cross_fitted, training_matrix
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup
from verifier_crossfit import SHARES, embedded_tuning_split, false_hits_at

MAX_TOKENS = 64


def train(pairs, labels, layers: int, epochs: int, batch: int = 32, lr: float = 4e-5):
    path = default_embedder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, num_hidden_layers=layers)
    first = [a for a, _ in pairs] + [b for _, b in pairs]
    second = [b for _, b in pairs] + [a for a, _ in pairs]
    y = torch.tensor(np.concatenate([labels, labels]), dtype=torch.float32)
    steps = epochs * ((len(first) + batch - 1) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    generator = np.random.default_rng(SEED)
    model.train()
    done, start = 0, time.perf_counter()
    for _ in range(epochs):
        order = generator.permutation(len(first))
        for i in range(0, len(order), batch):
            rows = order[i:i + batch]
            inputs = tokenizer([first[j] for j in rows], [second[j] for j in rows], truncation=True,
                               max_length=MAX_TOKENS, padding=True, return_tensors="pt")
            loss = loss_fn(model(**inputs).logits[:, 0], y[rows])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            done += 1
            if done % 50 == 0:
                print(f"  step {done}/{steps} loss {loss.item():.3f} {time.perf_counter() - start:.0f} s",
                      file=sys.stderr, flush=True)
    model.eval()
    return tokenizer, model


@torch.inference_mode()
def score(tokenizer, model, pairs, batch: int = 128) -> np.ndarray:
    """Symmetrised logit per (a, b) pair: mean of both orders."""
    out = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        both, left, right = [], [a for a, _ in chunk], [b for _, b in chunk]
        for first, second in ((left, right), (right, left)):
            inputs = tokenizer(first, second, truncation=True, max_length=MAX_TOKENS, padding=True,
                               return_tensors="pt")
            both.append(model(**inputs).logits[:, 0].numpy())
        out.append((both[0] + both[1]) / 2)
    return np.concatenate(out)


@torch.inference_mode()
def forward_ms(tokenizer, model, pair, runs: int = 200) -> tuple[float, float]:
    inputs = tokenizer(*pair, return_tensors="pt")
    for _ in range(5):
        model(**inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(**inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("qqp", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "blendgate-bench")
    parser.add_argument("--floor", type=float, default=0.89)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--scores", type=Path, help="keep (or reuse) the cross-fitted scores here")
    args = parser.parse_args()
    tuning = embedded_tuning_split(args.qqp, args.cache_dir)
    tune = tuning.pairs
    rarity = WordRarity.from_questions(q for p in tune for q in (p.cached, p.query))
    rephrased = EmbeddedPairs.embedded(rephrasings([p.cached for p in tune], REPHRASINGS), tuning.embed)
    matrix = training_matrix(tune, tuning.cosines, rarity, rephrased)
    texts = [(p.query, p.cached) for p in matrix.pairs]
    duplicate = matrix.y.astype(bool)
    if args.scores and args.scores.exists():
        ce = np.load(args.scores)
    else:
        folds = np.random.default_rng(SEED + 1).permutation(len(texts)) % args.folds
        ce = np.zeros(len(texts))
        for fold in range(args.folds):
            train_rows = np.flatnonzero(folds != fold)
            print(f"fold {fold}: training on {len(train_rows)} pairs", file=sys.stderr, flush=True)
            tokenizer, model = train([texts[i] for i in train_rows], matrix.y[train_rows], args.layers, args.epochs)
            rows = np.flatnonzero(folds == fold)
            ce[rows] = score(tokenizer, model, [texts[i] for i in rows])
        if args.scores:
            np.save(args.scores, ce)
        torch.set_num_threads(1)
        p50, p99 = forward_ms(tokenizer, model, texts[0])
        print(f"cross-encoder forward, one pair, one order, 1 thread: p50 {p50:.1f} ms, p99 {p99:.1f} ms")

    held = cross_fitted(matrix.standard, matrix.y, matrix.extra)
    # Stacked: the logistic regression's features plus the cross-encoder's logit (standardised), cross-fitted;
    # the rephrasings get the highest logit seen (they are same-answer pairs by construction).
    z = ((ce - ce.mean()) / ce.std())[:, None]
    stacked = cross_fitted(np.hstack([matrix.standard, z]), matrix.y,
                           np.hstack([matrix.extra, np.full((len(matrix.extra), 1), z.max())]),
                           signs=None)
    vetoed = np.array([check(p.query, p.cached).fired(VETO_GUARDS) is not None for p in matrix.pairs])
    candidate = matrix.cosines >= args.floor
    arms = {"cosine alone": np.where(candidate, matrix.cosines, -np.inf),
            "verifier (logistic regression, as shipped)": np.where(candidate & ~vetoed, held, -np.inf),
            "cross-encoder + veto guards": np.where(candidate & ~vetoed, ce, -np.inf),
            "cross-encoder alone": np.where(candidate, ce, -np.inf),
            "logistic regression + cross-encoder logit + veto guards": np.where(candidate & ~vetoed, stacked, -np.inf)}
    total = sum(p.same_answer for p in tune)
    print(f"\n{int(candidate.sum())} candidates at cosine >= {args.floor}; layers {args.layers}, "
          f"epochs {args.epochs}, folds {args.folds}\n")
    print("| arm | " + " | ".join(f"false hits at {s:.0%} (ratio)" for s in SHARES) + " |")
    print("|---|" + "---|" * len(SHARES))
    base = {s: false_hits_at(arms["cosine alone"], duplicate, int(np.ceil(s * total))) for s in SHARES}
    for name, scores in arms.items():
        cells = []
        for share in SHARES:
            mine = false_hits_at(scores, duplicate, int(np.ceil(share * total)))
            cells.append(f"{mine} ({mine / max(base[share], 1):.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
