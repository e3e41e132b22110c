"""The agent's configuration: LMCache's yaml keys, ``LMCACHE_CONFIG_FILE`` and ``LMCACHE_<KEY>`` overrides.

The seed's ``example.yaml`` loads unchanged. Keys keep LMCache's names and meanings (sizes in GiB,
``lmcache_worker_ports`` one port per worker rank, ``controller_url`` an alias of
``controller_pull_url``). Unknown keys are logged and listed in ``AgentConfig.unknown_keys``
rather than dropped silently; a value of the wrong type is a ``ConfigError`` naming the key.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from kvmesh.core.security import SecuritySettings
from kvmesh.errors import InvalidArgument

logger = logging.getLogger(__name__)

ENV_CONFIG_FILE = "LMCACHE_CONFIG_FILE"
ENV_PREFIX = "LMCACHE_"
GIB = 1 << 30
DEFAULT_WORKER_PORT = 8001
DEFAULT_HEARTBEAT_SECONDS = 2.0
# Upper bound on tokens per request: large enough for any context window, small enough that a
# malformed request cannot make the agent hash billions of tokens.
DEFAULT_MAX_TOKENS = 1 << 21
DEFAULT_MIN_FREE_DISK_GIB = 0.05
RAW_SERDES = ("", "naive", "raw")
REMOTE_SCHEMES = ("redis://", "rediss://", "unix://")


class ConfigError(InvalidArgument):
    """A configuration value that cannot be used; the message names the key."""


@dataclass
class AgentConfig:
    """One worker's cache configuration, with LMCache's key names."""

    chunk_size: int = 256
    local_cpu: bool = True
    max_local_cpu_size: float = 5.0
    local_disk: str | None = None
    max_local_disk_size: float = 0.0
    remote_url: str | None = None
    remote_serde: str | None = "naive"
    # kvmesh stores the partial last chunk by default: the seed's 12-token prompt counts 12.
    save_unfull_chunk: bool = True
    enable_controller: bool = False
    lmcache_instance_id: str = ""
    controller_pull_url: str | None = None
    controller_reply_url: str | None = None
    lmcache_worker_ports: list[int] = field(default_factory=list)
    # LMCache shipped heartbeats off while its controller reaped silent workers; kvmesh always beats.
    lmcache_worker_heartbeat_time: float = DEFAULT_HEARTBEAT_SECONDS
    enable_p2p: bool = False
    p2p_host: str | None = None
    p2p_init_ports: list[int] = field(default_factory=list)
    extra_config: dict[str, Any] = field(default_factory=dict)
    # kvmesh's own keys: the served model's name (its codec files are looked up by it) and a
    # model-files folder searched before $KVMESH_MODEL_FILES and the cache folder.
    model: str | None = None
    model_files: str | None = None
    # Keys of the file that kvmesh does not know (warned about at load).
    unknown_keys: list[str] = field(default_factory=list)
    source: str | None = None
    # The token and TLS files (extra_config auth_token_file, tls_cert_file, tls_key_file, tls_ca_file,
    # insecure; else KVMESH_AUTH_TOKEN_FILE and KVMESH_TLS_*): loaded once, when the config is made.
    security: SecuritySettings = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.lmcache_instance_id:
            self.lmcache_instance_id = f"lmcache_instance_{uuid.uuid4().hex[:12]}"
        _validate(self)
        self.security = _security(self.extra_config)

    @property
    def max_local_cpu_bytes(self) -> int:
        return int(self.max_local_cpu_size * GIB)

    @property
    def max_local_disk_bytes(self) -> int:
        return int(self.max_local_disk_size * GIB)

    def key_profile(self) -> Any:
        """The QueryProfile named by extra_config.cachegen_key_profile (a .npz path), or None: cachegen
        then rounds keys along the served model's queries (kvmesh.engine.profile makes one)."""
        from kvmesh.codecs import QueryProfile

        return self._model_file("cachegen_key_profile", QueryProfile.load)

    def layer_predictor(self) -> Any:
        """The LayerPredictor named by extra_config.cachegen_layer_predictor (a .npz path), or None:
        cachegen then codes each layer against a prediction from the layers before it (~18% fewer
        bytes; kvmesh.engine.predictor fits one). Chunks coded with it need it to decode."""
        from kvmesh.codecs import LayerPredictor

        return self._model_file("cachegen_layer_predictor", LayerPredictor.load)

    def _model_file(self, key: str, load: Any) -> Any:
        """load(path) of the file extra_config[key] names, or None; a bad file is a ConfigError."""
        path = self.extra_config.get(key)
        if not path:
            return None
        from kvmesh.codecs import CodecError

        try:
            return load(os.path.expanduser(str(path)))
        except CodecError as e:
            raise ConfigError(f"config key 'extra_config.{key}': {e}") from None

    def model_file_roots(self) -> list[Path]:
        """The folders searched for the model's files, in order: ``model_files`` (when set), then
        $KVMESH_MODEL_FILES's folders and the cache folder (kvmesh.codecs.model_files)."""
        from kvmesh.codecs.model_files import default_roots

        first = [Path(self.model_files).expanduser()] if self.model_files else []
        return first + [r for r in default_roots() if r not in first]

    def find_model_files(self) -> Any:
        """The ModelFiles found for ``model`` over model_file_roots(), or None (also when no model is set)."""
        if not self.model:
            return None
        from kvmesh.codecs import CodecError
        from kvmesh.codecs.model_files import find_model_files

        try:
            return find_model_files(self.model, self.model_file_roots())
        except CodecError as e:  # a model name that gives no folder name
            raise ConfigError(f"config key 'model': {e}") from None

    def codec_options(self, methods: list[str]) -> dict[str, dict[str, Any]]:
        """Per cachegen method of ``methods``: get_codec's key_profile, predictor and schedule.

        The model's files (``model``, found over model_file_roots()) come first; the explicit
        extra_config.cachegen_key_profile / cachegen_layer_predictor paths win over them, for every
        method. A model named but without files is logged as a warning saying how to make them:
        the agent still serves, its cachegen methods without them (a lower ratio)."""
        from kvmesh.codecs import CodecError, method_options

        found = self.find_model_files()
        if self.model and found is None:
            logger.warning("no codec files for model %r in %s: the cachegen methods run without them (a lower "
                           "ratio). Make them once with `kvmesh-model-files %s` (or kvmesh-serve makes its "
                           "model's own), or name the files in extra_config.cachegen_key_profile / "
                           "cachegen_layer_predictor", self.model,
                           ", ".join(str(r) for r in self.model_file_roots()), self.model)
        explicit = {k: v for k, v in (("key_profile", self.key_profile()),
                                      ("predictor", self.layer_predictor())) if v is not None}
        out: dict[str, dict[str, Any]] = {}
        for method in methods:
            takes = method_options(method)
            if "predictor" not in takes:  # model files are for the cachegen methods only
                continue
            try:
                opts = found.codec_options(method) if found is not None else {}
            except CodecError as e:
                raise ConfigError(f"the model files of {self.model!r} in {found.folder}: {e}") from None
            opts.update(explicit)
            out[method] = {k: v for k, v in opts.items() if k in takes}
        if found is not None:
            logger.info("codec files of model %r from %s: %s", self.model, found.folder,
                        ", ".join(sorted(p.name for p in _files_of(found))))
        return _share_predictors(out)

    @property
    def remote_method(self) -> str:
        """The codec chunks are written to the remote store with ("" = raw): LMCache's
        ``remote_serde`` ("naive" means raw; any other value names a codec method)."""
        serde = (self.remote_serde or "").strip()
        return "" if serde.lower() in RAW_SERDES else serde

    def remote_settings(self) -> Any:
        """The RemoteSettings of ``remote_url`` (None without one): extra_config's
        remote_key_prefix, remote_ttl_seconds, remote_pool_size and remote_timeout_seconds."""
        if not self.remote_url:
            return None
        from .storage.remote import RemoteSettings

        x = self.extra_config
        return RemoteSettings(url=self.remote_url, key_prefix=str(x.get("remote_key_prefix", "kvmesh:")),
                              ttl_seconds=int(x.get("remote_ttl_seconds", 0)),
                              pool_size=int(x.get("remote_pool_size", 16)),
                              timeout_seconds=float(x.get("remote_timeout_seconds", 5.0)))

    @property
    def remote_write_through(self) -> bool:
        """extra_config.remote_write_through (default true): stores to the default location also go
        to the remote store (once per chunk key), as LMCache writes through to its remote backend."""
        return bool(self.extra_config.get("remote_write_through", True))

    @property
    def min_free_disk_bytes(self) -> int:
        """extra_config.min_free_disk_size (GiB, default 0.05): below this much free space on the
        filesystem of ``local_disk`` the agent reports itself unhealthy."""
        return int(float(self.extra_config.get("min_free_disk_size", DEFAULT_MIN_FREE_DISK_GIB)) * GIB)

    @property
    def max_tokens(self) -> int:
        return int(self.extra_config.get("max_tokens", DEFAULT_MAX_TOKENS))

    def worker_port(self, worker_id: int) -> int:
        """The gRPC port of worker ``worker_id``: its entry of ``lmcache_worker_ports``.

        A single port (LMCache's scalar form) serves worker 0 and counts up for the other ranks;
        0 stays 0 (a free port for every rank).
        """
        ports = self.lmcache_worker_ports
        if not ports:
            return DEFAULT_WORKER_PORT + worker_id
        if worker_id < len(ports):
            return ports[worker_id]
        if len(ports) == 1:
            return 0 if ports[0] == 0 else ports[0] + worker_id
        raise ConfigError(f"lmcache_worker_ports has {len(ports)} ports {ports}; worker {worker_id} has none")

    def p2p_port(self, worker_id: int) -> int | None:
        ports = self.p2p_init_ports
        if not ports:
            return None
        if worker_id < len(ports):
            return ports[worker_id]
        return 0 if ports[0] == 0 else ports[0] + worker_id

    @property
    def host(self) -> str:
        return self.p2p_host or "localhost"


