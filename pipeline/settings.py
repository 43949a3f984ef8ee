"""metasep's settings in one place: ``METASEP_*`` environment variables, CLI flags and flow
parameters all resolve through :func:`load_settings`.

Precedence, highest first:

1. a CLI flag or a flow parameter that is given (not ``None``);
2. the environment variable ``METASEP_<NAME>`` (``METASEP_WORKERS=4``; ``METASEP_STORAGE_OPTIONS``
   holds JSON);
3. for ``ray_address`` only, Ray's own ``RAY_ADDRESS`` (what ``ray job submit`` sets for a job's
   driver);
4. the defaults below.

Storage options are the exception to "replace": options from a flag or parameter are merged key
by key over ``METASEP_STORAGE_OPTIONS``, so that credentials can stay in the environment of the
machines (a Kubernetes Secret, say) while a run names its endpoint. They are held as a pydantic
``Secret``: printing the settings, or an error about them, never shows their values.

Flow parameters are recorded by Prefect (its database, its UI), so credentials do not belong
there; the CLI hands its settings to the flow with :func:`use_settings` instead of as parameters.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AliasChoices,
    Field,
    Secret,
    ValidationError,
    field_serializer,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.separator.options import SeparationFields, SeparationOptions

ENV_PREFIX = "METASEP_"
REDACTED = "***"
# Storage option keys whose values are credentials (matched as parts of the lower-cased key):
# s3fs' key/secret/token, botocore's aws_access_key_id/aws_secret_access_key/aws_session_token,
# gcsfs' token, adlfs' account_key/sas_token/client_secret, passwords of http/ftp/sftp.
SECRET_KEY_PARTS = ("key", "secret", "token", "password", "passwd", "credential", "sas")
FLAGS = {"stem_format": "--format"}  # settings whose CLI flag is not --<name>
_URL_FIELDS = ("ray_address", "weights_mirror")  # URLs that may carry user:password@


class SettingsError(ValueError):
    """A setting with a value that cannot be used; the message names it, never its value."""


class Settings(BaseSettings, SeparationFields):
    """Every knob that the CLI and the flows share: the separation options' fields
    (:class:`pipeline.separator.options.SeparationFields`) and those of the cluster, storage and
    caches.

    Build it with :func:`load_settings` (environment + overrides), not directly, so that the
    settings a CLI command handed to a flow (:func:`use_settings`) are respected.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, populate_by_name=True
    )

    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices(f"{ENV_PREFIX}RAY_ADDRESS", "RAY_ADDRESS"),
        description="Ray cluster to join: HOST:PORT, ray://HOST:10001 or auto (default: a local "
        "Ray started for the run)",
    )
    storage_options: Secret[dict[str, Any]] = Field(
        default_factory=lambda: Secret({}),
        description="fsspec options as a JSON object, e.g. endpoint_url, key, secret",
    )
    weights_mirror: str | None = Field(
        None,
        description="where named weights are fetched from instead of their published URL: an "
        "fsspec URL prefix holding each file under its original name (s3://, https://, file://)",
    )
    workers: int | None = Field(
        None, ge=1, description="model workers of a catalog run (default: one per GPU or CPUs-1)"
    )
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each model worker holds")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each model worker holds")
    device: str | None = Field(
        None, description="device of in-process work: cpu, cuda (default: cuda if present)"
    )
    stall_timeout: float | None = Field(
        None,
        gt=0,
        description="seconds a catalog track may go without progress before it is given up and "
        "its worker replaced (default: 900 on CPU workers, 600 on GPU workers)",
    )
    timeout: float | None = Field(
        None,
        gt=0,
        description="seconds a catalog run may take; then it stops cleanly, the rest left for "
        "the next run (default: no limit)",
    )
    spool_dir: Path | None = Field(
        None,
        description="where a separation keeps a track's unscaled stems until they are encoded "
        "(default: the system's temporary folder; about 85 MB a minute of stereo 44.1 kHz)",
    )
    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "metasep",
        description="metasep's cache folder (training keeps resampled tracks in its train/)",
    )

    @field_validator("storage_options", mode="before")
    @classmethod
    def _storage_options_json(cls, value: Any) -> Any:
        """``METASEP_STORAGE_OPTIONS`` is JSON text; an object is required."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"not JSON ({error.msg} at character {error.pos})") from None
        if isinstance(value, Secret):
            value = value.get_secret_value()
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object")
        return value

    @field_validator("ray_address", "device", "weights_mirror", "spool_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """``RAY_ADDRESS=`` (set but empty) means no cluster, as it does for Ray itself; an
        empty ``METASEP_WEIGHTS_MIRROR`` (a Docker build argument left empty) means no mirror."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_serializer("ray_address", "weights_mirror")
    def _url_shown(self, value: str | None) -> str | None:
        return redact_url(value) if value else value

    def __repr_args__(self):
        """``repr``/``str`` with the user-info of the URLs hidden (the storage options are a
        ``Secret`` already)."""
        for name, value in super().__repr_args__():
            yield name, (redact_url(value) if name in _URL_FIELDS and value else value)

    def separation(self) -> SeparationOptions:
        """The separation options these settings hold (already checked: this cannot fail)."""
        return SeparationOptions(
            **{name: getattr(self, name) for name in SeparationOptions.model_fields}
        )

    def options(self) -> dict[str, Any] | None:
        """The storage options for fsspec (``None`` when there are none)."""
        return dict(self.storage_options.get_secret_value()) or None

    def describe(self) -> dict[str, Any]:
        """The settings as plain values that are safe to print or log: credentials redacted."""
        values = {name: getattr(self, name) for name in type(self).model_fields}
        values["storage_options"] = redact(self.storage_options.get_secret_value())
        for name in _URL_FIELDS:
            values[name] = redact_url(values[name]) if values[name] else None
        values["cache_dir"] = str(self.cache_dir)
        values["spool_dir"] = str(self.spool_dir) if self.spool_dir else None
        return values


