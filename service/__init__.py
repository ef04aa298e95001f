"""AnimalID identification service: FastAPI over per-species FAISS indexes and a SQL database."""

__version__ = "0.1.0"