def _files_of(found: Any) -> list[Path]:
    return [p for p in (found.key_profile, *found.predictors.values(), *found.schedules.values()) if p is not None]


def _share_predictors(options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One object per distinct predictor (by its id): the methods that fall back on the default
    level's predictor load it once each; keeping one copy saves ~20 MB a model."""
    seen: dict[bytes, Any] = {}
    for opts in options.values():
        predictor = opts.get("predictor")
        if predictor is not None:
            opts["predictor"] = seen.setdefault(predictor.ident, predictor)
    return options


# How each key is read: a parser taking the yaml value (or the environment's string) and the key.
def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"config key {key!r} must be a boolean (true/false), got {value!r}")


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"config key {key!r} must be a number, got {value!r}")


def _as_opt_str(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    return str(value)


def _as_str(value: Any, key: str) -> str:
    out = _as_opt_str(value, key)
    return "" if out is None else out


def _as_int_list(value: Any, key: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, str):
        items: list[Any] = [v for v in (p.strip() for p in value.split(",")) if v]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    return [_as_int(v, key) for v in items]


def _as_dict(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        # The environment form is a yaml/json mapping, e.g. LMCACHE_EXTRA_CONFIG='{"max_tokens": 8192}'.
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"config key {key!r} must be a mapping: {err}") from err
    if not isinstance(value, dict):
        raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
    return dict(value)


_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "chunk_size": _as_int,
    "local_cpu": _as_bool,
    "max_local_cpu_size": _as_float,
    "local_disk": _as_opt_str,
    "max_local_disk_size": _as_float,
    "remote_url": _as_opt_str,
    "remote_serde": _as_opt_str,
    "save_unfull_chunk": _as_bool,
    "enable_controller": _as_bool,
    "lmcache_instance_id": _as_str,
    "controller_pull_url": _as_opt_str,
    "controller_reply_url": _as_opt_str,
    "lmcache_worker_ports": _as_int_list,
    "lmcache_worker_heartbeat_time": _as_float,
    "enable_p2p": _as_bool,
    "p2p_host": _as_opt_str,
    "p2p_init_ports": _as_int_list,
    "extra_config": _as_dict,
    "model": _as_opt_str,
    "model_files": _as_opt_str,
}
_ALIASES = {"controller_url": "controller_pull_url", "lmcache_worker_port": "lmcache_worker_ports"}


