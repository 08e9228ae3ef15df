"""Service configuration, read once from the environment (CONTRACT.md section 5)."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from coldchain.errors import ConfigError


@dataclass(frozen=True, slots=True)
class MqttAddress:
    """Where the broker is, parsed from `mqtt://[user:pass@]host:port`."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> MqttAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp"):
            raise ConfigError(f"COLDCHAIN_MQTT_URL must start with mqtt://, got {mask_url(url)!r}")
        if not parts.hostname:
            raise ConfigError(f"COLDCHAIN_MQTT_URL has no host: {mask_url(url)!r}")
        try:
            port = parts.port or 1883
        except ValueError as exc:
            raise ConfigError(f"COLDCHAIN_MQTT_URL has a bad port: {mask_url(url)!r}") from exc
        return cls(parts.hostname, port, parts.username, parts.password)

    @property
    def url(self) -> str:
        auth = f"{self.username}:***@" if self.username else ""
        return f"mqtt://{auth}{self.host}:{self.port}"


def mask_url(url: str) -> str:
    """A URL with its password replaced, safe for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _default_dashboard_dir() -> Path | None:
    candidate = Path(__file__).resolve().parent.parent / "dashboards" / "web"
    return candidate if candidate.is_dir() else None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service needs to know, fixed for the life of the process.

    Tests build it directly; the entry points use `Settings.from_env()`.
    """

    database_url: str = field(default="postgresql://postgres@127.0.0.1:5432/postgres", repr=False)
    mqtt_url: str = field(default="mqtt://127.0.0.1:1883", repr=False)
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    smtp_url: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    # Ingest tuning. The broker never has more than `mqtt_receive_maximum` unacknowledged
    # messages out to us, which bounds memory; a batch is written when it reaches
    # `batch_size` readings or `flush_interval_s` after its first reading; `ingest_writers`
    # batches are written at once (on their own connections of the pool).
    mqtt_client_id: str = "coldchain-ingest"
    mqtt_shared_group: str | None = None
    mqtt_receive_maximum: int = 16000
    mqtt_session_expiry_s: int = 7 * 24 * 3600
    batch_size: int = 4000
    flush_interval_s: float = 0.005
    ingest_writers: int = 2
    db_pool_size: int = 4
    backoff_cap_s: float = 5.0
    # Reverse proxies (addresses or networks) whose X-Forwarded-For names the client.
    trusted_proxies: tuple[str, ...] = ()
    # Alarm reminders: unacknowledged alarms repeat and escalate every REMIND_AFTER[severity]
    # times this scale; the rules' clock (signal lost, reminders) ticks every `rules_beat_s`.
    remind_scale: float = 1.0
    rules_beat_s: float = 15.0
    # The web dashboard's files; by default those beside the source (dashboards/web).
    dashboard_dir: Path | None = field(default_factory=lambda: _default_dashboard_dir())

    def __repr__(self) -> str:
        return (
            f"Settings(database_url={mask_url(self.database_url)!r}, "
            f"mqtt_url={mask_url(self.mqtt_url)!r}, "
            f"http={self.http_host}:{self.http_port}, smtp={'set' if self.smtp_url else 'unset'}, "
            f"log_level={self.log_level}, client_id={self.mqtt_client_id!r}, "
            f"shared_group={self.mqtt_shared_group!r}, batch_size={self.batch_size})"
        )

    @property
    def mqtt(self) -> MqttAddress:
        return MqttAddress.parse(self.mqtt_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from COLDCHAIN_* variables; fail fast with the variable's name."""
        env = os.environ if env is None else env
        defaults = cls()

        def text(name: str, default: str) -> str:
            return env.get(f"COLDCHAIN_{name}", "").strip() or default

        def number(name: str, default: float, kind: type[int] | type[float]) -> float:
            raw = env.get(f"COLDCHAIN_{name}", "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError as exc:
                raise ConfigError(f"COLDCHAIN_{name} must be a number, got {raw!r}") from exc
            if value <= 0:
                raise ConfigError(f"COLDCHAIN_{name} must be positive, got {raw!r}")
            return value

        database_url = text("DATABASE_URL", defaults.database_url)
        if urlsplit(database_url).scheme not in ("postgresql", "postgres"):
            raise ConfigError(
                "COLDCHAIN_DATABASE_URL must start with postgresql://, "
                f"got {mask_url(database_url)!r}"
            )
        mqtt_url = text("MQTT_URL", defaults.mqtt_url)
        MqttAddress.parse(mqtt_url)
        log_level = text("LOG_LEVEL", defaults.log_level).upper()
        if log_level not in logging.getLevelNamesMapping():
            raise ConfigError(
                f"COLDCHAIN_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}"
            )
        client_id = text("MQTT_CLIENT_ID", defaults.mqtt_client_id)
        if not _CLIENT_ID.fullmatch(client_id):
            raise ConfigError(
                f"COLDCHAIN_MQTT_CLIENT_ID must be 1-64 of A-Z a-z 0-9 . _ -, got {client_id!r}"
            )
        group = env.get("COLDCHAIN_MQTT_SHARED_GROUP", "").strip() or None
        if group is not None and not _CLIENT_ID.fullmatch(group):
            raise ConfigError(
                f"COLDCHAIN_MQTT_SHARED_GROUP must be 1-64 of A-Z a-z 0-9 . _ -, got {group!r}"
            )
        port = int(number("HTTP_PORT", defaults.http_port, int))
        if port > 65535:
            raise ConfigError(f"COLDCHAIN_HTTP_PORT must be at most 65535, got {port}")
        return cls(
            database_url=database_url,
            mqtt_url=mqtt_url,
            http_host=text("HTTP_HOST", defaults.http_host),
            http_port=port,
            smtp_url=env.get("COLDCHAIN_SMTP_URL", "").strip() or None,
            log_level=log_level,
            mqtt_client_id=client_id,
            mqtt_shared_group=group,
            mqtt_receive_maximum=int(
                number("MQTT_RECEIVE_MAXIMUM", defaults.mqtt_receive_maximum, int)
            ),
            batch_size=int(number("BATCH_SIZE", defaults.batch_size, int)),
            flush_interval_s=number("FLUSH_INTERVAL_S", defaults.flush_interval_s, float),
            ingest_writers=int(number("INGEST_WRITERS", defaults.ingest_writers, int)),
            db_pool_size=int(number("DB_POOL_SIZE", defaults.db_pool_size, int)),
            trusted_proxies=_networks(env.get("COLDCHAIN_TRUSTED_PROXIES", "")),
            remind_scale=number("REMIND_SCALE", defaults.remind_scale, float),
            rules_beat_s=number("RULES_BEAT_S", defaults.rules_beat_s, float),
            dashboard_dir=Path(env["COLDCHAIN_DASHBOARD_DIR"])
            if env.get("COLDCHAIN_DASHBOARD_DIR")
            else defaults.dashboard_dir,
        )


def _networks(raw: str) -> tuple[str, ...]:
    """COLDCHAIN_TRUSTED_PROXIES: comma-separated addresses or networks (CIDR)."""
    networks = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError as exc:
            raise ConfigError(
                "COLDCHAIN_TRUSTED_PROXIES must be addresses or networks (e.g. 10.0.0.0/8), "
                f"comma-separated; got {item!r}"
            ) from exc
    return tuple(networks)
