"""The retriever's defaults, defined once: the code's keyword defaults and the gateway's settings
(gateway/config.py: RetrievalSettings) both take them from here, and a test checks README.md's figures
against the settings."""

# Chunk size and overlap in tokens of the served model's tokenizer; why these, in README.md ("Chunking").
CHUNK_TOKENS = 256
OVERLAP_TOKENS = 32
# Collections with more chunks than this use an IVF index instead of exact search.
APPROXIMATE_THRESHOLD = 20_000
# Lists an IVF search visits. On 100k chunks (1,264 lists) recall@10 was 0.814 at 32, 0.865 at 128 and 0.887 at
# 256 against 0.895 for exact search, at 0.35, 1.0 and 2.0 ms a query, where embedding the query takes ~14 ms
# (bench/ivf_nprobe.py, bench/results/retrieval-2026-11-23.md).
NPROBE = 256
# Chunks a retrieval returns when a request or a RAG-enabled model leaves top_k out.
TOP_K = 4
# Files larger than this are skipped.
MAX_FILE_BYTES = 50 * 1024 * 1024
