"""Relational storage: the source of truth for individuals, images and embeddings."""
