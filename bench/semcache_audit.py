"""How well hit audits (semcache/audit.py: the model answers the new question again and the two answers are
compared by their MiniLM cosine) tell a cached answer that serves the question from one that does not, on Quora
question pairs held out from every tuning (CPU).

Pairs: every held-out pair the default semantic cache serves (its true and false hits, the protocol of
bench/semcache.py qqp: the first question stored, the second looked up), and a balanced sample of held-out pairs
whose questions' MiniLM cosine is at least --min-cosine (where the cache finds its candidates). Per pair the model
answers both questions as the gateway's local backend would (its chat template, greedy, --max-tokens), and the
answers' cosine is what an audit compares with `semantic_cache.audit.agreement`. Reported per agreement: the share
of duplicate pairs an audit calls false (false alarms: an entry dropped needlessly) and of non-duplicates it
catches, with 95% bootstrap intervals; and what audits of every hit would leave of the cache's false hits.

    python bench/semcache_audit.py --per-class 150 --out bench/results/semcache-audit-2026-12-03.md

The model is the one blendgate embeds (SmolLM2-135M-Instruct): a small model's answers vary more between two
wordings of one question than a large model's, so the false alarms here are an upper end. Answers are kept in
--cache-dir between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from blendgate.engine.weights import load_model
from blendgate.retriever.embedder import Embedder
from blendgate.semcache.settings import SemanticCacheSettings
from rich.progress import Progress
from semcache_qqp import (
    QqpPair,
    balanced,
    cache_outcomes,
    default_cache,
    load_qqp,
    pair_cosines,
    resample_indices,
    split_held_out,
)

if TYPE_CHECKING:
    from semcache import Embeddings  # bench/semcache.py

AGREEMENTS = (0.5, 0.6, 0.7, 0.8, 0.9)
BATCH = 16


class Answers:
    """The model's greedy answers to questions, kept in a JSON file per model and length."""

    def __init__(self, cache_dir: Path, max_tokens: int, model_cache: Path) -> None:
        self.path = cache_dir / f"smollm2-answers-{max_tokens}.json"
        self.max_tokens = max_tokens
        self.model_cache = model_cache
        self.known: dict[str, str] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.loaded = None

    def __call__(self, questions: list[str]) -> dict[str, str]:
        missing = sorted({q for q in questions if q not in self.known})
        if missing:
            self._generate(missing)
        return {q: self.known[q] for q in questions}

    def _generate(self, questions: list[str]) -> None:
        import torch

        if self.loaded is None:
            self.loaded = load_model(None, dtype="float32", device="cpu", cache_dir=self.model_cache)
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        tokenizer.padding_side = "left"
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with Progress() as progress, torch.inference_mode():
            task = progress.add_task("answering", total=len(questions))
            for start in range(0, len(questions), BATCH):
                batch = questions[start:start + BATCH]
                texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                       add_generation_prompt=True) for q in batch]
                encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                out = model.generate(**encoded, max_new_tokens=self.max_tokens, do_sample=False, pad_token_id=pad)
                for question, answer in zip(batch, tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:],
                                                                          skip_special_tokens=True)):
                    self.known[question] = answer.strip()
                progress.advance(task, len(batch))
                self.path.write_text(json.dumps(self.known))


def agreement(pairs: list[QqpPair], answers: dict[str, str], embeddings: Embeddings) -> np.ndarray:
    """Per pair, the cosine of the model's answers to its two questions."""
    embeddings.load([answers[q] for p in pairs for q in (p.first, p.second)])
    return np.array([float(embeddings(answers[p.first]) @ embeddings(answers[p.second])) for p in pairs])


def interval(flags: np.ndarray, resamples: int = 2000, seed: int = 0) -> str:
    if len(flags) == 0:
        return "-"
    rng = np.random.default_rng(seed)
    shares = flags[rng.integers(0, len(flags), (resamples, len(flags)))].mean(axis=1)
    low, high = np.percentile(shares, [2.5, 97.5])
    return f"{flags.mean():.3f} ({low:.3f}-{high:.3f})"


