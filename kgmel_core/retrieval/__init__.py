"""Stage 2, candidate retrieval: frozen encoders, the trainable KGMEL retriever, training, FAISS."""