def _disk_path(value: str | None) -> str | None:
    """LMCache accepts ``file:///path`` as well as a plain path for ``local_disk``."""
    if value is None or value == "":
        return None
    if value.startswith("file://"):
        parsed = urlparse(value)
        return (parsed.netloc + parsed.path) or None
    return value


def _validate_remote(cfg: AgentConfig) -> None:
    if cfg.remote_url and not cfg.remote_url.startswith(REMOTE_SCHEMES):
        raise ConfigError(f"config key 'remote_url' must be a Redis/Valkey URL ({', '.join(REMOTE_SCHEMES)}...), "
                          f"got {cfg.remote_url!r}")
    x = cfg.extra_config
    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("remote_ttl_seconds", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
         "a whole number of seconds >= 0 (0: no expiry)"),
        ("remote_pool_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024,
         "a number of connections in 1..1024"),
        ("remote_timeout_seconds", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 600,
         "seconds in (0, 600]"),
        ("remote_key_prefix", lambda v: isinstance(v, str) and len(v) <= 200, "a string of at most 200 characters"),
        ("remote_write_through", lambda v: isinstance(v, bool), "true or false"),
    ]
    for key, ok, what in checks:
        if key in x and not ok(x[key]):
            raise ConfigError(f"config key 'extra_config.{key}' must be {what}, got {x[key]!r}")


