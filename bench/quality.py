"""Quality of the chunk-cache modes against full prefill, on NQ-open questions with SmolLM2-135M-Instruct.

Each question gets its gold passage at a varying position among k-1 distractor passages of other questions
(every passage one chunk), placed by the gateway's own RAG template and segmentation. For each mode:
- accuracy: a gold answer appears in the normalised greedy output;
- token F1 against the best gold answer;
- KL(full prefill || mode), averaged over the next-token distributions along the teacher-forced gold answer;
- agreement: the share of greedy output tokens identical to full prefill's at the same place.

    python bench/quality.py --questions 300 --k 5 10
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import string
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "qa" / "nq-open-oracle.dev.jsonl.gz"


def normalise(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def token_f1(prediction: str, answers: list[str]) -> float:
    best = 0.0
    words = normalise(prediction).split()
    for answer in answers:
        gold = normalise(answer).split()
        common = sum((Counter(words) & Counter(gold)).values())
        if common:
            precision, recall = common / len(words), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def load_questions(count: int, seed: int) -> list[dict]:
    with gzip.open(DATA, "rt") as lines:
        rows = [json.loads(line) for line in lines]
    passages = [f"{r['ctxs'][0]['title']}. {r['ctxs'][0]['text']}" for r in rows]
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [{"question": rows[i]["question"], "answers": rows[i]["answers"], "gold": passages[i],
             "others": [passages[j] for j in order if passages[j] != passages[i]]} for i in order[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.05, 0.15, 0.3, 1.0])
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"quality-{date.today()}.md")
    args = parser.parse_args()

    from blendgate.chunkcache.runner import BlendingRunner
    from blendgate.chunkcache.store import ChunkCacheStore, MemoryTier
    from blendgate.engine.prompt import Prompt
    from blendgate.engine.runner import KVState
    from blendgate.engine.weights import load_model
    from blendgate.gateway.backends.local import LocalBackend
    from blendgate.gateway.config import LocalModelConfig, default_cache_dir
    from blendgate.gateway.rag import RagPrompt, rewrite_messages
    from blendgate.gateway.schemas import ChatCompletionRequest
    from blendgate.retriever.service import RetrievedChunk

    torch.manual_seed(0)
    loaded = load_model(None, dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu",
                        cache_dir=args.cache_dir or default_cache_dir())
    runner = BlendingRunner(loaded, ChunkCacheStore([MemoryTier("memory", 8 << 30, loaded.device)]))
    backend = LocalBackend(LocalModelConfig(name="smollm2"), cache_dir=Path("."), max_running=1, max_waiting=1)
    backend.model = loaded
    tokenizer = loaded.tokenizer
    stop_ids = loaded.eos_token_ids
    modes = [("full_prefill", 1.0), ("prefix", 1.0), *[("reuse" if r == 0 else "blend", r) for r in args.ratios]]
    questions = load_questions(args.questions, args.seed)

    def build(item: dict, k: int, slot: int, mode: str, ratio: float) -> Prompt:
        passages = item["others"][: k - 1]
        passages.insert(slot, item["gold"])
        chunks = [RetrievedChunk(str(i), text, "nq", 0, 1.0, 0) for i, text in enumerate(passages)]
        rag = RagPrompt("Answer the question using only the documents given.", chunks, item["question"])
        request = ChatCompletionRequest(model="smollm2", messages=[{"role": "user", "content": item["question"]}])
        request = request.model_copy(update={"messages": rewrite_messages(request, rag)})
        request._rag_prompt = rag
        prompt = backend._prompt(request)
        prompt.mode, prompt.recompute_ratio = mode, ratio
        return prompt

    def run(prompt: Prompt, answer_ids: list[int]) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy output ids, and the log-distributions along the teacher-forced gold answer."""
        logits, state = runner.prefill(prompt)
        forced, current = [], logits
        forced_state_logits = logits
        # Teacher forcing on a copy of the prefilled state: feed the gold answer token by token.
        forced_state = KVState(cache=state.cache.clone(len(prompt) + len(answer_ids) + 1), length=state.length)
        for token in answer_ids:
            forced.append(torch.log_softmax(forced_state_logits.float(), -1))
            forced_state_logits = runner.decode(token, forced_state)
        output = []
        for _ in range(args.max_tokens):
            token = int(torch.argmax(current))
            if token in stop_ids:
                break
            output.append(token)
            current = runner.decode(token, state)
        return output, forced

    rows = {}
    started = time.perf_counter()
    with torch.inference_mode():
        for k in args.k:
            totals = {m: Counter() for m in modes}
            for number, item in enumerate(questions):
                slot = number % k
                answer_ids = tokenizer(" " + item["answers"][0], add_special_tokens=False)["input_ids"][:16]
                reference_ids, reference_forced = None, None
                for mode, ratio in modes:
                    output_ids, forced = run(build(item, k, slot, mode, ratio), answer_ids)
                    if mode == "full_prefill":
                        reference_ids, reference_forced = output_ids, forced
                    text = tokenizer.decode(output_ids, skip_special_tokens=True)
                    total = totals[(mode, ratio)]
                    total["n"] += 1
                    total["correct"] += any(normalise(a) in normalise(text) for a in item["answers"])
                    total["f1"] += token_f1(text, item["answers"])
                    kl = [torch.sum(p.exp() * (p - q)).item() for p, q in zip(reference_forced, forced)]
                    total["kl"] += sum(kl) / max(1, len(kl))
                    same = sum(a == b for a, b in zip(reference_ids, output_ids))
                    total["agree"] += same / max(1, max(len(reference_ids), len(output_ids)))
                if (number + 1) % 10 == 0:
                    print(f"k={k}: {number + 1}/{len(questions)} questions, {time.perf_counter() - started:.0f} s",
                          flush=True)
            rows[k] = totals
    elapsed = time.perf_counter() - started

    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    lines = [f"# Chunk-cache quality benchmark, {date.today()}", "",
             f"- command: `{command}`",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, device {loaded.device}, "
             f"torch {torch.__version__}; took {elapsed / 60:.1f} min",
             f"- model: SmolLM2-135M-Instruct (4-bit GGUF, de-quantised to float32); {len(questions)} NQ-open "
             f"questions (seed {args.seed}), gold passage at position (question number mod k) among k-1 "
             "distractors from other questions; greedy, up to "
             f"{args.max_tokens} tokens; KL over up to 16 teacher-forced gold-answer tokens", "",
             "| k | mode | r | accuracy | token F1 | KL vs full prefill | greedy agreement |",
             "|---|---|---|---|---|---|---|"]
    for k, totals in rows.items():
        for (mode, ratio), t in totals.items():
            n = t["n"]
            shown_ratio = "-" if mode in ("full_prefill", "prefix") else f"{ratio:g}"
            lines.append(f"| {k} | {mode} | {shown_ratio} | {t['correct'] / n:.3f} | {t['f1'] / n:.3f} | "
                         f"{t['kl'] / n:.4f} | {t['agree'] / n:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
