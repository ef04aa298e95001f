"""The one place configuration is read: ``ANIMALID_*`` environment variables (and an optional .env)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.security import ApiKeyring

# The bounds of the open-set settings, shared by each setting and its per-species map.
Rate = Annotated[float, Field(gt=0.0, lt=1.0)]
"""A target false-positive identification rate: strictly between 0 and 1."""
Share = Annotated[float, Field(ge=0.0, lt=1.0)]
"""A share of identify queries: 0 included, 1 not."""
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
"""A probability: 0 and 1 included."""


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
    database_lock_wait_seconds: float = Field(
        default=30,
        gt=0,
        le=3600,
        description="How long a write waits for records another process is writing before it is "
        "answered 409 concurrent_change, nothing written (Postgres's lock_timeout, SQLite's busy timeout)",
    )

    api_keys: SecretStr = Field(
        default=SecretStr(""), description="Comma-separated KEY:scope pairs, scope read or admin"
    )
    auth_disabled: bool = Field(default=False, description="Serve without API keys; must be set explicitly")

    default_threshold: float = Field(
        default=0.5, ge=-1.0, le=1.0, description="Cosine threshold when a model card has no calibrated one"
    )
    target_fpir: Rate = Field(
        default=0.01,
        description="Identify: share of never-enrolled animals that may be answered match (false-positive "
        "identification rate); the threshold for it at the gallery's size comes from the model card",
    )
    target_fpir_by_species: dict[str, Rate] = Field(
        default_factory=dict,
        description='Per-species target FPIR, JSON, e.g. {"cattle": 0.05}; others use target_fpir',
    )
    review_fpir: Rate = Field(
        default=0.05,
        description="Identify: best candidates between the threshold for this FPIR and the target one are "
        "answered uncertain (no band when it is not above the target)",
    )
    stranger_share: Share | None = Field(
        default=None,
        description="Identify: the share of queries that are photos of animals not enrolled, the prior the "
        "confidence is computed for (0: every query is of an enrolled animal); default: the model card's "
        "calibration mix",
    )
    stranger_share_by_species: dict[str, Share] = Field(
        default_factory=dict,
        description='Per-species stranger share, JSON, e.g. {"cattle": 0.1}; others use stranger_share',
    )
    min_match_confidence: Probability = Field(
        default=0.5,
        description="Identify: the confidence a best candidate past the threshold needs to be answered "
        "match; below it the answer is uncertain (0: none)",
    )
    min_match_confidence_by_species: dict[str, Probability] = Field(
        default_factory=dict,
        description='Per-species minimum match confidence, JSON, e.g. {"cattle": 0.8}; others use '
        "min_match_confidence",
    )
    review_queue: bool = Field(
        default=False,
        description="Keep identify queries answered uncertain (photo and candidates) for an admin to resolve",
    )
    default_top_k: int = Field(default=5, ge=1, description="Candidates returned when top_k is not given")
    max_top_k: int = Field(default=100, ge=1, description="Largest top_k an identify may ask for")
    warmup: bool = Field(default=True, description="Run one forward pass per model at start-up")
    trace_forward: bool = Field(
        default=True,
        description="At start-up (with WARMUP) and at every model switch, trace each model's forward pass "
        "to a TorchScript graph that runs without Python's lock, so that concurrent requests share the "
        "cores (docs/benchmarks.md). Each trace keeps about 6 MB (ResNet18) to 50 MB (the fused demo "
        "model) for the life of the process",
    )
    cpu_threads: int | None = Field(
        default=None,
        gt=0,
        description="CPU threads for inference (torch intra-op) and search (FAISS OpenMP); default: theirs",
    )
    reembed_batch_size: int = Field(
        default=32, gt=0, description="Images per batch when re-embedding after a model change"
    )
    explain_max_side: int = Field(
        default=512,
        ge=64,
        description="Width of the two photos side by side in the /explain PNG (each one's longer side: half)",
    )

    client_url: str | None = Field(
        default=None,
        description="Where `animalid enroll` and `identify` send requests; default: this host and port",
    )
    client_api_key: SecretStr = Field(
        default=SecretStr(""), description="API key sent by `animalid enroll` and `animalid identify`"
    )

    # Learning the enrolled animals: fine-tune jobs and the worker that runs them.
    jobs_dir: Path = Field(
        default=Path("./var/jobs"), description="Work folders of jobs: gallery exports, checkpoints"
    )
    worker_threads: int = Field(
        default=1, gt=0, description="CPU threads of a worker process (torch), apart from the API's"
    )
    worker_poll_s: float = Field(default=2.0, gt=0, description="How often an idle worker looks for a job")
    job_heartbeat_s: float = Field(default=10.0, gt=0, description="How often a running job says it is alive")
    job_stale_after_s: float = Field(
        default=120.0, gt=0, description="A running job silent this long is taken over (its worker died)"
    )
    job_max_attempts: int = Field(default=3, gt=0, description="Claims of one job before it is failed")
    finetune_epochs: int = Field(default=3, gt=0, description="Epochs of a fine-tune unless asked otherwise")
    finetune_lr: float = Field(default=0.01, gt=0, description="Peak learning rate of a fine-tune")
    finetune_holdout: float = Field(
        default=0.5, gt=0, lt=1, description="Share of each animal's enrolment batches held back to judge"
    )
    finetune_strangers: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="Share of the gallery's animals kept out of a fine-tune to calibrate the new model for "
        "animals nobody enrolled (0: none, and a serving model with an open-set table is never replaced)",
    )
    promote_min_top1_gain: float = Field(
        default=0.01, description="The challenger's top-1 must beat the champion's by at least this"
    )
    promote_min_far_drop: float = Field(
        default=0.0,
        description="The challenger's false-match rate at the threshold must be at least this much lower",
    )
    herd_check_growth: float = Field(
        default=0.2,
        ge=0,
        description="An idle worker queues a herd check of a species (`animalid gallery check --apply`) "
        "never checked with its serving card, or whose gallery has grown by this share since; 0 = never",
    )
    herd_check_min_individuals: int = Field(
        default=10, ge=2, description="Enrolled individuals a species needs before the worker checks its herd"
    )
    herd_check_max_queries: int = Field(
        default=5000, gt=0, description="Photos a herd check asks at most (drawn at random)"
    )
    model_watch_s: float = Field(
        default=5.0,
        ge=0,
        description="How often the API checks the models folder for a new version; 0 = never",
    )
    embedded_worker: bool = Field(
        default=False, description="`serve` / `demo` also start a worker in a child process (SQLite setups)"
    )
    batch_wait_ms: float = Field(
        default=5.0,
        ge=0.0,
        le=5000.0,
        description="Dynamic batching: how long concurrent requests' images are gathered into one forward "
        "pass (0: every request runs its own); with BATCH_START after-wait a request alone waits this long",
    )
    batch_max_images: int = Field(
        default=0,
        ge=0,
        description="Dynamic batching: the most images in one forward pass; 0: 8 on the CPU, where larger "
        "batches are no faster per image and make their requests wait (docs/benchmarks.md), 32 on a GPU",
    )
    batch_lanes: int = Field(
        default=0,
        ge=0,
        description="Dynamic batching: batches (forward passes, index searches) that run at the same time; "
        "0: one per share of the CPU cores that one pass uses (cores / ANIMALID_CPU_THREADS) on the CPU, "
        "1 on a GPU",
    )
    batch_min_speedup: float = Field(
        default=1.2,
        ge=0.0,
        description="Dynamic batching: a model is batched only if, measured when it loads, a batch of "
        "BATCH_MAX_IMAGES runs at least this many times the images per second of a single image (0: every "
        "model is batched). On the 2-core CPU ResNet18 ran 2.0-2.3x, the fused EfficientNet-Lite demo model "
        "0.6-0.8x, which unbatched served 8 clients 30% more requests at half the p99 "
        "(docs/benchmarks.md)",
    )
    batch_start: Literal["when-idle", "after-wait"] = Field(
        default="when-idle",
        description="Dynamic batching: when a batch starts. when-idle: at once while no batch runs, the "
        "requests that arrive meanwhile gathering for the next, so a lone request never waits; after-wait: "
        "once its first request waited BATCH_WAIT_MS (or it is full). Same throughput at 8 clients on the "
        "CPU, lone requests a quarter faster there and twice as fast on a GPU (docs/benchmarks.md)",
    )
    search_batch_wait_ms: float = Field(
        default=1.0,
        ge=0.0,
        le=5000.0,
        description="Dynamic batching of index searches (0: off); one search for concurrent identifies",
    )
    search_batch_max_queries: int = Field(
        default=64, ge=1, description="Dynamic batching: the most queries in one index search"
    )
    exact_search_max_vectors: int = Field(
        default=50_000,
        ge=0,
        description="A species' gallery above this many vectors is searched through an approximate index "
        "(on the CPU); at or below it exactly. 0: always exact. See docs/benchmarks.md",
    )
    approximate_index: Literal["pq", "ivf"] = Field(
        default="pq",
        description="The approximate index of large galleries: pq (4-bit codes scanned with FAISS's fast "
        "scan, the best candidates rescored exactly) or ivf (IVF-Flat cells)",
    )
    pq_refine: int = Field(
        default=50, ge=1, description="pq: candidates rescored exactly per neighbour asked (recall vs speed)"
    )
    ivf_nprobe: int = Field(default=64, ge=1, description="IVF cells scanned per query (recall vs speed)")
    index_follow_poll_s: float = Field(
        default=1.0,
        gt=0.0,
        le=60.0,
        description="Postgres: how often an API process checks for other processes' index changes when "
        "no notification came (a notification applies them at once)",
    )

    @field_validator("database_url")
    @classmethod
    def _url_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("database_url must not be empty")
        return value

    @property
    def api_url(self) -> str:
        """The API's base URL for a client on this machine."""
        if self.client_url:
            return self.client_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @cached_property
    def keyring(self) -> ApiKeyring:
        """API keys parsed and hashed; the raw keys are not kept elsewhere."""
        return ApiKeyring.parse(self.api_keys.get_secret_value())
