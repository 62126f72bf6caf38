"""Matrix-product time against row count for Llama-3-8B's layer shapes (CUDA): why blending aligns the rows
it recomputes to 128-row GEMM tiles (chunkcache/blend.py, GPU_ROW_ALIGNMENT).

    python bench/gemm_rows.py
"""

import torch

# (in, out) of a layer's products, q/k/v and gate/up stacked as our model runs them.
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
ROWS = (512, 576, 600, 614, 630, 640, 646, 660, 700, 704, 768, 4192)


def timed_us(fn, runs: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / runs * 1000


def main() -> None:
    weights = {name: torch.randn(out, inp, device="cuda", dtype=torch.bfloat16)
               for name, (inp, out) in SHAPES.items()}
    print("| rows | " + " | ".join(SHAPES) + " | total us | us per row |")
    print("|---" * (len(SHAPES) + 3) + "|")
    for rows in ROWS:
        cells = []
        for name, (inp, _) in SHAPES.items():
            x = torch.randn(rows, inp, device="cuda", dtype=torch.bfloat16)
            cells.append(timed_us(lambda: torch.nn.functional.linear(x, weights[name])))  # noqa: B023
        total = sum(cells)
        print(f"| {rows} | " + " | ".join(f"{c:.0f}" for c in cells) + f" | {total:.0f} | {total / rows:.3f} |")


if __name__ == "__main__":
    main()
