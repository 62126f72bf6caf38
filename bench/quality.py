"""Quality of the chunk-cache modes and blending's selection rules against full prefill, SmolLM2-135M-Instruct.

Question sets (`--set`):
- nq: NQ-open questions, each with its gold passage at a varying position among k-1 distractor passages of
  other questions (every passage one chunk);
- xquad: XQuAD questions with their gold paragraph among the other paragraphs of the same article (topically
  close distractors; k = the article's paragraphs, 5), in the article's order;
- xquad-shuffled: the same questions and paragraphs, each prompt's paragraphs in a seeded random order (so a
  paragraph's predecessor in the prompt is mostly not its predecessor in the article: the check that the
  `doc` chunk prefix gains from the document, not from the benchmark's article order).
Each prompt is built by the gateway's own RAG template and segmentation. For each variant:
- accuracy: a gold answer appears in the normalised greedy output, with a 95% bootstrap interval;
- token F1 against the best gold answer;
- KL(full prefill || variant), averaged over the next-token distributions along the teacher-forced gold answer;
- gap closed: the share of full reuse's accuracy loss (and KL) that the variant wins back, with a paired
  bootstrap interval over questions;
- recomputed: the mean share of chunk tokens recomputed; compute: the mean share of (chunk token, layer) pairs
  computed (chunkcache/selection.py: compute_share), which counts the layers a deviation rule runs in full.

Variants (`--variants`): `full_prefill`, `prefix`, `reuse`, and `RULE@R` (blend with selection rule RULE at
recompute ratio R; see RULES), or `target=F@R` (the quality-targeted mode: fidelity F, at most R), each with
`/PREFIX` for what chunk KV is computed after (see --chunk-prefix; `doc`: each paragraph after the previous
paragraph of its own article, PromptSegment.context; on nq, whose passages have no neighbours, `doc` is `auto`;
`doc-other`, the control: after the paragraph at that place in the next article instead, real text on another
subject).
A `reuse` or
blend variant ending in `+CODEC:LEVEL` (e.g. `default@0.15/auto+cachegen:1`) blends from chunk KV sent through
that chunk-cache codec (chunkcache/codec/: encoded, then decoded), as a tier storing it would give it back: by
`Codec.round_trip`, which gives the decoded values bit for bit without building the entry (with the chunk's
channel weights, ChunkKV.weights, as a tier encoding a freshly computed chunk has them; the cachegen codec
quantises and dequantises, skipping its entropy coding, which is lossless and was most of a codec row's time:
tests/unit/chunkcache/test_codec.py proves the values identical to decode(encode(...)) for every level).

    python bench/quality.py --set nq --k 10 20 --questions 300
    python bench/quality.py --set xquad --questions 300
    python bench/quality.py --k 5 10 --variants full_prefill default@0.15/auto default@0.15/auto+cachegen:1
    python bench/quality.py --set xquad-shuffled --variants full_prefill reuse default@0.15/auto default@0.15/doc
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
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# The question sets' folder: ../shared/data/qa beside the checkout, or BLENDGATE_QA_DATA (the GPU machine).
DATA = Path(os.environ.get("BLENDGATE_QA_DATA", REPO.parent / "shared" / "data" / "qa"))

# Selection rules by name (fields of chunkcache.selection.SelectionRule), for `RULE@R` variants.
RULES: dict[str, dict] = {
    "value": {"score": "value"},  # CacheBlend as the paper and blendgate did until 2026-11-30
    "key": {"score": "key"},
    "kv": {"score": "kv"},
    "value-l2": {"score": "value", "layer": 2},
    "value-gradual": {"score": "value", "gradual": 2.0},
    "value-sinks": {"score": "value", "sink_tokens": 4},
    # DEFAULT_RULE: since 2026-11-30; its probe every 4th layer since 2026-12-01 (default-s1: every layer).
    "default": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.5, "probe_stride": 4},
    "default-s1": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.5},
    # The default's probe on the FP8 copy of the weights (emulated on a float32 model: the rounding of the GPU's
    # FP8 products; "auto" picks it on FP8 GPUs for half-precision models) and on the model's own weights.
    "default-fp8": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.5, "probe_weights": "fp8"},
    "default-bf16": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.5, "probe_weights": "model"},
    "default-p8": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.5, "probe_layers": 8},
    "default-p16": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.5, "probe_layers": 16},
    # The drift measured without the sinks (xs), per parts of each chunk (bN), at other strengths (sNN).
    "default-xs": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.5, "drift_sinks": False},
    "default-xs-b4": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.5, "drift_sinks": False,
                      "drift_bins": 4},
    "default-xs-s75": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.75, "drift_sinks": False},
    "default-xs-b4-s75": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.75, "drift_sinks": False,
                          "drift_bins": 4},
    "default-s2": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.5, "probe_stride": 2},
    "default-s3": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.5, "probe_stride": 3},
    "default-s4": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.5, "probe_stride": 4},
    "default-b4": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.5, "drift_bins": 4},
    "default-xs-b4-p16": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.5, "drift_sinks": False,
                          "drift_bins": 4, "probe_layers": 16},
    "default-xs-p16": {"score": "attention", "sink_tokens": 4, "drift_shift": 0.5, "drift_sinks": False,
                       "probe_layers": 16},
    "attention": {"score": "attention"},
    "attention-p8": {"score": "attention", "probe_layers": 8},
    "attention-p4": {"score": "attention", "probe_layers": 4},
    "attention-sinks": {"score": "attention", "sink_tokens": 4},
    "attention-value": {"score": "attention_value"},
    "attention-key": {"score": "attention_key"},
    "attention-uniform": {"score": "attention", "chunk_budget": "uniform"},
    "attention-shift": {"score": "attention", "drift_shift": 1.0},
    "attention-shift-half": {"score": "attention", "drift_shift": 0.5},
    "attention-shift-0.75": {"score": "attention", "drift_shift": 0.75},
    "attention-shift-half-sinks": {"score": "attention", "drift_shift": 0.5, "sink_tokens": 4},
    "attention-span1": {"score": "attention", "neighbours": 1},
    "attention-span2": {"score": "attention", "neighbours": 2},
    "attention-p16": {"score": "attention", "probe_layers": 16},
}
DEFAULT_VARIANTS = ["full_prefill", "reuse", "value@0.15", "default@0.15/auto", "target=0.9@0.5/auto"]


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
    previous: str | None = None  # the text before it in its document (not used here)


@dataclass
class Item:
    """One question and its passages (the gold one among the others), with each passage's predecessor in its
    own document ("" when it is the document's first or the set knows none)."""

    question: str
    answers: list[str]
    passages: list[str]
    previous: list[str] = field(default_factory=list)
    # The control's stand-in for `previous`: the paragraph at the same place in another document ("" likewise).
    elsewhere: list[str] = field(default_factory=list)


def nq_items(path: Path, count: int, seed: int, k: int) -> list[Item]:
    with gzip.open(path, "rt") as lines:
        rows = [json.loads(line) for line in lines]
    passages = [f"{r['ctxs'][0]['title']}. {r['ctxs'][0]['text']}" for r in rows]
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    items = []
    for number, i in enumerate(order[:count]):
        others = [passages[j] for j in order if passages[j] != passages[i]][: k - 1]
        others.insert(number % k, passages[i])  # the gold passage by the question's number in the whole list
        items.append(Item(rows[i]["question"], rows[i]["answers"], others))
    return items


def xquad_items(path: Path, count: int, seed: int) -> list[Item]:
    """XQuAD questions, each with every paragraph of its article in the article's order (so the gold one sits
    where the article has it and the distractors are on the same subject)."""
    articles = json.loads(path.read_text())["data"]
    items = []
    for number, article in enumerate(articles):
        contexts = [p["context"] for p in article["paragraphs"]]
        previous = ["", *contexts[:-1]]
        following = [p["context"] for p in articles[(number + 1) % len(articles)]["paragraphs"]]
        elsewhere = ["" if not before else following[(i - 1) % len(following)] for i, before in enumerate(previous)]
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                items.append(Item(qa["question"], [a["text"] for a in qa["answers"]], contexts, previous, elsewhere))
    random.Random(seed).shuffle(items)
    return items[:count]


def shuffled_items(items: list[Item], seed: int) -> list[Item]:
    """The same questions, each prompt's passages (with their predecessors) in a seeded random order."""
    rng = random.Random(f"shuffled-{seed}")
    shuffled = []
    for item in items:
        order = list(range(len(item.passages)))
        rng.shuffle(order)
        shuffled.append(Item(item.question, item.answers, [item.passages[i] for i in order],
                             [item.previous[i] for i in order], [item.elsewhere[i] for i in order]))
    return shuffled


def gateway_prompt(tokenizer, item: Item, mode: str, ratio: float, target: float | None, context: int,
                   previous: list[str] | None = None):
    """The prompt (engine.prompt.Prompt) the gateway would build for this question and these passages: its RAG
    template and segmentation, chunk KV computed after `context` neutral documents, or with `previous` (per
    passage: the text before it, "" for none) each passage after its text (rag_template.document_context_ids)."""
    from blendgate.gateway.rag_template import RagPrompt, document_context_ids, encode_prompt, rag_messages

    rag = RagPrompt(DEFAULT_SYSTEM_PROMPT, [Passage(str(i), text) for i, text in enumerate(item.passages)],
                    item.question)
    contexts = [document_context_ids(tokenizer, before) if before else () for before in previous] \
        if previous else None
    return encode_prompt(tokenizer, rag_messages([], rag), rag, mode=mode, recompute_ratio=ratio,
                         fidelity_target=target, context_documents=context, chunk_contexts=contexts)


def parse_variant(spec: str):
    """(mode, ratio, rule or None, fidelity target or None) of a variant name."""
    from blendgate.chunkcache.selection import DEFAULT_RULE, SelectionRule

    spec, _, codec = spec.partition("+")  # +CODEC:LEVEL: round_trip_blender's
    spec = spec.split("/")[0]  # RULE@R/PREFIX: the chunk prefix is the runner's
    if spec in ("full_prefill", "prefix"):
        if codec:
            raise SystemExit(f"variant {spec}+{codec}: a codec applies to chunk KV (reuse or blend variants)")
        return spec, 1.0, None, None
    if spec == "reuse":
        return "reuse", 0.0, None, None
    name, _, ratio = spec.partition("@")
    if not ratio:
        raise SystemExit(f"variant {spec!r}: write RULE@RATIO or target=F@RATIO")
    if name.startswith("target="):  # the default rule
        return "blend", float(ratio), DEFAULT_RULE, float(name.split("=", 1)[1])
    if name.startswith("target-"):  # target-RULE=F@R
        rule_name, _, target = name[len("target-"):].partition("=")
        return "blend", float(ratio), SelectionRule(**RULES[rule_name]), float(target)
    if name not in RULES:
        raise SystemExit(f"unknown rule {name!r}; known: {', '.join(RULES)}")
    return "blend", float(ratio), SelectionRule(**RULES[name]), None


def round_trip_blender(model, store, chunk_prefix: str, codec_spec: str):
    """A ChunkBlender whose chunk KV (and chunk prefix KV) goes through the chunk-cache codec `NAME:LEVEL`
    (Codec.round_trip: the values encoding then decoding gives) before blending: what a tier storing that codec
    gives back. Decoded entries are kept
    (the same passages recur across questions, far apart in a shard's order: with 64 kept, the H200 run of
    2026-12-01 re-encoded nearly every passage of every question on the host and finished 23 questions in
    400 s; 1024 hold every passage of a 300-question NQ set, about 6 GB of SmolLM2 KV in float32)."""
    from blendgate.chunkcache.codec import Codec
    from blendgate.chunkcache.runner import ChunkBlender
    from cachetools import LRUCache

    name, _, level = codec_spec.partition(":")
    codec = Codec(name, int(level or 0))
    decoded = LRUCache(1024)

    class RoundTripBlender(ChunkBlender):
        def chunk_kvs(self, wanted):  # every chunk's KV (and the chunk prefix's: chunk_kv) comes through here
            found = []
            for chunk, (kv, hit) in zip(wanted, super().chunk_kvs(wanted)):
                if chunk.key not in decoded:
                    decoded[chunk.key] = codec.round_trip(kv, kv.keys.device)
                found.append((decoded[chunk.key], hit))
            return found

    return RoundTripBlender(model, store, chunk_prefix, channel_weights=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=["nq", "xquad", "xquad-shuffled"], default="nq", dest="question_set")
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--k", type=int, nargs="+", default=[10], help="passages per prompt (nq only)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the model's precision: bfloat16 runs the GPU's fast paths (probe graphs, Triton "
                             "attention) as the gateway does on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the converted model is kept")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file or model folder [embedded SmolLM2]")
    parser.add_argument("--shard", type=str, default="0/1", help="i/n: run every n-th question from the i-th")
    parser.add_argument("--data", type=Path, default=None, help="the set's file [../shared/data/qa/...]")
    parser.add_argument("--chunk-prefix", default="system",
                        help="what chunk KV is computed after: system, none, contextN (the system prompt and N "
                             "neutral documents, gateway/rag_template.py), auto (as many as the gateway picks "
                             "for the prompt's k) or doc (each passage after its predecessor in its own document, "
                             "a document's first as auto); a variant RULE@R/PREFIX overrides it")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"quality-{date.today()}.md")
    args = parser.parse_args()
    variants = [(spec, *parse_variant(spec)) for spec in args.variants]
    if variants[0][0] != "full_prefill":
        raise SystemExit("the first variant must be full_prefill (the reference)")

    # Only modules without web or retrieval dependencies, so that this runs as it is on a bare GPU machine.
    from blendgate.chunkcache.kv_store import ChunkCacheStore
    from blendgate.chunkcache.runner import BlendingRunner
    from blendgate.chunkcache.tiers import MemoryTier
    from blendgate.engine.prefill_report import PrefillReport
    from blendgate.engine.prompt import DEFAULT_CONTEXT_DOCUMENTS, Prompt
    from blendgate.engine.runner import KVState
    from blendgate.engine.weights import load_model
    from blendgate.gateway.rag_template import context_documents_for

    torch.manual_seed(0)
    cache_dir = args.cache_dir or Path(os.environ.get("BLENDGATE_CACHE_DIR", Path.home() / ".cache" / "blendgate"))
    loaded = load_model(args.model, dtype=args.dtype, device="cuda" if torch.cuda.is_available() else "cpu",
                        cache_dir=cache_dir)
    tokenizer = loaded.tokenizer
    store = ChunkCacheStore([MemoryTier("memory", 8 << 30, loaded.device)])

    # Chunks computed by any runner carry their channel weights: the codec rows' blenders read them from the store.
    runners = {prefix: BlendingRunner(loaded, store, chunk_prefix=prefix, channel_weights=True)
               for prefix in ("system", "none")}
    # Blenders of `+CODEC:LEVEL` variants, by (chunk prefix, codec), over the same store.
    blenders = {(prefix, spec.partition("+")[2]): round_trip_blender(runners[prefix].model, store, prefix,
                                                                     spec.partition("+")[2])
                for prefix in runners for spec, *_ in variants if "+" in spec}
    runner = runners["system"]  # decoding and teacher forcing: any runner
    stop_ids = loaded.eos_token_ids
    if args.question_set == "nq":
        path = args.data or DATA / "nq-open-oracle.dev.jsonl.gz"
        sets = {k: nq_items(path, args.questions, args.seed, k) for k in args.k}
    else:
        items = xquad_items(args.data or DATA / "xquad.en.json", args.questions, args.seed)
        if args.question_set == "xquad-shuffled":
            items = shuffled_items(items, args.seed)
        sets = {len(items[0].passages): items}

    def run(prompt: Prompt, rule, answer_ids: list[int], prefix: str, codec: str
            ) -> tuple[list[int], list[torch.Tensor], PrefillReport]:
        """Greedy output ids, the log-distributions along the teacher-forced gold answer, the prefill report."""
        if rule is not None or codec:
            blender = blenders[prefix, codec] if codec else runners[prefix].blender
            result, report = blender.blend(prompt, rule=rule)
            logits, state = result.logits, KVState(cache=result.cache, length=len(prompt))
        else:
            logits, state = runners[prefix].prefill(prompt)
            report = state.report or PrefillReport()
        # Teacher forcing in one pass over a copy of the prefilled KV: the gold answer's tokens appended.
        forced_cache = state.cache.clone(len(prompt) + len(answer_ids) + 1)
        forced_logits = runner.model.forward(torch.tensor(answer_ids[:-1], device=loaded.device), None,
                                             forced_cache, last_only=False) if len(answer_ids) > 1 else logits[:0]
        forced = torch.log_softmax(torch.cat((logits[None].float(), forced_logits.float())), -1)
        output, current = [], logits
        for _ in range(args.max_tokens):
            token = int(torch.argmax(current))
            if token in stop_ids:
                break
            output.append(token)
            current = runner.decode(token, state)
        return output, forced, report

    shard, shards = (int(x) for x in args.shard.split("/"))
    records: dict[str, list] = {}  # "k|variant" -> per question [number, correct, f1, kl, agree, ratio, compute]
    started = time.perf_counter()
    partial = args.out.with_suffix(f".shard{shard}.json" if shards > 1 else ".json")

    def save() -> dict:
        """Written after every question, so a run stopped early still leaves what it measured."""
        result = {"command": "python bench/quality.py " + " ".join(sys.argv[1:]),
                  "seconds": time.perf_counter() - started, "set": args.question_set,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, device {loaded.device} "
                             f"({torch.cuda.get_device_name() if loaded.device.type == 'cuda' else 'cpu'}), "
                             f"torch {torch.__version__}",
                  "questions": args.questions, "seed": args.seed, "dtype": args.dtype, "max_tokens": args.max_tokens,
                  "chunk_prefix": args.chunk_prefix, "records": records}
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(result))
        return result

    with torch.inference_mode():
        for k, items in sets.items():
            for number in range(shard, len(items), shards):
                item = items[number]
                answer_ids = tokenizer(" " + item.answers[0], add_special_tokens=False)["input_ids"][:16]
                reference_ids, reference_forced = None, None
                for spec, mode, ratio, rule, target in variants:
                    base, _, codec = spec.partition("+")
                    prefix = base.split("/")[1] if "/" in base else args.chunk_prefix
                    documents = int(prefix[len("context"):] or 1) if prefix.startswith("context") else 0
                    if prefix in ("auto", "doc", "doc-other"):  # as the gateway does: context_documents_for(k, 5)
                        documents = context_documents_for(len(item.passages), DEFAULT_CONTEXT_DOCUMENTS)
                    previous = {"doc": item.previous, "doc-other": item.elsewhere}.get(prefix)
                    prompt = gateway_prompt(tokenizer, item, mode, ratio, target, documents, previous)
                    output_ids, forced, report = run(prompt, rule, answer_ids,
                                                     "none" if prefix == "none" else "system", codec)
                    if mode == "full_prefill":
                        reference_ids, reference_forced = output_ids, forced
                    text = tokenizer.decode(output_ids, skip_special_tokens=True)
                    kl = torch.sum(reference_forced.exp() * (reference_forced - forced), -1).mean().item()
                    same = sum(a == b for a, b in zip(reference_ids, output_ids))
                    recomputed = report.recompute_ratio if report.recompute_ratio is not None else \
                        1.0 if mode in ("full_prefill", "prefix") else 0.0
                    compute = report.compute_share if report.compute_share is not None else recomputed
                    records.setdefault(f"{k}|{spec}", []).append(
                        [number, any(normalise(a) in normalise(text) for a in item.answers),
                         token_f1(text, item.answers), kl,
                         same / max(1, max(len(reference_ids), len(output_ids))), recomputed, compute])
                save()
                done = len(records[f"{k}|{variants[0][0]}"])
                if done % 10 == 0:
                    print(f"k={k}: {done} questions, {time.perf_counter() - started:.0f} s", flush=True)
    result = save()
    if shards == 1:
        write_table([result], args.out)


