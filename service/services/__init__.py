"""Use cases: each function takes what it needs (session, registry, store...) and raises domain errors."""
