"""Read ``sparkd.toml`` and its ``models.d/*.toml`` drop-ins into a ``Config``.

Loading is all-or-nothing: either every file is valid and a complete ``Config``
comes back, or ``ConfigError`` lists every problem found in every file.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ..fixups.profiles import BUILTIN_PROFILES, DEFAULT_PROFILE, Profile, expand_tables
from .imagemarks import keep_sleep_off
from .schema import (
    KV_CACHE_FLAG,
    ClusterConfig,
    Config,
    ContainerDefaults,
    EngineCacheConfig,
    EngineConfig,
    GpuConfig,
    ImageConfig,
    LifecycleConfig,
    LogConfig,
    ModelConfig,
    PeerConfig,
    PodmanConfig,
    ServerConfig,
    WeightsConfig,
    WorkerConfig,
)
from .validate import ConfigError, Problem, build, describe, key_path
from .values import MODEL_NAME, PEER_URL, listen_error, parse_listen, volume_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_PATH = Path("/etc/sparkd/sparkd.toml")
DROPIN_DIR = "models.d"
DROPIN_SECTIONS = ("models", "images")

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
    "weights": WeightsConfig,
}
# Sections made of named tables ([peers.<name>]), besides [models.<name>].
NAMED_TABLES = {"peers": PeerConfig, "workers": WorkerConfig}
LOCAL_NODE = "local"
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
    named: dict[str, Any] = {}
    for name, table in main.items():
        if name in ("models", "profiles", "images"):
            continue
        if name in NAMED_TABLES:
            named[name] = _build_named(NAMED_TABLES[name], name, table, str(path), problems)
            continue
        if name not in SECTIONS:
            known = sorted([*SECTIONS, *NAMED_TABLES, "models", "profiles", "images"])
            problems.append(Problem(str(path), key_path(name), "one of the sections " + ", ".join(known), f"unknown section {name!r}"))
            continue
        sections[name] = build(SECTIONS[name], table, file=str(path), path=(name,), problems=problems)

    defaults = sections.get("defaults") or ContainerDefaults()
    documents = _documents(path, main, problems)
    model_tables = _collect_tables(documents, "models", "model", problems)
    images = _build_images(_collect_tables(documents, "images", "image", problems), problems)
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
        images=images,
        profiles=_build_profiles(path, main.get("profiles", {}), problems),
        cluster_configured="cluster" in main,
        source=str(path),
    )
    problems.extend(check(config, {name: file for name, (file, _) in model_tables.items()}))
    if problems:
        raise ConfigError(problems)
    return keep_sleep_off(config)


def _build_named(cls: type, section: str, tables: Any, file: str, problems: list[Problem]) -> dict[str, Any]:
    if not isinstance(tables, dict):
        problems.append(Problem(file, section, f"tables [{section}.<name>]", describe(tables)))
        return {}
    built: dict[str, Any] = {}
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


def _documents(path: Path, main: dict[str, Any], problems: list[Problem]) -> list[tuple[str, dict[str, Any]]]:
    """The main file and its drop-ins, each with its path; a drop-in holds only models and images."""
    sources = [(str(path), main)]
    dropins = path.parent / DROPIN_DIR
    if dropins.is_dir():
        for dropin in sorted(dropins.glob("*.toml")):
            document = _read_toml(dropin, problems)
            if document is None:
                continue
            for name in document:
                if name not in DROPIN_SECTIONS:
                    problems.append(Problem(
                        str(dropin), key_path(name), 'only [models.<name>] and [images."<image>"] tables in a drop-in',
                        f"section {name!r}",
                    ))
            sources.append((str(dropin), document))
    return sources


def _collect_tables(
    sources: list[tuple[str, dict[str, Any]]], section: str, noun: str, problems: list[Problem],
) -> dict[str, tuple[str, Any]]:
    """The ``[section.<name>]`` tables of every file, each with the file it came from; each name once."""
    found: dict[str, tuple[str, Any]] = {}
    for file, document in sources:
        tables = document.get(section, {})
        if not isinstance(tables, dict):
            problems.append(Problem(file, section, f"tables [{section}.<name>]", describe(tables)))
            continue
        for name, table in tables.items():
            if name in found:
                problems.append(
                    Problem(file, key_path(section, name), f"each {noun} defined once", f"a second definition (first in {found[name][0]})")
                )
                continue
            found[name] = (file, table)
    return found


def _build_images(tables: dict[str, tuple[str, Any]], problems: list[Problem]) -> dict[str, ImageConfig]:
    built: dict[str, ImageConfig] = {}
    for name, (file, table) in tables.items():
        if not name.strip() or any(c.isspace() or not c.isprintable() for c in name):
            problems.append(Problem(file, key_path("images", name), "an image reference, e.g. localhost/sparkd/vllm-gb10:v1", describe(name)))
            continue
        image = build(ImageConfig, table, file=file, path=("images", name), problems=problems, fixed={"name": name})
        if image is not None:
            built[name] = image
    return built


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
    model = build(ModelConfig, merged, file=file, path=path, problems=problems, fixed={"name": name, "source": file})
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


Add = Callable[..., None]
"""``add(key, expected, found, file=<main file>)``: report one problem."""


def check(config: Config, model_files: dict[str, str]) -> list[Problem]:
    """Checks across fields and sections, after every value has its type and met its own constraints
    (declared on the schema, checked by the builder)."""
    problems: list[Problem] = []

    def add(key: str, expected: str, found: str, file: str = config.source) -> None:
        problems.append(Problem(file, key, expected, found))

    _check_profiles(config, add)
    _check_queue(config, add)
    _check_peers(config, add)
    _check_cluster(config, add)
    _check_workers(config, add)
    _check_models(config, model_files, add)
    return problems


def _check_profiles(config: Config, add: Add) -> None:
    for name, profile in config.profiles.items():
        where = key_path("profiles", name)
        if profile.context_margin < 0:
            add(f"{where}.context_margin", "zero or a positive number of tokens", describe(profile.context_margin))
        if profile.default_max_tokens is not None and profile.default_max_tokens < 1:
            add(f"{where}.default_max_tokens", "a positive number of tokens", describe(profile.default_max_tokens))
        if profile.thinking_default is not None and not profile.thinking_flag:
            add(f"{where}.thinking_default", "thinking_flag set too (e.g. \"enable_thinking\")", "thinking_flag unset")
        if profile.thinking_flag is not None and not profile.thinking_flag.strip():
            add(f"{where}.thinking_flag", "a chat_template_kwargs key such as enable_thinking", "an empty string")


def _check_queue(config: Config, add: Add) -> None:
    queue_body_bytes, max_body_bytes = config.lifecycle.queue_body_bytes, config.server.max_body_bytes
    if queue_body_bytes < max_body_bytes:
        # Otherwise a body the server accepts could never wait, even in an empty queue.
        add("lifecycle.queue_body_bytes", f"at least server.max_body_bytes ({max_body_bytes})", describe(queue_body_bytes))


def _check_peers(config: Config, add: Add) -> None:
    for name, peer in config.peers.items():
        if name == config.cluster.name:
            add(f"{key_path('peers', name)}", f"a peer other than this node (cluster.name is {name!r})", describe(name))
        if PEER_URL.match(peer.url) and peer.url.startswith("http://") and not peer.insecure:
            add(
                f"{key_path('peers', name)}.url",
                "an https:// URL: the peer key travels with every heartbeat (put the peer's sparkd behind TLS, "
                "or set insecure = true in this table to send it in clear text on a network you trust)",
                describe(peer.url),
            )


def _check_cluster(config: Config, add: Add) -> None:
    cluster = config.cluster
    if cluster.lease_timeout_s <= cluster.heartbeat_s:
        add("cluster.lease_timeout_s", f"more than cluster.heartbeat_s ({cluster.heartbeat_s})", describe(cluster.lease_timeout_s))


def _check_workers(config: Config, add: Add) -> None:
    budget = config.gpu.memory_budget
    for name, worker in config.workers.items():
        where = key_path("workers", name)
        if not 0 < worker.gpu_memory <= budget:
            add(
                f"{where}.gpu_memory", f"this node's share for the worker: more than 0, at most gpu.memory_budget ({budget})",
                describe(worker.gpu_memory),
            )
        for volume in worker.volumes:
            problem = volume_error(volume)
            if problem:
                add(f"{where}.volumes", "host_path:container_path[:ro]", f"{volume!r} ({problem})")
        if not config.cluster_configured:
            add(f"{where}", "a [cluster] table too: this node grants worker leases only with one", "no [cluster] table")


def _check_models(config: Config, model_files: dict[str, str], add: Add) -> None:
    listen_ports = {parse_listen(address)[1] for address in config.server.listen if listen_error(address) is None}
    ports: dict[int, str] = {}
    names: dict[str, str] = {}
    for name, model in config.models.items():
        model_add = partial(_add_to_model, add, key_path("models", name), model_files.get(name, config.source))
        _check_claims(config, model, model_add)
        _check_port(model, ports, listen_ports, model_add)
        _check_nodes(config, model, model_add, add)
        if model.profile is not None and model.profile not in config.profiles:
            model_add(
                "profile",
                f"one of the profiles {', '.join(sorted(config.profiles))} (or a [profiles.<name>] table); no profile means {DEFAULT_PROFILE!r}",
                describe(model.profile),
            )
        _check_names(model, names, model_add)


def _add_to_model(add: Add, where: str, file: str, key: str, expected: str, found: str) -> None:
    add(f"{where}.{key}", expected, found, file)


def _check_claims(config: Config, model: ModelConfig, model_add: Add) -> None:
    budget = config.gpu.memory_budget
    if model.gpu_memory < 0 or (0 < budget <= 1 and model.gpu_memory > budget):
        model_add("gpu_memory", f"a fraction between 0 and gpu.memory_budget ({budget})", describe(model.gpu_memory))
    if not 0 <= model.sleep_gpu_memory <= max(model.gpu_memory, 0):
        model_add("sleep_gpu_memory", f"between 0 and the model's gpu_memory ({model.gpu_memory})", describe(model.sleep_gpu_memory))
    if model.kv_cache_bytes is not None and any(arg.split("=")[0] == KV_CACHE_FLAG for arg in model.args):
        model_add("kv_cache_bytes", f"either kv_cache_bytes or {KV_CACHE_FLAG} in args, not both", describe(model.kv_cache_bytes))
    if model.sleep_level is not None and not model.sleep_mode:
        model_add("sleep_level", "set together with sleep_mode = true", describe(model.sleep_level))


def _check_port(model: ModelConfig, ports: dict[int, str], listen_ports: set[int], model_add: Add) -> None:
    """A model's own host port is no other model's and not a listener's (its range is checked on the schema)."""
    if model.port is None or not 1 <= model.port <= 65535:
        return
    if model.port in ports:
        model_add("port", "a host port no other model uses", f"{model.port}, already used by model {ports[model.port]!r}")
    elif model.port in listen_ports:
        model_add("port", "a host port sparkd itself does not listen on", describe(model.port))
    else:
        ports[model.port] = model.name