def _validate(cfg: AgentConfig) -> None:
    if cfg.chunk_size <= 0:
        raise ConfigError(f"config key 'chunk_size' must be positive, got {cfg.chunk_size}")
    if cfg.max_local_cpu_size < 0:
        raise ConfigError(f"config key 'max_local_cpu_size' must be >= 0 GiB, got {cfg.max_local_cpu_size}")
    if cfg.max_local_disk_size < 0:
        raise ConfigError(f"config key 'max_local_disk_size' must be >= 0 GiB, got {cfg.max_local_disk_size}")
    if cfg.lmcache_worker_heartbeat_time <= 0:
        raise ConfigError("config key 'lmcache_worker_heartbeat_time' must be positive seconds, "
                          f"got {cfg.lmcache_worker_heartbeat_time}")
    for key in ("lmcache_worker_ports", "p2p_init_ports"):
        for port in getattr(cfg, key):
            if not 0 <= port <= 65535:
                raise ConfigError(f"config key {key!r} holds {port}, not a TCP port (0-65535)")
    cfg.local_disk = _disk_path(cfg.local_disk)
    if cfg.local_disk and cfg.max_local_disk_size <= 0:
        raise ConfigError("config key 'max_local_disk_size' must be > 0 GiB when 'local_disk' is set "
                          f"(local_disk={cfg.local_disk!r})")
    floor = cfg.extra_config.get("min_free_disk_size", DEFAULT_MIN_FREE_DISK_GIB)
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or floor < 0:
        raise ConfigError(f"config key 'extra_config.min_free_disk_size' must be a number of GiB >= 0, got {floor!r}")
    _validate_remote(cfg)
    if not cfg.local_cpu and not cfg.local_disk:
        raise ConfigError("no storage location: set 'local_cpu: true' or 'local_disk' with 'max_local_disk_size'")
    if cfg.enable_controller and not cfg.controller_pull_url:
        raise ConfigError("config key 'controller_pull_url' (or 'controller_url') is required when "
                          "'enable_controller' is true")
    if cfg.max_tokens <= 0:
        raise ConfigError(f"config key 'extra_config.max_tokens' must be positive, got {cfg.max_tokens}")


def _security(extra_config: Mapping[str, Any]) -> SecuritySettings:
    """The security settings of ``extra_config`` and the environment; a bad file is a ConfigError."""
    try:
        return SecuritySettings.from_mapping(extra_config)
    except ValueError as err:
        raise ConfigError(f"security settings (extra_config auth_token_file/tls_*_file or KVMESH_* "
                          f"variables): {err}") from None


# Command-line flags (SecuritySettings.add_arguments) -> the extra_config keys they override.
SECURITY_FLAGS = {"auth_token_file": "auth_token_file", "tls_cert": "tls_cert_file", "tls_key": "tls_key_file",
                  "tls_ca": "tls_ca_file", "insecure": "insecure"}


