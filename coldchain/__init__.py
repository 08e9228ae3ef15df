"""coldchain: the service. MQTT telemetry ingest into PostgreSQL, the HTTP API, and the
composition of the device-side `sensors` package and the `routing` planner."""

from coldchain.app import create_app
from coldchain.errors import ColdchainError, ConfigError, StoreUnavailable
from coldchain.settings import Settings

__all__ = ["ColdchainError", "ConfigError", "Settings", "StoreUnavailable", "create_app"]
