"""Hard limits on request and config sizes, in one place: the config parser, the model config and serving read them.

They bound the memory a single call can ask for (FAISS allocates queries x k, the head scores every
candidate column), so a typo such as `k=10**7` is an error rather than an out-of-memory kill.
"""

MAX_K = 10_000
"""The default cap on `k` in `Recommender.recommend*` (per recommender: `Recommender(..., max_k=N)`)."""

MAX_NUM_CANDIDATES = 10_000
"""The most FAISS candidates the reranking head may score per user (`retrieval.num_candidates`): the head
scores a (users x candidates) batch in one call, and 10,000 is 100x the default, far past where reranking
still changes the top of a list."""
