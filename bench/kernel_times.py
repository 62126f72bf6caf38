"""Times of blendgate.kernels against their PyTorch references at Llama-3-8B blending shapes, on CUDA.

    python bench/kernel_times.py [--match TEXT]

Shapes: k = 8 chunks of 512 tokens after a 64-token prefix and before a 32-token question (4192 slots);
32 query heads, 8 KV heads, head_dim 128, bf16; r = 0.15 (710 computed rows after selection).
The probe's weight-bound products at 64 rows, with the model's bf16 weights and with their FP8 copy
(kernels/fp8.py; on GPUs with e4m3), and one probe layer's projections both ways (chunkcache/probe_weights.py).
Also counts torch.compile recompilations of flex_attention over varied prompt lengths (should be ~1).
"""

from __future__ import annotations

import argparse

import torch
import torch._dynamo
import triton.testing
from blendgate.engine.specache import top_k_with_one_more
from blendgate.kernels import attention, fp8, probe_attention, rope, selection, sparse_attention


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def fp8_rows(add) -> None:
    """The probe's four products of a Llama-3-8B layer at 64 rows: bf16 weights against their FP8 copy (the
    product alone, and with the rows' quantisation), the quantisers, and one layer's projections both ways."""
    from blendgate.chunkcache.probe_weights import Fp8Projections
    from blendgate.engine.llama import LlamaFamilyModel
    from transformers import AutoConfig

    hidden, inter, qkv = 4096, 14336, 6144
    x = torch.randn(64, inter, device="cuda", dtype=torch.bfloat16)
    for name, n, k in (("qkv", qkv, hidden), ("o", hidden, hidden), ("gate_up", 2 * inter, hidden),
                       ("down", hidden, inter)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        weight = fp8.quantize_weight(w)
        rows, scales = fp8.quantize_rows(x[:, :k])
        add(f"probe product {name} 64 x {k} -> {n}: bf16 weights (F.linear)",
            lambda x=x[:, :k].contiguous(), w=w: torch.nn.functional.linear(x, w))
        add(f"probe product {name}: FP8 weights (torch._scaled_mm, rows quantised already)",
            lambda r=rows, s=scales, wt=weight: fp8.fp8_product(r, s, wt, torch.bfloat16))
        add(f"probe product {name}: FP8 weights with the rows' quantisation (fp8_linear)",
            lambda x=x[:, :k].contiguous(), wt=weight: fp8.fp8_linear(x, wt))
        # Candidates for the small-M product (64 rows read far below bandwidth on the H200, 2026-12-01):
        # fast accumulation, and the operands swapped (W x^T: the weight as the tall operand, as vLLM's
        # small-batch FP8 kernels do), with and without the transpose back to [rows, N].
        add(f"probe product {name}: FP8, use_fast_accum",
            lambda r=rows, s=scales, wt=weight: torch._scaled_mm(r, wt.values.t(), scale_a=s, scale_b=wt.scale,
                                                                 out_dtype=torch.bfloat16, use_fast_accum=True))
        weight_scale, row_scale = weight.scale.t().contiguous(), scales.t().contiguous()
        add(f"probe product {name}: FP8, operands swapped (W x^T, [N, rows] out)",
            lambda r=rows, ws=weight_scale, rs=row_scale, wt=weight: torch._scaled_mm(
                wt.values, r.t(), scale_a=ws, scale_b=rs, out_dtype=torch.bfloat16))
        add(f"probe product {name}: FP8, operands swapped, transposed back to [rows, N]",
            lambda r=rows, ws=weight_scale, rs=row_scale, wt=weight: torch._scaled_mm(
                wt.values, r.t(), scale_a=ws, scale_b=rs, out_dtype=torch.bfloat16).t().contiguous())
    norm_weight = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    add("RMSNorm + row quantisation 64 x 4096 (fused)",
        lambda: fp8.rms_norm_quantize(x[:, :hidden].contiguous(), norm_weight, 1e-5))
    gate_up = torch.randn(64, 2 * inter, device="cuda", dtype=torch.bfloat16)
    add("SwiGLU + row quantisation 64 x 28672 (fused)", lambda: fp8.silu_and_mul_quantize(gate_up))
    config = AutoConfig.for_model("llama", vocab_size=1024, hidden_size=hidden, intermediate_size=inter,
                                  num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8)
    model = LlamaFamilyModel.random(config, device="cuda", dtype=torch.bfloat16)
    projections = Fp8Projections.for_model(model)
    states = torch.randn(64, hidden, device="cuda", dtype=torch.bfloat16)
    for label, pieces in (("bf16 weights", model), ("FP8 copy", projections)):
        add(f"probe layer's projections 64 rows (qkv, o, gate_up, down, norms, SwiGLU): {label}",
            lambda p=pieces: (p.project_qkv(0, states), p.finish_layer(0, states, states)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--match", default="", help="time only the rows whose name contains this text")
    args = parser.parse_args()
    torch.manual_seed(0)
    slots, heads, kv_heads, dim, layers = 4192, 32, 8, 128, 32
    rows = []

    print("| kernel | median ms |\n|---|---|", flush=True)

    def add(name: str, fn) -> None:
        if args.match not in name:
            return
        try:
            rows.append((name, ms(fn)))
            print(f"| {name} | {rows[-1][1]:.4f} |", flush=True)
        except Exception as exc:  # keep timing the others; the error is the row
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:200]} |", flush=True)
    # Masked attention: selected queries over every slot.
    chosen = torch.randperm(slots, device="cuda")[:710].sort().values
    q = torch.randn(heads, 710, dim, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(kv_heads, slots, dim, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(kv_heads, slots, dim, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(slots, device="cuda")
    flex = attention.plan_masked(chosen, positions, "flex")
    sdpa = attention.plan_masked(chosen, positions, "sdpa")
    add("masked attention 710 x 4192: flex_attention (block mask)", lambda: attention.attend(q, keys, values, flex))
    add("masked attention 710 x 4192: SDPA boolean mask", lambda: attention.attend(q, keys, values, sdpa))
    add("block mask build (per forward)", lambda: attention.position_block_mask(chosen, positions))
    for config in [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 2), (32, 64, 4, 3)]:
        ends = sparse_attention.block_ends(chosen, config[0])
        add(f"masked attention 710 x 4192: Triton sparse kernel {config}",
            lambda: sparse_attention.sparse_causal_attention(q, keys, values, chosen, ends, config))
    for config in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2), (32, 64, 4, 2)]:
        add(f"masked attention 710 x 4192: Triton grouped kernel {config}",
            lambda: probe_attention.grouped_causal_attention(q, keys, values, chosen, None, *config))
    # The probe: 32 padding/marker rows and a 32-token question at the end, every layer.
    probe_rows = torch.cat((torch.randperm(slots - 32, device="cuda")[:32].sort().values,
                            torch.arange(slots - 32, slots, device="cuda")))
    probe_q = torch.randn(heads, 64, dim, device="cuda", dtype=torch.bfloat16)
    weights = torch.ones(64, device="cuda")
    mass = torch.zeros(slots, device="cuda")
    probe_plan = attention.plan_sparse(probe_rows, slots)
    bias = selection.causal_bias(probe_rows[32:], slots, heads // kv_heads, torch.bfloat16)
    add("probe layer, 64 rows x 4192 (32 vote): sparse kernel + attention mass (before)",
        lambda: (attention.attend(probe_q, keys, values, probe_plan),
                 selection.attention_mass(probe_q[:, 32:], keys, probe_rows[32:], slots, out=mass, bias=bias)))
    add("probe layer, 64 rows x 4192 (32 vote): probe_attention (split slots, mass from the softmax statistics)",
        lambda: probe_attention.probe_attention(probe_q, keys, values, probe_rows, weights, 32, slots, mass))
    full_q = torch.randn(heads, slots, dim, device="cuda", dtype=torch.bfloat16)
    causal = attention.plan_causal(slots)
    add("causal attention 4192 x 4192: SDPA is_causal", lambda: attention.attend(full_q, keys, values, causal))
    everything = attention.plan_masked(positions, positions, "flex")
    add("causal attention 4192 x 4192: flex_attention", lambda: attention.attend(full_q, keys, values, everything))
    add("causal attention 4192 x 4192: SDPA boolean mask",
        lambda: attention.attend(full_q, keys, values, attention.plan_masked(positions, positions, "sdpa")))
    rest = attention.plan_masked(positions[576:], positions, "flex")
    add("prefix continuation 3616 x 4192: flex_attention",
        lambda: attention.attend(full_q[:, 576:], keys, values, rest))
    sparse_rest = attention.plan_sparse(positions[576:], slots)
    add("prefix continuation 3616 x 4192: Triton sparse kernel",
        lambda: attention.attend(full_q[:, 576:], keys, values, sparse_rest))
    front_padded = attention.plan_causal(slots)
    add("prefix continuation 3616 x 4192: SDPA is_causal on front-padded queries",
        lambda: attention.attend(torch.nn.functional.pad(full_q[:, 576:], (0, 0, 576, 0)), keys, values, front_padded))

    # Placing 8 chunks' KV (all layers) with keys rotated.
    chunk_keys = torch.randn(layers, kv_heads, 512, dim, device="cuda", dtype=torch.bfloat16)
    chunk_values = torch.randn_like(chunk_keys)
    cache_keys = torch.empty(layers, kv_heads, slots + 64, dim, device="cuda", dtype=torch.bfloat16)
    cache_values = torch.empty_like(cache_keys)
    angles = torch.rand(512, dim // 2, device="cuda")
    cos = torch.cat([angles.cos()] * 2, -1).to(torch.bfloat16)
    sin = torch.cat([angles.sin()] * 2, -1).to(torch.bfloat16)

    def place(fn):
        return lambda: [fn(chunk_keys, chunk_values, cache_keys, cache_values, 64 + 512 * i, cos, sin)
                        for i in range(8)]

    moved = 8 * 4 * chunk_keys.numel() * 2  # read K and V, write K and V, bf16
    add(f"place 8 chunks x 32 layers ({moved / 2**30:.2f} GiB moved): Triton fused", place(rope.place))
    add("place 8 chunks x 32 layers: PyTorch reference", place(rope.place_reference))
    table_angles = torch.rand(slots + 64, dim // 2, device="cuda")
    table_cos = torch.cat([table_angles.cos()] * 2, -1).to(torch.bfloat16)
    table_sin = torch.cat([table_angles.sin()] * 2, -1).to(torch.bfloat16)
    separate = [(torch.randn_like(chunk_keys), torch.randn_like(chunk_values), 64 + 512 * i) for i in range(8)]
    add("place 8 chunks x 32 layers, one chunk a launch (8 separate chunk-caches)",
        lambda: [rope.place(k, v, cache_keys, cache_values, s, table_cos[s:s + 512], table_sin[s:s + 512])
                 for k, v, s in separate])
    add("place 8 chunks x 32 layers, one launch for all (place_many)",
        lambda: rope.place_many(separate, cache_keys, cache_values, table_cos, table_sin))
    copy = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    add("device-to-device copy of the same bytes (the floor)", lambda: copy.clone())

    fresh = torch.randn(kv_heads, slots, dim, device="cuda", dtype=torch.bfloat16)
    cached = torch.randn_like(fresh)
    add("deviation score: Triton fused", lambda: selection.deviation(fresh, cached))
    add("deviation score: PyTorch reference", lambda: selection.deviation_reference(fresh, cached))
    score = torch.rand(4096, device="cuda")
    add("top 614 of 4096 scores (top-k + sort)", lambda: torch.topk(score, 614, sorted=False).indices.sort())
    # SpeCache's steady step, per layer and request at 32k tokens (1/16 budget, Llama-3-8B's 8 KV heads): this
    # step's top-k and the next step's prediction, as two top-ks and as one grown by the new position.
    lowbit_scores = torch.randn(kv_heads, 32768, device="cuda")
    add("specache top-k 1916 of 8 x 32768, twice (this step's and the next's)",
        lambda: (lowbit_scores[:, :30000].topk(1916, dim=1), lowbit_scores[:, :30001].topk(1916, dim=1)))

    def top_k_once() -> None:
        top = lowbit_scores[:, :30000].topk(1916, dim=1)
        top_k_with_one_more(top.values, top.indices, lowbit_scores, 30000)
    add("specache top-k 1916 of 8 x 32768, once and grown by one position (engine/specache.py)", top_k_once)
    question = torch.randn(heads, 32, dim, device="cuda", dtype=torch.bfloat16)
    query_positions = torch.arange(slots - 32, slots, device="cuda")
    add("attention mass of a 32-token question over 4192 slots (one layer): bmm + softmax",
        lambda: selection.attention_mass(question, fresh, query_positions, slots))
    add("attention mass, float64 reference",
        lambda: selection.attention_mass_reference(question, fresh, query_positions, slots))

    if fp8.hardware_fp8(torch.device("cuda"), torch.bfloat16):
        fp8_rows(add)

    # Recompilations of flex_attention across prompt lengths.
    torch._dynamo.utils.counters.clear()
    for count, length in [(300, 2000), (517, 3001), (711, 4192), (64, 777), (1000, 8000)]:
        pos = torch.arange(length, device="cuda")
        sel = torch.randperm(length, device="cuda")[:count].sort().values
        attention.attend(torch.randn(heads, count, dim, device="cuda", dtype=torch.bfloat16),
                         torch.randn(kv_heads, length, dim, device="cuda", dtype=torch.bfloat16),
                         torch.randn(kv_heads, length, dim, device="cuda", dtype=torch.bfloat16),
                         attention.plan_masked(sel, pos, "flex"))
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"\nflex_attention graphs compiled over 5 new prompt lengths (after the runs above): {compiles}")


if __name__ == "__main__":
    main()
