"""Model loading, image decoding and vector search: everything that runs on torch, Pillow or FAISS."""