def with_security_flags(config: AgentConfig, args: Any) -> AgentConfig:
    """``config`` with the security flags given on a command line (kvmesh-agent, kvmesh-serve) put over
    its extra_config keys; the flags not given leave the yaml's (or the environment's) values."""
    given = {key: getattr(args, flag) for flag, key in SECURITY_FLAGS.items() if getattr(args, flag, None)}
    if not given:
        return config
    return dataclasses.replace(config, extra_config={**config.extra_config, **given})


def with_model_flags(config: AgentConfig, args: Any) -> AgentConfig:
    """``config`` with ``--model`` / ``--model-files`` put over its ``model`` / ``model_files`` keys."""
    given = {key: getattr(args, key) for key in ("model", "model_files") if getattr(args, key, None)}
    return dataclasses.replace(config, **given) if given else config


def with_model(config: AgentConfig, model: str | None, model_files: str | None = None) -> AgentConfig:
    """``config`` for an engine serving ``model`` (an embedding engine's own name for it): the
    config's own ``model`` key wins (it may name a model the engine knows only by a path), with a
    warning when the two differ; ``model_files`` (when given) replaces the config's folder."""
    changes: dict[str, Any] = {}
    if model and not config.model:
        changes["model"] = model
    elif model and config.model != model:
        logger.warning("the agent config names model %r, the engine serves %r: the codec files are looked up "
                       "for %r", config.model, model, config.model)
    if model_files:
        changes["model_files"] = model_files
    return dataclasses.replace(config, **changes) if changes else config


# An engine's connector config (vLLM's kv_transfer_config "kv_connector_extra_config") -> the agent key.
ENGINE_MODEL_KEYS = {"kvmesh_model": "model", "kvmesh_model_files": "model_files"}


def engine_agent_config(config: AgentConfig, served_model: str | None,
                        connector_extra: Mapping[str, Any] | None = None) -> AgentConfig:
    """The agent config of an engine's connector (vLLM's): the engine's model name (``vllm serve
    MODEL``'s MODEL, a Hugging Face id or a local path, looked up as given) fills ``model`` unless
    the config names one; the connector's extra config ``kvmesh_model`` / ``kvmesh_model_files``
    override both."""
    config = with_model(config, served_model)
    given = {key: str(connector_extra[name]) for name, key in ENGINE_MODEL_KEYS.items()
             if connector_extra and connector_extra.get(name)}
    return dataclasses.replace(config, **given) if given else config


def config_from_dict(raw: Mapping[str, Any], env: Mapping[str, str] | None = None,
                     source: str | None = None) -> AgentConfig:
    """An ``AgentConfig`` from a yaml mapping, with ``LMCACHE_<KEY>`` overrides from ``env``."""
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in raw.items():
        name = _ALIASES.get(str(key), str(key))
        if name not in _PARSERS:
            unknown.append(str(key))
            continue
        if name in values:
            logger.warning("config key %s is given twice (through an alias); using %s", name, key)
        values[name] = _PARSERS[name](value, str(key))
    for key in (*_PARSERS, *_ALIASES):
        env_value = (env or {}).get(ENV_PREFIX + key.upper())
        if env_value is not None:
            name = _ALIASES.get(key, key)
            values[name] = _PARSERS[name](env_value, ENV_PREFIX + key.upper())
    if unknown:
        logger.warning("unknown config keys in %s (ignored): %s; known keys: %s",
                       source or "config", ", ".join(unknown), ", ".join(sorted(_PARSERS)))
    return AgentConfig(**values, unknown_keys=unknown, source=source)


def load_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] = os.environ) -> AgentConfig:
    """The configuration from ``path`` (else ``$LMCACHE_CONFIG_FILE``, else defaults) plus env overrides."""
    if path is None:
        path = env.get(ENV_CONFIG_FILE) or None
    raw: Any = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read config file {str(p)!r}: {err.strerror or err}") from err
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid yaml: {err}") from err
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys, got {type(raw).__name__}")
    return config_from_dict(raw, env, source=str(path) if path is not None else None)
