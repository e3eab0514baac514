"""Pure KGMEL logic: schemas, readers, encoders, the retriever, training, FAISS, LLM stages, metrics.

Nothing here knows about Prefect or the artifact folder layout.
"""
