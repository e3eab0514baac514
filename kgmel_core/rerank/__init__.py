"""Stage 3, reranking: the candidates' triples filtered against the mention, the adaptive gate, and
the methods that pick among the retriever's top-K (the LLM; a learned reranker)."""
