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
from dataclasses import dataclass
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


# The gateway's default (gateway/config.py), repeated so that this script needs no gateway settings.
DEFAULT_SYSTEM_PROMPT = "Answer the question using only the documents given."


@dataclass
class Passage:
    id: str
    text: str


def load_questions(path: Path, count: int, seed: int) -> list[dict]:
    with gzip.open(path, "rt") as lines:
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
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the converted model is kept")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file or model folder [embedded SmolLM2]")
    parser.add_argument("--shard", type=str, default="0/1", help="i/n: run every n-th question from the i-th")
    parser.add_argument("--data", type=Path, default=DATA, help="NQ-open oracle file")
    parser.add_argument("--chunk-prefix", choices=["system", "none"], default="system",
                        help="compute chunk KV after the system prompt, or alone")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"quality-{date.today()}.md")
    args = parser.parse_args()

    # Only modules without web or retrieval dependencies, so that this runs as it is on a bare GPU machine.
    from blendgate.chunkcache.runner import BlendingRunner
    from blendgate.chunkcache.store import ChunkCacheStore, MemoryTier
    from blendgate.engine.prompt import Prompt
    from blendgate.engine.runner import KVState
    from blendgate.engine.weights import load_model
    from blendgate.gateway.rag_template import RagPrompt, encode_prompt, rag_messages

    torch.manual_seed(0)
    cache_dir = args.cache_dir or Path(os.environ.get("BLENDGATE_CACHE_DIR", Path.home() / ".cache" / "blendgate"))
    loaded = load_model(args.model, dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu",
                        cache_dir=cache_dir)
    runner = BlendingRunner(loaded, ChunkCacheStore([MemoryTier("memory", 8 << 30, loaded.device)]),
                            chunk_prefix=args.chunk_prefix)
    tokenizer = loaded.tokenizer
    stop_ids = loaded.eos_token_ids
    modes = [("full_prefill", 1.0), ("prefix", 1.0), *[("reuse" if r == 0 else "blend", r) for r in args.ratios]]
    questions = load_questions(args.data, args.questions, args.seed)

    def build(item: dict, k: int, slot: int, mode: str, ratio: float) -> Prompt:
        """The prompt the gateway would build for this question and these passages."""
        passages = item["others"][: k - 1]
        passages.insert(slot, item["gold"])
        rag = RagPrompt(DEFAULT_SYSTEM_PROMPT, [Passage(str(i), text) for i, text in enumerate(passages)],
                        item["question"])
        return encode_prompt(tokenizer, rag_messages([], rag), rag, mode=mode, recompute_ratio=ratio)

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

    shard, shards = (int(x) for x in args.shard.split("/"))
    totals: dict[str, Counter] = {}
    started = time.perf_counter()
    partial = args.out.with_suffix(f".shard{shard}.json" if shards > 1 else ".json")

    def save() -> dict:
        """Written after every question, so a run stopped early still leaves what it measured."""
        result = {"command": "python bench/quality.py " + " ".join(sys.argv[1:]),
                  "seconds": time.perf_counter() - started,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, device {loaded.device} "
                             f"({torch.cuda.get_device_name() if loaded.device.type == 'cuda' else 'cpu'}), "
                             f"torch {torch.__version__}",
                  "questions": len(questions), "seed": args.seed, "max_tokens": args.max_tokens,
                  "chunk_prefix": args.chunk_prefix, "totals": totals}
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(result))
        return result

    with torch.inference_mode():
        for k in args.k:
            # Every shard places the gold passage by the question's number in the whole list.
            for number in range(shard, len(questions), shards):
                item = questions[number]
                answer_ids = tokenizer(" " + item["answers"][0], add_special_tokens=False)["input_ids"][:16]
                reference_ids, reference_forced = None, None
                for mode, ratio in modes:
                    output_ids, forced = run(build(item, k, number % k, mode, ratio), answer_ids)
                    if mode == "full_prefill":
                        reference_ids, reference_forced = output_ids, forced
                    text = tokenizer.decode(output_ids, skip_special_tokens=True)
                    total = totals.setdefault(f"{k}|{mode}|{ratio:g}", Counter())
                    total["n"] += 1
                    total["correct"] += any(normalise(a) in normalise(text) for a in item["answers"])
                    total["f1"] += token_f1(text, item["answers"])
                    kl = [torch.sum(p.exp() * (p - q)).item() for p, q in zip(reference_forced, forced)]
                    total["kl"] += sum(kl) / max(1, len(kl))
                    same = sum(a == b for a, b in zip(reference_ids, output_ids))
                    total["agree"] += same / max(1, max(len(reference_ids), len(output_ids)))
                save()
                done = totals[f"{k}|full_prefill|1"]["n"]
                if done % 10 == 0:
                    print(f"k={k}: {done} questions, {time.perf_counter() - started:.0f} s", flush=True)
    result = save()
    if shards == 1:
        write_table([result], args.out)


def write_table(results: list[dict], out: Path) -> None:
    """The markdown table of one run, or of the shards of one run added up."""
    totals: dict[str, Counter] = {}
    for result in results:
        for key, counts in result["totals"].items():
            totals.setdefault(key, Counter()).update(counts)
    first = results[0]
    lines = [f"# Chunk-cache quality benchmark, {date.today()}", "",
             f"- command: `{first['command']}`" + (f" ({len(results)} shards run at once)" if len(results) > 1 else ""),
             f"- machine: {first['machine']}; took {max(r['seconds'] for r in results) / 60:.1f} min",
             f"- model: SmolLM2-135M-Instruct (4-bit GGUF, de-quantised to float32); the first {first['questions']} "
             f"NQ-open questions in a seeded order (seed {first['seed']}; the questions column says how many ran), "
             "gold passage at position (question number mod k) among k-1 "
             f"distractors from other questions; greedy, up to {first['max_tokens']} tokens; KL over up to 16 "
             f"teacher-forced gold-answer tokens; chunk KV computed after: {first.get('chunk_prefix', 'system')}", "",
             "| k | mode | r | questions | accuracy | token F1 | KL vs full prefill | greedy agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for key, t in totals.items():
        k, mode, ratio = key.split("|")
        n = t["n"]
        shown_ratio = "-" if mode in ("full_prefill", "prefix") else ratio
        lines.append(f"| {k} | {mode} | {shown_ratio} | {n} | {t['correct'] / n:.3f} | {t['f1'] / n:.3f} | "
                     f"{t['kl'] / n:.4f} | {t['agree'] / n:.3f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:2] == ["merge"]:  # python bench/quality.py merge OUT.md SHARD.json...
        write_table([json.loads(Path(p).read_text()) for p in sys.argv[3:]], Path(sys.argv[2]))
    else:
        main()
