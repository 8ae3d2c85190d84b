"""What a model's container looks like: rendered from its config, hashed, labelled.

The spec hash covers everything that changes the engine's behaviour (image,
command, env, mounts, devices, limits, ports).  It deliberately leaves out the
engine's internal API key and a dynamically allocated host port: both are chosen
when the container is created and read back from it, so they never make a
container look stale.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from .. import encodingfiles
from ..cluster.containersettings import for_cluster
from ..config import Config, ModelConfig
from ..config.schema import KV_CACHE_FLAG, SLEEP_MODE_ENV, SLEEP_MODE_FLAG

LABEL_MANAGED = "io.sparkd.managed"
LABEL_MODEL = "io.sparkd.model"
LABEL_SPEC = "io.sparkd.spec"
LABEL_KEY_ENV = "io.sparkd.key_env"
LABEL_INSTANCE = "io.sparkd.instance"
DEFAULT_INSTANCE = "default"
UNLIMITED = 2**64 - 1  # Podman rejects -1 for "unlimited" ulimits.
ENGINE_CACHE_DIR = "engine-cache"


def container_name(model: str, instance: str = DEFAULT_INSTANCE) -> str:
    return f"sparkd-{model}" if instance == DEFAULT_INSTANCE else f"sparkd-{instance}-{model}"


def instance_filter(instance: str) -> dict[str, str]:
    """Podman filter for one daemon's containers (podman-py stringifies dict values, so no lists)."""
    return {"label": f"{LABEL_INSTANCE}={instance}"}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    model: str
    instance: str
    image: str
    command: tuple[str, ...]
    env: dict[str, str]
    engine_port: int
    host_port: int | None
    """None: allocated from ``defaults.port_range`` when the container is created."""
    key_env: str
    """The env variable through which the engine receives its internal API key."""
    mounts: tuple[Mount, ...] = ()
    devices: tuple[str, ...] = ()
    shm_size: str | None = None
    ulimits: tuple[tuple[str, int], ...] = ()
    entrypoint: tuple[str, ...] = ()
    """Replaces the image's entrypoint when set."""
    network: str = "bridge"
    """``host`` for multi-node containers: Ray and NCCL need the cluster network itself."""
    cap_add: tuple[str, ...] = ()
    cache_root: str = ""
    """Host directory holding the engine caches (``<state_dir>/engine-cache``)."""
    caches: tuple[str, ...] = ()
    """Directories inside the container kept in ``cache_root/<image key>/`` across re-creation."""

    @property
    def spec_hash(self) -> str:
        canonical = asdict(self)
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def all_labels(self) -> dict[str, str]:
        return {
            LABEL_MANAGED: "true",
            LABEL_INSTANCE: self.instance,
            LABEL_MODEL: self.model,
            LABEL_SPEC: self.spec_hash,
            LABEL_KEY_ENV: self.key_env,
        }

    def cache_mounts(self, image_key: str) -> tuple[Mount, ...]:
        """The cache directories of this spec for the image ``image_key`` (its id, known at create time).

        Keyed by image, not by model: models of one image share their compiled
        kernels, and another image (another vLLM, Triton or CUDA) never sees them.
        """
        if not self.caches:
            return ()
        base = f"{self.cache_root}/{image_key}"
        return tuple(Mount(f"{base}/{target.strip('/').replace('/', '_')}", target) for target in self.caches)

    def create_kwargs(self, host_port: int | None, engine_key: str, image_key: str = "") -> dict[str, Any]:
        """Keyword arguments for podman-py's ``containers.create``."""
        mounts = self.mounts + (self.cache_mounts(image_key) if image_key else ())
        kwargs: dict[str, Any] = {
            "image": self.image,
            "name": self.name,
            "labels": self.all_labels(),
            "environment": {**self.env, self.key_env: engine_key},
            "volumes": {m.source: {"bind": m.target, "mode": "ro" if m.read_only else "rw"} for m in mounts},
            "devices": list(self.devices),
            "ulimits": [{"Name": name, "Soft": value, "Hard": value} for name, value in self.ulimits],
        }
        if self.network == "host":
            kwargs["network_mode"] = "host"  # the engine listens on host_port itself
        else:
            kwargs["ports"] = {f"{self.engine_port}/tcp": ("127.0.0.1", host_port)}
        if self.cap_add:
            kwargs["cap_add"] = list(self.cap_add)
        if self.entrypoint:
            kwargs["entrypoint"] = list(self.entrypoint)
        if self.command:
            kwargs["command"] = list(self.command)
        if self.shm_size:
            kwargs["shm_size"] = self.shm_size
        return kwargs


def parse_volume(volume: str) -> Mount:
    parts = volume.split(":")
    read_only = len(parts) == 3 and "ro" in parts[2].split(",")
    return Mount(source=parts[0], target=parts[1], read_only=read_only)


def engine_flags(model: ModelConfig) -> tuple[str, ...]:
    """The vLLM flags the model's settings imply, unless its args give them already."""
    given = {arg.split("=")[0] for arg in model.args}
    flags: list[str] = []
    if model.kv_cache_bytes is not None and KV_CACHE_FLAG not in given:
        flags += [KV_CACHE_FLAG, str(model.kv_cache_bytes)]
    if model.sleep_mode and SLEEP_MODE_FLAG not in given:
        flags.append(SLEEP_MODE_FLAG)
    return tuple(flags)


def render(config: Config, model: ModelConfig, role: str | None = None) -> ContainerSpec:
    """The container spec of ``model`` under ``config``.

    ``role`` is ``head`` for a model spanning several nodes (the default when its
    ``nodes`` name more than one) or ``worker`` for a peer's Ray worker.
    """
    devices = tuple(config.gpu.devices) if model.gpu else ()
    mounts = [parse_volume(v) for v in model.volumes]
    env = dict(model.env)
    if model.sleep_mode:
        env.setdefault(SLEEP_MODE_ENV, "1")
    if model.hf_model:
        # sparkd pulls these weights before every start (weights.service): the engine never needs the hub.
        env.setdefault("HF_HUB_OFFLINE", "1")
    if model.encodings:
        source = encodingfiles.directory(config.server.state_dir)
        mounts += [Mount(str(source / e.file), f"{encodingfiles.CONTAINER_DIR}/{e.file}", read_only=True) for e in encodingfiles.ENCODINGS]
        env.setdefault(encodingfiles.ENV, encodingfiles.CONTAINER_DIR)
    fields: dict[str, Any] = dict(
        name=container_name(model.name, config.server.instance),
        model=model.name,
        instance=config.server.instance,
        image=model.image,
        command=tuple(model.command) + tuple(model.args) + engine_flags(model),
        env=dict(sorted(env.items())),
        engine_port=model.engine_port,
        host_port=model.port,
        key_env=model.engine_key_env,
        mounts=tuple(mounts),
        devices=devices + tuple(model.devices),
        shm_size=model.shm_size or None,
        ulimits={name: UNLIMITED if value == -1 else value for name, value in model.ulimits.items()},
        entrypoint=tuple(model.entrypoint),
        cache_root=f"{config.server.state_dir.rstrip('/')}/{ENGINE_CACHE_DIR}",
        caches=tuple(config.engine_cache.paths) if model.engine_cache else (),
    )
    role = role or ("head" if model.spans else None)
    if role is not None:
        fields = for_cluster(fields, config, model, role)
    fields["ulimits"] = tuple(sorted(fields["ulimits"].items()))
    return ContainerSpec(**fields)