def bootstrap(values: dict[str, list[list]], statistic, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of statistic(rows by variant) over questions resampled with replacement (the
    same questions for every variant: paired)."""
    rng = random.Random(seed)
    numbers = sorted({row[0] for rows in values.values() for row in rows})
    by_number = {name: {row[0]: row for row in rows} for name, rows in values.items()}
    stats = []
    for _ in range(draws):
        sample = [rng.choice(numbers) for _ in numbers]
        stats.append(statistic({name: [rows[n] for n in sample if n in rows] for name, rows in by_number.items()}))
    stats = sorted(x for x in stats if x == x)  # a resample where full prefill and reuse tie has no gap (NaN)
    if not stats:
        return float("nan"), float("nan")
    return stats[int(0.025 * len(stats))], stats[int(0.975 * len(stats)) - 1]


def mean(rows: list[list], column: int) -> float:
    return sum(float(r[column]) for r in rows) / max(1, len(rows))


def gap_closed(rows: dict[str, list[list]], name: str, column: int) -> float:
    """Share of full reuse's loss (accuracy: full - reuse; KL: reuse's KL) that `name` wins back."""
    if column == 3:  # KL: full prefill's is 0
        loss = mean(rows["reuse"], 3)
        return (loss - mean(rows[name], 3)) / loss if loss else float("nan")
    loss = mean(rows["full_prefill"], column) - mean(rows["reuse"], column)
    return (mean(rows[name], column) - mean(rows["reuse"], column)) / loss if loss else float("nan")


def write_table(results: list[dict], out: Path) -> None:
    """The markdown table of one run, or of the shards of one run added up."""
    records: dict[str, list] = {}
    for result in results:
        for key, rows in result["records"].items():
            records.setdefault(key, []).extend(rows)
    first = results[0]
    lines = [f"# Chunk-cache quality benchmark ({first.get('set', 'nq')}), {date.today()}", "",
             f"- command: `{first['command']}`" + (f" ({len(results)} shards run at once)" if len(results) > 1 else ""),
             f"- machine: {first['machine']}; took {max(r['seconds'] for r in results) / 60:.1f} min",
             f"- model: SmolLM2-135M-Instruct (4-bit GGUF, de-quantised to {first.get('dtype', 'float32')}); "
             f"{first['questions']} questions "
             f"(seed {first['seed']}); greedy, up to {first['max_tokens']} tokens; KL over up to 16 teacher-forced "
             f"gold-answer tokens; chunk KV computed after: {first.get('chunk_prefix', 'system')}; intervals: 95% "
             "bootstrap over questions (gap closed: paired)", "",
             "| k | variant | questions | recomputed | compute | accuracy [95% CI] | token F1 | KL vs full [95% CI] "
             "| acc. gap closed [95% CI] | KL gap closed [95% CI] | agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted({key.split("|")[0] for key in records}, key=int):
        rows = {key.split("|", 1)[1]: value for key, value in records.items() if key.split("|")[0] == k}
        for name, values in rows.items():
            acc_ci = bootstrap({name: values}, lambda r, n=name: mean(r[n], 1))
            kl_ci = bootstrap({name: values}, lambda r, n=name: mean(r[n], 3))
            closed = ["-", "-"]
            if "reuse" in rows and name not in ("full_prefill", "prefix", "reuse"):
                pair = {"full_prefill": rows["full_prefill"], "reuse": rows["reuse"], name: values}
                for i, column in enumerate((1, 3)):
                    low, high = bootstrap(pair, lambda r, n=name, c=column: gap_closed(r, n, c))
                    closed[i] = f"{gap_closed(pair, name, column):.0%} [{low:.0%}, {high:.0%}]"
            lines.append(f"| {k} | {name} | {len(values)} | {mean(values, 5):.3f} | {mean(values, 6):.3f} | "
                         f"{mean(values, 1):.3f} [{acc_ci[0]:.3f}, {acc_ci[1]:.3f}] | {mean(values, 2):.3f} | "
                         f"{mean(values, 3):.4f} [{kl_ci[0]:.4f}, {kl_ci[1]:.4f}] | {closed[0]} | {closed[1]} | "
                         f"{mean(values, 4):.3f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:2] == ["merge"]:  # python bench/quality.py merge OUT.md SHARD.json...
        write_table([json.loads(Path(p).read_text()) for p in sys.argv[3:]], Path(sys.argv[2]))
    else:
        main()
