"""Frozen, validated configuration: a YAML file overlaid by ``DICOMGW_*`` environment variables.

Precedence (highest first): environment variables, the YAML file, the defaults below. Nested keys use
``__`` (``DICOMGW_DESTINATIONS__PACS_PROD__PORT=104``). Destination names keep the case they have in
the YAML file; an environment variable that names a destination matches it case-insensitively.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import ConfigError

ENV_PREFIX = "DICOMGW_"
CONFIG_ENV = "DICOMGW_CONFIG"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check_ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16:
        raise ValueError("an AE title has 1 to 16 characters")
    if "\\" in value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("an AE title may not contain a backslash or control characters")
    if not value.strip():
        raise ValueError("an AE title may not be all spaces")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RetryPolicy(_Frozen):
    """Exponential backoff with full jitter; see docs/forwarding.md."""

    base_delay: float = Field(2.0, gt=0, description="first retry delay ceiling, seconds")
    max_delay: float = Field(300.0, gt=0, description="cap of one retry delay, seconds")
    max_attempts: int = Field(500, ge=1, description="attempts before dead-lettering")
    max_age: float = Field(86400.0, gt=0, description="seconds after receipt before dead-lettering")
    status_overrides: dict[str, Literal["delivered", "transient", "permanent"]] = Field(
        default_factory=dict,
        description="DIMSE status (hex, e.g. 'A700' or 'C0xx') -> outcome; overrides the defaults",
    )

    @model_validator(mode="after")
    def _overrides(self) -> RetryPolicy:
        """A bad pattern is a configuration error at start-up, not a crash at the first response."""
        from gateway.retry import compile_overrides  # noqa: PLC0415 - retry imports this module

        compile_overrides(self.status_overrides)
        return self


class PeerTLS(_Frozen):
    """DICOM TLS when we call a peer (TLS 1.2 minimum, 1.3 preferred, BCP 195 ciphers)."""

    ca_bundle: Path | None = Field(None, description="trusted CAs (PEM); default: the system store")
    certificate: Path | None = Field(None, description="our client certificate (PEM), for mutual TLS")
    private_key: Path | None = Field(None, description="the key of `certificate` (PEM)")
    check_hostname: bool = Field(True, description="the peer certificate must name `host`")

    @model_validator(mode="after")
    def _pair(self) -> PeerTLS:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("give both certificate and private_key, or neither")
        return self


class ServerTLS(_Frozen):
    """The gateway's TLS listener, beside (or instead of) the plain one."""

    port: Annotated[int, Field(ge=0, le=65535)] = Field(2762, description="TLS port (DICOM: 2762)")
    certificate: Path = Field(description="our server certificate chain (PEM)")
    private_key: Path = Field(description="its private key (PEM)")
    ca_bundle: Path | None = Field(None, description="CAs that sign client certificates (PEM)")
    require_client_certificate: bool = Field(False, description="mutual TLS: refuse clients without a "
                                             "certificate signed by ca_bundle")
    plain: bool = Field(True, description="also listen without TLS on `port`")

    @model_validator(mode="after")
    def _mutual(self) -> ServerTLS:
        if self.require_client_certificate and self.ca_bundle is None:
            raise ValueError("require_client_certificate needs a ca_bundle to verify clients with")
        return self


class Peer(_Frozen):
    """A remote AE we call: a PACS destination or the RIS worklist."""

    ae_title: AETitle
    host: str
    port: Port
    connect_timeout: float = Field(10.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    tls: PeerTLS | None = None


class Destination(Peer):
    """A storage destination (a PACS). Rules refer to it by its name in ``destinations``."""

    queue_capacity: int = Field(1000, ge=1, description="in-memory queue size; the rest waits in the journal")
    associations: int = Field(1, ge=1, le=16, description="parallel associations to this PACS")
    idle_timeout: float = Field(30.0, gt=0, description="release an idle association after this many seconds")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)


class Worklist(Peer):
    """The upstream Modality Worklist SCP (the RIS)."""

    deadline: float = Field(
        20.0, gt=0, description="answer the modality with a failure after this many seconds"
    )
    coerce_station_ae: bool = Field(
        False, description="fill an empty ScheduledStationAETitle with the calling AE title"
    )


