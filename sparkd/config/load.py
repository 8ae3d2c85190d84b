"""Read ``sparkd.toml`` and its ``models.d/*.toml`` drop-ins into a ``Config``.

Loading is all-or-nothing: either every file is valid and a complete ``Config``
comes back, or ``ConfigError`` lists every problem found in every file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import sys
from pathlib import Path
from typing import Any

from ..fixups.profiles import BUILTIN_PROFILES, DEFAULT_PROFILE, Profile, expand_tables
from .schema import (
    ClusterConfig,
    Config,
    ContainerDefaults,
    EngineConfig,
    EngineCacheConfig,
    GpuConfig,
    LifecycleConfig,
    LogConfig,
    ModelConfig,
    PeerConfig,
    PodmanConfig,
    ServerConfig,
    WorkerConfig,
)
from .origins import pattern_error
from .validate import ConfigError, Problem, build, describe, key_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_PATH = Path("/etc/sparkd/sparkd.toml")
DROPIN_DIR = "models.d"

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHM_SIZE = re.compile(r"^[0-9]+[kmgKMG]?$")
KNOWN_ULIMITS = frozenset({"core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack"})
SECTIONS = {
    "server": ServerConfig,
    "log": LogConfig,
    "podman": PodmanConfig,
    "gpu": GpuConfig,
    "lifecycle": LifecycleConfig,
    "engine": EngineConfig,
    "defaults": ContainerDefaults,
    "cluster": ClusterConfig,
    "engine_cache": EngineCacheConfig,
}
# Sections made of named tables ([peers.<name>]), besides [models.<name>].
NAMED_TABLES = {"peers": PeerConfig, "workers": WorkerConfig}
LOCAL_NODE = "local"
MAX_LEASE_TIMEOUT_S = 300.0
# Keys a model inherits from [defaults]; env and volumes are merged, the rest replaced.
INHERITED = ("engine_port", "readiness_path", "shm_size", "ulimits")


def load_config(path: str | Path = DEFAULT_PATH) -> Config:
    """Load and validate the configuration at ``path`` plus its drop-ins."""
    path = Path(path)
    problems: list[Problem] = []
    main = _read_toml(path, problems)
    if main is None:
        raise ConfigError(problems)

    sections: dict[str, Any] = {}
    named: dict[str, dict[str, Any]] = {}
    for name, table in main.items():
        if name in ("models", "profiles"):
            continue
        if name in NAMED_TABLES:
            named[name] = _build_named(NAMED_TABLES[name], name, table, str(path), problems)
            continue
        if name not in SECTIONS:
            known = sorted([*SECTIONS, *NAMED_TABLES, "models", "profiles"])
            problems.append(Problem(str(path), key_path(name), "one of the sections " + ", ".join(known), f"unknown section {name!r}"))
            continue
        sections[name] = build(SECTIONS[name], table, file=str(path), path=(name,), problems=problems)

    defaults = sections.get("defaults") or ContainerDefaults()
    model_tables = _collect_model_tables(path, main, problems)
    models: dict[str, ModelConfig] = {}
    for name, (file, table) in model_tables.items():
        model = _build_model(name, table, defaults, file, problems)
        if model is not None:
            models[name] = model

    # Cross-field checks run on every part that was built, so one pass reports
    # type mistakes and semantic ones together.
    config = Config(
        **{name: section for name, section in sections.items() if section is not None},
        **named,
        models=models,
        profiles=_build_profiles(path, main.get("profiles", {}), problems),
        cluster_configured="cluster" in main,
        source=str(path),
    )
    problems.extend(check(config, {name: file for name, (file, _) in model_tables.items()}))
    if problems:
        raise ConfigError(problems)
    return config


def _build_named(cls: type, section: str, tables: Any, file: str, problems: list[Problem]) -> dict[str, Any]:
    if not isinstance(tables, dict):
        problems.append(Problem(file, section, f"tables [{section}.<name>]", describe(tables)))
        return {}
    built = {}
    for name, table in tables.items():
        if not MODEL_NAME.match(name) or name == LOCAL_NODE:
            problems.append(Problem(file, key_path(section, name), f"a name of letters, digits, '.', '_' or '-' (not {LOCAL_NODE!r})", describe(name)))
            continue
        item = build(cls, table, file=file, path=(section, name), problems=problems, fixed={"name": name})
        if item is not None:
            built[name] = item
    return built


def _read_toml(path: Path, problems: list[Problem]) -> dict[str, Any] | None:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        problems.append(Problem(str(path), "(file)", "a readable TOML file", "no such file"))
    except PermissionError:
        problems.append(Problem(str(path), "(file)", "a readable TOML file", "permission denied"))
    except IsADirectoryError:
        problems.append(Problem(str(path), "(file)", "a readable TOML file", "a directory"))
    except tomllib.TOMLDecodeError as error:
        problems.append(Problem(str(path), "(syntax)", "valid TOML", str(error)))
    except UnicodeDecodeError as error:
        problems.append(Problem(str(path), "(file)", "UTF-8 text", str(error)))
    return None


def _collect_model_tables(path: Path, main: dict[str, Any], problems: list[Problem]) -> dict[str, tuple[str, Any]]:
    """Model tables from the main file and the drop-ins, each with the file it came from."""
    found: dict[str, tuple[str, Any]] = {}
    sources = [(str(path), main)]
    dropins = path.parent / DROPIN_DIR
    if dropins.is_dir():
        for dropin in sorted(dropins.glob("*.toml")):
            document = _read_toml(dropin, problems)
            if document is None:
                continue
            for name in document:
                if name != "models":
                    problems.append(Problem(str(dropin), key_path(name), "only [models.<name>] tables in a drop-in", f"section {name!r}"))
            sources.append((str(dropin), document))
    for file, document in sources:
        tables = document.get("models", {})
        if not isinstance(tables, dict):
            problems.append(Problem(file, "models", "tables [models.<name>]", describe(tables)))
            continue
        for name, table in tables.items():
            if name in found:
                problems.append(
                    Problem(file, key_path("models", name), "each model defined once", f"a second definition (first in {found[name][0]})")
                )
                continue
            found[name] = (file, table)
    return found


def _build_profiles(path: Path, tables: Any, problems: list[Problem]) -> dict[str, Profile]:
    """The built-in profiles plus the ``[profiles.<name>]`` tables (which may replace a built-in)."""
    profiles = dict(BUILTIN_PROFILES)
    if not isinstance(tables, dict):
        problems.append(Problem(str(path), "profiles", "tables [profiles.<name>]", describe(tables)))
        return profiles
    expanded, failures = expand_tables(tables)
    for name, reason in failures.items():
        problems.append(Problem(str(path), key_path("profiles", name, "extends"), "a known profile, without cycles", reason))
    for name, table in tables.items():
        if not isinstance(table, dict):
            problems.append(Problem(str(path), key_path("profiles", name), "a table", describe(table)))
        elif name in expanded:
            profile = build(Profile, expanded[name], file=str(path), path=("profiles", name), problems=problems)
            if profile is not None:
                profiles[name] = profile
    return profiles


def _build_model(name: str, table: Any, defaults: ContainerDefaults, file: str, problems: list[Problem]) -> ModelConfig | None:
    path = ("models", name)
    if not MODEL_NAME.match(name):
        problems.append(
            Problem(file, key_path(*path), "a model name of letters, digits, '.', '_' or '-' (at most 64, starting with a letter or digit)", describe(name))
        )
        return None
    if not isinstance(table, dict):
        problems.append(Problem(file, key_path(*path), "a table", describe(table)))
        return None
    merged = dict(table)
    for key in INHERITED:
        merged.setdefault(key, getattr(defaults, key))
    model = build(ModelConfig, merged, file=file, path=path, problems=problems, fixed={"name": name})
    if model is None:
        return None
    return dataclasses.replace(
        model,
        env={**defaults.env, **model.env},
        volumes=_merge_volumes(defaults.volumes, model, file, problems),
    )


def _merge_volumes(defaults: tuple[str, ...], model: ModelConfig, file: str, problems: list[Problem]) -> tuple[str, ...]:
    """The defaults' volumes less the skipped ones, then the model's own; the model's
    volume wins over a default at the same container path (two mounts on one path
    would make Podman refuse the container)."""
    default_targets = {_volume_target(v): v for v in defaults}
    for index, target in enumerate(model.skip_default_volumes):
        if target not in default_targets:
            known = ", ".join(sorted(t for t in default_targets if t)) or "none"
            problems.append(
                Problem(
                    file,
                    f"{key_path('models', model.name)}.skip_default_volumes[{index}]",
                    f"a container path of [defaults] volumes (they mount: {known})",
                    describe(target),
                )
            )
    own_targets = {_volume_target(v) for v in model.volumes}
    kept = [v for v in defaults if _volume_target(v) not in own_targets and _volume_target(v) not in model.skip_default_volumes]
    return tuple(dict.fromkeys(kept + list(model.volumes)))


def _volume_target(volume: str) -> str:
    parts = volume.split(":")
    return parts[1] if len(parts) > 1 else ""


def check(config: Config, model_files: dict[str, str]) -> list[Problem]:
    """Checks across fields and sections, after every value has its type."""
    problems: list[Problem] = []
    main = config.source

    def add(key: str, expected: str, found: str, file: str = main) -> None:
        problems.append(Problem(file, key, expected, found))

    listen_ports = set()
    if not config.server.listen:
        add("server.listen", "at least one host:port address", "an empty array")
    for index, address in enumerate(config.server.listen):
        try:
            listen_ports.add(parse_listen(address)[1])
        except ValueError as error:
            add(f"server.listen[{index}]", "host:port, e.g. 127.0.0.1:8009 or [::1]:8009", f"{address!r} ({error})")
    if len(set(config.server.listen)) != len(config.server.listen):
        add("server.listen", "distinct addresses", "the same address twice")
    for index, origin in enumerate(config.server.cors_origins):
        error = pattern_error(origin)
        if error:
            add(f"server.cors_origins[{index}]", "an origin pattern like http://localhost:* or vscode-webview://*", f"{origin!r} ({error})")
    if not MODEL_NAME.match(config.server.instance):
        add("server.instance", "a name of letters, digits, '.', '_' or '-'", describe(config.server.instance))
    _positive(add, "server.max_body_bytes", config.server.max_body_bytes)
    _positive(add, "server.body_timeout_s", config.server.body_timeout_s)
    for key in ("keepalive_timeout_s", "header_timeout_s", "max_connections"):
        _positive(add, f"server.{key}", getattr(config.server, key))
    for name, profile in config.profiles.items():
        if profile.context_margin < 0:
            add(f"{key_path('profiles', name)}.context_margin", "zero or a positive number of tokens", describe(profile.context_margin))
        if profile.default_max_tokens is not None and profile.default_max_tokens < 1:
            add(f"{key_path('profiles', name)}.default_max_tokens", "a positive number of tokens", describe(profile.default_max_tokens))
        if profile.thinking_default is not None and not profile.thinking_flag:
            add(f"{key_path('profiles', name)}.thinking_default", "thinking_flag set too (e.g. \"enable_thinking\")", "thinking_flag unset")
        if profile.thinking_flag is not None and not profile.thinking_flag.strip():
            add(f"{key_path('profiles', name)}.thinking_flag", "a chat_template_kwargs key such as enable_thinking", "an empty string")
    _at_least_zero(add, "server.shutdown_grace_s", config.server.shutdown_grace_s)
    for key in ("state_dir", "runtime_dir"):
        if not getattr(config.server, key).startswith("/"):
            add(f"server.{key}", "an absolute path", describe(getattr(config.server, key)))

    if not re.match(r"^(unix|http|https|tcp)://.+", config.podman.url):
        add("podman.url", "unix:///path/to/podman.sock or http(s)://host:port", describe(config.podman.url))
    _positive(add, "podman.timeout_s", config.podman.timeout_s)

    budget = config.gpu.memory_budget
    if not 0 < budget <= 1:
        add("gpu.memory_budget", "a fraction of GPU memory in (0, 1]", describe(budget))
    _positive(add, "gpu.reclaim_timeout_s", config.gpu.reclaim_timeout_s)

    lifecycle = config.lifecycle
    for key in ("idle_stop_s", "start_timeout_s", "stop_timeout_s", "probe_interval_s", "queue_timeout_s"):
        _positive(add, f"lifecycle.{key}", getattr(lifecycle, key))
    for key in ("min_uptime_s", "failure_backoff_s"):
        _at_least_zero(add, f"lifecycle.{key}", getattr(lifecycle, key))
    _positive(add, "lifecycle.queue_size", lifecycle.queue_size)
    for key in ("connect_timeout_s", "response_head_timeout_s", "idle_read_timeout_s", "write_stall_timeout_s", "unresponsive_fail_s"):
        _at_least_zero(add, f"engine.{key}", getattr(config.engine, key))
    _positive(add, "engine.readiness_check_s", config.engine.readiness_check_s)
    _positive(add, "lifecycle.queue_per_key", lifecycle.queue_per_key)
    if lifecycle.queue_body_bytes < config.server.max_body_bytes:
        # Otherwise a body the server accepts could never wait, even in an empty queue.
        add("lifecycle.queue_body_bytes", f"at least server.max_body_bytes ({config.server.max_body_bytes})", describe(lifecycle.queue_body_bytes))

    for name, peer in config.peers.items():
        where = key_path("peers", name)
        if not re.match(r"^https?://[^/\s]+", peer.url):
            add(f"{where}.url", "the peer sparkd's URL, e.g. https://spark2.lan:8443", describe(peer.url))
        elif peer.url.startswith("http://") and not peer.insecure:
            add(
                f"{where}.url",
                "an https:// URL: the peer key travels with every heartbeat (put the peer's sparkd behind TLS, "
                "or set insecure = true in this table to send it in clear text on a network you trust)",
                describe(peer.url),
            )
        if not peer.address:
            add(f"{where}.address", "the peer's cluster-network address", "an empty string")
    for index, cache_path in enumerate(config.engine_cache.paths):
        if not cache_path.startswith("/") or ":" in cache_path or ".." in cache_path.split("/"):
            add(f"engine_cache.paths[{index}]", "an absolute directory inside the container, without ':' or '..'", describe(cache_path))
    cluster = config.cluster
    if not 1 <= cluster.ray_port <= 65535:
        add("cluster.ray_port", "a port within 1-65535", describe(cluster.ray_port))
    _positive(add, "cluster.heartbeat_s", cluster.heartbeat_s)
    if cluster.lease_timeout_s <= cluster.heartbeat_s:
        add("cluster.lease_timeout_s", f"more than cluster.heartbeat_s ({cluster.heartbeat_s})", describe(cluster.lease_timeout_s))
    if cluster.lease_timeout_s > MAX_LEASE_TIMEOUT_S:
        add("cluster.lease_timeout_s", f"at most {MAX_LEASE_TIMEOUT_S:.0f} seconds", describe(cluster.lease_timeout_s))
    _positive(add, "cluster.max_leases_per_head", cluster.max_leases_per_head)
    for name, worker in config.workers.items():
        where = key_path("workers", name)
        if not worker.image.strip():
            add(f"{where}.image", "an image reference, e.g. localhost/sparkd/vllm-gb10:v1", "an empty string")
        if not worker.command:
            add(f"{where}.command", "the worker's command, e.g. the default ray start ...", "an empty list")
        if not 0 < worker.gpu_memory <= budget:
            add(f"{where}.gpu_memory", f"this node's share for the worker: more than 0, at most gpu.memory_budget ({budget})", describe(worker.gpu_memory))
        for volume in worker.volumes:
            problem = volume_error(volume)
            if problem:
                add(f"{where}.volumes", "host_path:container_path[:ro]", f"{volume!r} ({problem})")
        if config.workers and not config.cluster_configured:
            add(f"{where}", "a [cluster] table too: this node grants worker leases only with one", "no [cluster] table")

    port_range = config.defaults.port_range
    if len(port_range) != 2 or not all(1 <= p <= 65535 for p in port_range) or port_range[0] > port_range[1]:
        add("defaults.port_range", "[first, last] host ports within 1-65535", describe(list(port_range)))

    ports: dict[int, str] = {}
    names: dict[str, str] = {}
    for name, model in config.models.items():
        file = model_files.get(name, main)
        path = ("models", name)

        def model_add(key: str, expected: str, found: str) -> None:
            add(f"{key_path(*path)}.{key}", expected, found, file)

        if not model.image.strip():
            model_add("image", "an image reference, e.g. localhost/sparkd/vllm-gb10:v1", "an empty string")
        if model.gpu_memory < 0 or (0 < budget <= 1 and model.gpu_memory > budget):
            model_add("gpu_memory", f"a fraction between 0 and gpu.memory_budget ({budget})", describe(model.gpu_memory))
        if not 0 <= model.sleep_gpu_memory <= max(model.gpu_memory, 0):
            model_add("sleep_gpu_memory", f"between 0 and the model's gpu_memory ({model.gpu_memory})", describe(model.sleep_gpu_memory))
        if model.port is not None:
            if not 1 <= model.port <= 65535:
                model_add("port", "a port within 1-65535", describe(model.port))
            elif model.port in ports:
                model_add("port", "a host port no other model uses", f"{model.port}, already used by model {ports[model.port]!r}")
            elif model.port in listen_ports:
                model_add("port", "a host port sparkd itself does not listen on", describe(model.port))
            else:
                ports[model.port] = name
        if not 1 <= model.engine_port <= 65535:
            model_add("engine_port", "a port within 1-65535", describe(model.engine_port))
        if model.nodes:
            unknown = [n for n in model.nodes if n != LOCAL_NODE and n not in config.peers]
            if unknown or LOCAL_NODE not in model.nodes or len(set(model.nodes)) != len(model.nodes):
                model_add(
                    "nodes",
                    f"distinct node names: {LOCAL_NODE!r} (this node, the head) and [peers.<name>] entries",
                    describe(list(model.nodes)) + (f" (unknown: {', '.join(unknown)})" if unknown else ""),
                )
            if len(model.nodes) > 1 and model.port is None:
                model_add("port", "a host port (a multi-node model's head runs on the host network)", "nothing")
            if len(model.nodes) > 1 and not cluster.address:
                add("cluster.address", f"this node's cluster-network address (model {name} spans nodes)", "an empty string")
        for key in ("idle_stop_s", "start_timeout_s"):
            if getattr(model, key) is not None and getattr(model, key) <= 0:
                model_add(key, "a positive number of seconds", describe(getattr(model, key)))
        if model.max_model_len is not None and model.max_model_len <= 0:
            model_add("max_model_len", "a positive number of tokens", describe(model.max_model_len))
        if model.profile is not None and model.profile not in config.profiles:
            model_add(
                "profile",
                f"one of the profiles {', '.join(sorted(config.profiles))} (or a [profiles.<name>] table); no profile means {DEFAULT_PROFILE!r}",
                describe(model.profile),
            )
        for index, api_path in enumerate(model.api_paths):
            if not api_path.startswith("/v1/") or api_path.endswith("/"):
                model_add(f"api_paths[{index}]", "an API path such as /v1/chat/completions", describe(api_path))
        if not model.readiness_path.startswith("/"):
            model_add("readiness_path", "an absolute URL path such as /health", describe(model.readiness_path))
        if not SHM_SIZE.match(model.shm_size):
            model_add("shm_size", "a size like 16g, 512m or 1073741824", describe(model.shm_size))
        for limit, value in model.ulimits.items():
            if limit not in KNOWN_ULIMITS:
                model_add(f"ulimits.{limit}", "one of " + ", ".join(sorted(KNOWN_ULIMITS)), f"unknown ulimit {limit!r}")
            elif value < -1:
                model_add(f"ulimits.{limit}", "a limit >= 0, or -1 for unlimited", describe(value))
        for index, volume in enumerate(model.volumes):
            error = volume_error(volume)
            if error:
                model_add(f"volumes[{index}]", "host_path:/container/path[:ro|rw]", f"{volume!r} ({error})")
        for alias in (name, *model.aliases):
            if alias in names and names[alias] != name:
                model_add("aliases", "names no other model or alias uses", f"{alias!r}, already the name of {names[alias]!r}")
            elif not MODEL_NAME.match(alias):
                model_add("aliases", "names of letters, digits, '.', '_' or '-'", describe(alias))
            names[alias] = name
    return problems


def parse_listen(address: str) -> tuple[str, int]:
    """``host:port`` → (host, port); IPv6 hosts are written in brackets."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError("missing host or port")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not within 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{host!r} is not an IP address") from None
    return host, int(port_text)


def volume_error(volume: str) -> str | None:
    parts = volume.split(":")
    if len(parts) not in (2, 3):
        return "expected two or three ':'-separated parts"
    source, target = parts[0], parts[1]
    if not source:
        return "empty host path"
    if not target.startswith("/"):
        return "the container path must be absolute"
    if len(parts) == 3 and not set(parts[2].split(",")) <= {"ro", "rw", "z", "Z"}:
        return f"unknown option {parts[2]!r}"
    return None


def _positive(add: Any, key: str, value: float) -> None:
    if value <= 0:
        add(key, "a positive number", describe(value))


def _at_least_zero(add: Any, key: str, value: float) -> None:
    if value < 0:
        add(key, "zero or a positive number", describe(value))