def _check_nodes(config: Config, model: ModelConfig, model_add: Add, add: Add) -> None:
    if not model.nodes:
        return
    this_node = {LOCAL_NODE, config.cluster.name} - {""}
    unknown = [n for n in model.nodes if n not in this_node and n not in config.peers]
    if not model.spans and (model.parallel == "none" or LOCAL_NODE not in model.nodes):
        _check_placement_nodes(config, model, unknown, model_add)
        return
    if unknown or LOCAL_NODE not in model.nodes or len(set(model.nodes)) != len(model.nodes):
        model_add(
            "nodes",
            f"distinct node names: {LOCAL_NODE!r} (this node, the head) and [peers.<name>] entries",
            describe(list(model.nodes)) + (f" (unknown: {', '.join(unknown)})" if unknown else ""),
        )
    if len(model.nodes) > 1 and model.port is None:
        model_add("port", "a host port (a multi-node model's head runs on the host network)", "nothing")
    if len(model.nodes) > 1 and not config.cluster.address:
        add("cluster.address", f"this node's cluster-network address (model {model.name} spans nodes)", "an empty string")


def _check_placement_nodes(config: Config, model: ModelConfig, unknown: list[str], model_add: Add) -> None:
    """Nodes that may each run the model whole: this node (``local`` or ``cluster.name``) and peers, each once."""
    names = [LOCAL_NODE if n == config.cluster.name else n for n in model.nodes]
    if unknown or len(set(names)) != len(names):
        peers = ", ".join(sorted(config.peers)) or "none configured"
        model_add(
            "nodes",
            f"distinct node names that may run the model: {LOCAL_NODE!r} (this node"
            + (f", also called {config.cluster.name!r}" if config.cluster.name else "")
            + f") or the name of a [peers.<name>] table (peers: {peers})",
            describe(list(model.nodes)) + (
                f" (unknown: {', '.join(unknown)}; add a [peers.<name>] table for each, or remove it)" if unknown else " (a node twice)"
            ),
        )


def _check_names(model: ModelConfig, names: dict[str, str], model_add: Add) -> None:
    """The model's name and aliases name no other model (``names``: every name and alias so far)."""
    for alias in (model.name, *model.aliases):
        if alias in names and names[alias] != model.name:
            model_add("aliases", "names no other model or alias uses", f"{alias!r}, already the name of {names[alias]!r}")
        elif not MODEL_NAME.match(alias):
            model_add("aliases", "names of letters, digits, '.', '_' or '-'", describe(alias))
        names[alias] = model.name