def table(label: str, cosines: np.ndarray, duplicate: np.ndarray) -> list[str]:
    lines = [f"**{label}**: {int(duplicate.sum())} duplicate and {int((~duplicate).sum())} non-duplicate pairs; "
             f"answers' cosine median {np.median(cosines[duplicate]):.3f} on duplicates, "
             f"{np.median(cosines[~duplicate]):.3f} on non-duplicates", "",
             "| agreement | duplicates an audit calls false (false alarms, 95% CI) "
             "| non-duplicates it catches (95% CI) |",
             "|---|---|---|"]
    for threshold in AGREEMENTS:
        below = cosines < threshold
        lines.append(f"| {threshold:g} | {interval(below[duplicate])} | {interval(below[~duplicate])} |")
    return lines


def served_rows(cosines: np.ndarray, duplicate: np.ndarray) -> list[str]:
    """What audits of every hit would leave of the cache's hits: true and false hits kept, false share kept."""
    lines = ["", "If every hit the cache served were audited (entries the audit calls false dropped):", "",
             "| agreement | true hits kept | false hits kept | false share of hits kept (95% CI) |",
             "|---|---|---|---|"]
    picks = resample_indices(duplicate, 2000, 0)
    for threshold in AGREEMENTS:
        kept = cosines >= threshold
        true, false = kept & duplicate, kept & ~duplicate
        t, f = true[picks].sum(axis=1), false[picks].sum(axis=1)
        shares = f / np.maximum(t + f, 1)
        low, high = np.percentile(shares, [2.5, 97.5])
        share = false.sum() / max(1, true.sum() + false.sum())
        lines.append(f"| {threshold:g} | {int(true.sum())}/{int(duplicate.sum())} | {int(false.sum())}/"
                     f"{int((~duplicate).sum())} | {share:.3f} ({low:.3f}-{high:.3f}) |")
    return lines


async def served_pairs(embedder: Embedder, embeddings: Embeddings, held: list[QqpPair]) -> list[QqpPair]:
    cache = default_cache(SemanticCacheSettings(), embedder.dimension, embedder.embed, None)
    await cache.start()
    outcomes = await cache_outcomes(cache, held, embeddings)
    await cache.close()
    return [o.pair for o in outcomes if o.served]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=150, help="the sample's duplicates (and non-duplicates)")
    parser.add_argument("--min-cosine", type=float, default=0.9, help="the sample's least question cosine")
    parser.add_argument("--max-tokens", type=int, default=48, help="answer length (the gateway tests use 16)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "blendgate-bench",
                        help="where embeddings, answers and the converted model are kept between runs")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args()
    from semcache import Embeddings  # bench/semcache.py (run from bench/, it comes before the package)

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    embedder = Embedder(device="cpu")
    embeddings = Embeddings(embedder, args.cache_dir)
    _, held_out = split_held_out(load_qqp())
    held = balanced(held_out)
    embeddings.load([q for p in held for q in (p.first, p.second)])
    served = asyncio.run(served_pairs(embedder, embeddings, held))
    near = [p for p, c in zip(held, pair_cosines(held, embeddings)) if c >= args.min_cosine]
    sample = balanced(near, args.per_class, seed=1)
    answers = Answers(args.cache_dir, args.max_tokens, args.cache_dir / "model")(
        [q for p in served + sample for q in (p.first, p.second)])
    report = [f"# Hit audits on Quora question pairs, {date.today().isoformat()}", "",
              f"- command: `python bench/semcache_audit.py {' '.join(sys.argv[1:])}`",
              f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU",
              f"- model: SmolLM2-135M-Instruct (embedded), greedy, {args.max_tokens} tokens; answers compared by "
              "all-MiniLM-L6-v2's cosine; held-out pairs only (bench/semcache_qqp.py's split)",
              f"- answers digest: {hashlib.sha256(json.dumps(answers, sort_keys=True).encode()).hexdigest()[:12]}",
              ""]
    for label, pairs in ((f"Held-out pairs with question cosine >= {args.min_cosine:g} (balanced sample)", sample),
                         ("Held-out pairs the default cache serves", served)):
        duplicate = np.array([p.duplicate for p in pairs])
        cosines = agreement(pairs, answers, embeddings)
        report += table(label, cosines, duplicate)
        if pairs is served:
            report += served_rows(cosines, duplicate)
        report.append("")
    text = "\n".join(report) + "\n"
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    print(text)


if __name__ == "__main__":
    main()
