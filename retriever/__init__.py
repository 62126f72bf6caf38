"""blendgate's retrieval: loading files, token-aware chunking, embeddings, FAISS indexes and collections."""
