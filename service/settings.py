"""The one place configuration is read: ``ANIMALID_*`` environment variables (and an optional .env)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.security import ApiKeyring


class Settings(BaseSettings):
    """Service configuration. Build it once (``Settings()``) and pass it to ``create_app``."""

    model_config = SettingsConfigDict(env_prefix="ANIMALID_", env_file=".env", extra="ignore", frozen=True)

    database_url: str = Field(
        default="sqlite:///./var/animalid.db",
        description="SQLAlchemy URL: a SQLite file (embedded default) or postgresql+psycopg://user@host/db",
    )
    models_dir: Path = Field(
        default=Path("./var/models"), description="One exported artifact per species: <dir>/<species>/"
    )
    image_store_dir: Path = Field(
        default=Path("./var/images"), description="Original images, kept for re-embedding"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: CUDA when torch sees it, else the CPU"
    )
    host: str = Field(default="127.0.0.1", description="Where `animalid serve` listens")
    port: int = Field(default=8000, ge=1, le=65535)

    max_upload_bytes: int = Field(
        default=10 * 1024 * 1024, gt=0, description="Whole request body, refused before parsing"
    )
    max_image_pixels: int = Field(default=40_000_000, gt=0, description="Width x height cap per image")
    max_images_per_request: int = Field(default=32, gt=0, description="Images in one enroll")
    max_request_pixels: int = Field(
        default=200_000_000, gt=0, description="Width x height of all images of one request together"
    )
    max_concurrent_decodes: int = Field(
        default=2, gt=0, description="Full-size image decodes at once in the process; more wait their turn"
    )
    min_image_side: int = Field(default=32, ge=1, description="Shorter side of an uploaded image, in pixels")
    min_image_std: float = Field(
        default=2.0,
        ge=0.0,
        description="Least grey-level standard deviation (0-255) of an upload; flatter is refused; 0: off",
    )
    orphan_grace_seconds: int = Field(
        default=3600,
        ge=0,
        description="Stored image files with no database row and older than this are removed at start-up",
    )
    auth_failure_limit: int = Field(
        default=20, ge=1, description="Failed API key checks per client address per window before 429"
    )
    auth_failure_window_seconds: int = Field(
        default=60, ge=1, description="The window of auth_failure_limit, in seconds"
    )
    database_retry_after_seconds: int = Field(
        default=5, ge=1, description="Retry-After of a 503 database_unavailable answer"
    )

    api_keys: SecretStr = Field(
        default=SecretStr(""), description="Comma-separated KEY:scope pairs, scope read or admin"
    )
    auth_disabled: bool = Field(default=False, description="Serve without API keys; must be set explicitly")

    default_threshold: float = Field(
        default=0.5, ge=-1.0, le=1.0, description="Cosine threshold when a model card has no calibrated one"
    )
    default_top_k: int = Field(default=5, ge=1, description="Candidates returned when top_k is not given")
    max_top_k: int = Field(default=100, ge=1, description="Largest top_k an identify may ask for")
    warmup: bool = Field(default=True, description="Run one forward pass per model at start-up")
    cpu_threads: int | None = Field(
        default=None,
        gt=0,
        description="CPU threads for inference (torch intra-op) and search (FAISS OpenMP); default: theirs",
    )
    reembed_batch_size: int = Field(
        default=32, gt=0, description="Images per batch when re-embedding after a model change"
    )
    explain_max_side: int = Field(default=512, gt=0, description="Longest side of the Grad-CAM overlay PNG")

    @field_validator("database_url")
    @classmethod
    def _url_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("database_url must not be empty")
        return value

    @cached_property
    def keyring(self) -> ApiKeyring:
        """API keys parsed and hashed; the raw keys are not kept elsewhere."""
        return ApiKeyring.parse(self.api_keys.get_secret_value())