class Modality(_Frozen):
    """A modality we know: its calling AE title and, optionally, the addresses it may call from."""

    ae_title: AETitle
    addresses: list[str] = Field(
        default_factory=list, description="IP addresses or CIDR networks; empty = any address"
    )

    @model_validator(mode="after")
    def _check_addresses(self) -> Modality:
        for address in self.addresses:
            try:
                ipaddress.ip_network(address, strict=False)
            except ValueError:
                raise ValueError(f"{address!r} is not an IP address or CIDR network") from None
        return self


class Settings(_Frozen):
    ae_title: AETitle = "DICOMGW"
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 11112  # 0: any free port (tests)
    spool_dir: Path = Path("var/spool")
    rules_dir: Path = Path("rules")
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, Field(ge=0, le=65535)] = 8080
    tls: ServerTLS | None = None
    max_associations: int = Field(32, ge=1)
    max_pdu: int = Field(262144, ge=4096, le=16 * 1024 * 1024, description="largest PDU we accept")
    artim_timeout: float = Field(30.0, gt=0)
    network_timeout: float = Field(60.0, gt=0, description="silence on an open association before abort")
    shutdown_timeout: float = Field(30.0, ge=0)
    max_association_seconds: float = Field(
        14400.0, ge=0, description="abort an inbound association older than this (0 = no limit)")
    max_association_bytes: int = Field(
        0, ge=0, description="abort an inbound association that sends more than this (0 = no limit)")
    spool_max_bytes: int = Field(0, ge=0, description="0 = no byte limit")
    spool_min_free_fraction: float = Field(0.05, ge=0, lt=1)
    duplicate_policy: Literal["forward", "ignore"] = "forward"
    retention_seconds: float = Field(0.0, ge=0, description="keep delivered objects this long")
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    modalities: list[Modality] = Field(default_factory=list)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    worklist: Worklist | None = None
    worklist_by_calling_ae: dict[AETitle, Worklist] = Field(
        default_factory=dict, description="calling AE title -> its own upstream MWL SCP"
    )

    @property
    def known_calling_aes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.ae_title for m in self.modalities))

    @model_validator(mode="after")
    def _check_names(self) -> Settings:
        for name in self.destinations:
            if not _NAME.match(name):
                raise ValueError(
                    f"destination name {name!r}: use 1-64 letters, digits, '_', '.', '-'"
                )
        return self


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file (``path`` or ``$DICOMGW_CONFIG``), overlay the environment, validate."""
    env = os.environ if environ is None else environ
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    data: dict[str, Any] = _read_yaml(path) if path is not None else {}
    _overlay_env(data, env)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, path)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    _resolve_paths(loaded, path.parent)
    return loaded


_PATH_KEYS = frozenset({"spool_dir", "rules_dir", "certificate", "private_key", "ca_bundle"})


def _resolve_paths(node: Any, base: Path) -> None:
    """Relative paths in the file are relative to the file's folder."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _PATH_KEYS and isinstance(value, str) and not Path(value).is_absolute():
                node[key] = str(base / value)
            else:
                _resolve_paths(value, base)


def _overlay_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_ENV:
            continue
        path = name[len(ENV_PREFIX) :].split("__")
        node = data
        for i, part in enumerate(path):
            key = _match_key(node, part, top=(i == 0))
            if i == len(path) - 1:
                node[key] = _parse_env_value(value)
            else:
                child = node.get(key)
                if not isinstance(child, dict):
                    child = {}
                    node[key] = child
                node = child


def _match_key(node: Mapping[str, Any], part: str, *, top: bool) -> str:
    for existing in node:
        if existing.lower() == part.lower():
            return existing
    return part.lower() if top or part.upper() != part or part.lower() in _ALL_FIELDS else part


_ALL_FIELDS = (
    set(Settings.model_fields)
    | set(Destination.model_fields)
    | set(Worklist.model_fields)
    | set(RetryPolicy.model_fields)
    | set(Modality.model_fields)
    | set(PeerTLS.model_fields)
    | set(ServerTLS.model_fields)
)


def _parse_env_value(value: str) -> Any:
    """Env values are YAML scalars or flow collections (``[a, b]``, ``{k: v}``)."""
    try:
        return yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        return value


def _explain(exc: ValidationError, path: Path | None) -> str:
    where = f"{path}" if path else "configuration"
    lines = [f"{where}: {exc.error_count()} problem(s):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        env = ENV_PREFIX + "__".join(str(p).upper() for p in err["loc"])
        got = err.get("input")
        shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
        lines.append(f"  - {key}{shown}: {err['msg']} [env: {env}]")
    return "\n".join(lines)