def env_name(field: str) -> str:
    """The environment variable of a setting: ``gpus_per_worker`` -> ``METASEP_GPUS_PER_WORKER``."""
    return f"{ENV_PREFIX}{field.upper()}"


_SCOPE: ContextVar[Settings | None] = ContextVar("metasep_settings", default=None)


def load_settings(**overrides: Any) -> Settings:
    """The settings in force: the environment (or the settings of the enclosing
    :func:`use_settings`), with every override that is not ``None`` on top.

    ``storage_options`` overrides are merged key by key over the ones in force. Raises
    :class:`SettingsError` naming the setting, never its value, when one is invalid.
    """
    given = {name: value for name, value in overrides.items() if value is not None}
    unknown = set(given) - set(Settings.model_fields)
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
    try:
        base = _SCOPE.get() or Settings()
        if not given:
            return base
        if "storage_options" in given:
            extra = Settings(storage_options=given["storage_options"]).options() or {}
            given["storage_options"] = {**(base.options() or {}), **extra}
        current = {name: getattr(base, name) for name in Settings.model_fields}
        return Settings(**{**current, **given})
    except ValidationError as error:
        raise SettingsError(describe_errors(error)) from None


def settings_for_run(log: Any, **parameters: Any) -> Settings:
    """The settings of a flow run: :func:`load_settings` with the run's parameters, logged with
    credentials redacted, and a warning when credentials came as a parameter (Prefect records
    flow parameters in its database and shows them in its UI). ``log`` is the run's logger."""
    settings = load_settings(**parameters)
    log.info("settings: %s", settings.describe())
    given = credential_keys(parameters.get("storage_options"))
    if given:
        log.warning(
            "the storage_options parameter holds %s: Prefect records flow parameters, so pass "
            "credentials in METASEP_STORAGE_OPTIONS or AWS_* on the worker instead",
            ", ".join(given),
        )
    return settings


def settings_from_args(args: argparse.Namespace, **dests: str) -> Settings:
    """The settings of a command: its flags over the environment. A flag counts when its dest is
    the setting's name, or the dest that ``dests`` maps it to (``stem_format="format"``)."""
    return load_settings(
        **{name: getattr(args, dests.get(name, name), None) for name in Settings.model_fields}
    )


@contextmanager
def use_settings(settings: Settings) -> Iterator[Settings]:
    """Make ``settings`` the base of every :func:`load_settings` inside the block (in this
    thread and the contexts copied from it): how the CLI hands its flags to a flow without
    turning credentials into recorded flow parameters."""
    token = _SCOPE.set(settings)
    try:
        yield settings
    finally:
        _SCOPE.reset(token)


def is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(part in lowered for part in SECRET_KEY_PARTS)


def redact(value: Any) -> Any:
    """A copy of (nested) options with the values of credential keys replaced by ``***`` and
    the user-info of URLs removed."""
    if isinstance(value, dict):
        return {
            key: REDACTED if is_secret_key(str(key)) and item is not None else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    if isinstance(value, str) and "@" in value and "://" in value:
        return redact_url(value)
    return value


def redact_url(url: str) -> str:
    """``scheme://user:password@host/...`` -> ``scheme://***@host/...``."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{REDACTED}@{host}"))


def credential_keys(options: dict[str, Any] | None) -> list[str]:
    """The credential keys present in (nested) storage options, for a warning that names them."""
    found: list[str] = []
    for key, value in (options or {}).items():
        if is_secret_key(str(key)) and value is not None:
            found.append(str(key))
        elif isinstance(value, dict):
            found += [f"{key}.{inner}" for inner in credential_keys(value)]
    return found


def describe_errors(error: ValidationError) -> str:
    """One line per invalid setting, from pydantic's messages without the input values."""
    lines = []
    for item in error.errors(include_input=False, include_url=False):
        field = str(item["loc"][0]) if item["loc"] else "settings"
        if field in ("METASEP_RAY_ADDRESS", "RAY_ADDRESS"):
            field = "ray_address"
        flag = FLAGS.get(field, "--" + field.replace("_", "-"))
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{field} ({flag} or {env_name(field)}): {message}")
    return "; ".join(lines)
