"""The configuration as typed, frozen dataclasses.

Every field here is a key a user can write in ``sparkd.toml`` (section = dataclass,
key = field name).  Defaults are the shipped defaults; the seed project's values are
kept where they were sound (idle stop 20 min, min uptime 30 s, start timeout 15 min,
64 MiB bodies, the CORS origins of its nginx gateway).

``validate.py`` reads these annotations to check a TOML document, so the annotation
of a field *is* its schema: keep them to the small set of types it understands
(bool, int, float, str, Literal, Optional, tuple[X, ...], dict[str, X], nested
dataclasses), optionally wrapped in ``Annotated[type, *constraints]`` (``constraints.py``).
Checks across fields (a port no other model uses, a claim within the budget) are in
``load.py``, one function per section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from ..fixups.profiles import BUILTIN_PROFILES, Profile
from .constraints import (
    AbsolutePath,
    AtLeastZero,
    Check,
    Each,
    Entries,
    Explained,
    Fraction,
    Port,
    Positive,
    PositiveSeconds,
    PositiveTokens,
    distinct,
    matches,
    not_blank,
    not_empty,
    positive,
)
from .origins import pattern_error
from .validate import describe
from .values import (
    MODEL_NAME,
    PEER_URL,
    SHM_SIZE,
    listen_error,
    ulimit_problem,
    volume_error,
)

MIB = 1024 * 1024
KV_CACHE_FLAG = "--kv-cache-memory-bytes"
"""vLLM's flag for a KV cache of a fixed size in bytes (``kv_cache_bytes``)."""
SLEEP_MODE_FLAG = "--enable-sleep-mode"
SLEEP_MODE_ENV = "VLLM_SERVER_DEV_MODE"
"""vLLM serves /sleep and /wake_up only in its development mode."""
MAX_LEASE_TIMEOUT_S = 300.0

PositiveFloat = Annotated[float, Positive]
PositiveInt = Annotated[int, Positive]
AtLeastZeroFloat = Annotated[float, AtLeastZero]
AtLeastZeroInt = Annotated[int, AtLeastZero]
GIB = 1024 * MIB
PortNumber = Annotated[int, Port]
ImageReference = Annotated[str, not_blank("an image reference, e.g. localhost/sparkd/vllm-gb10:v1")]
ListenAddresses = Annotated[
    tuple[str, ...],
    not_empty("at least one host:port address", "an empty array"),
    Each(Explained(listen_error, "host:port, e.g. 127.0.0.1:8009 or [::1]:8009")),
    distinct("distinct addresses", "the same address twice"),
]
OriginPatterns = Annotated[
    tuple[str, ...], Each(Explained(pattern_error, "an origin pattern like http://localhost:* or vscode-webview://*"))
]
ModelVolumes = Annotated[tuple[str, ...], Each(Explained(volume_error, "host_path:/container/path[:ro|rw]"))]
Ulimits = Annotated[dict[str, int], Entries(ulimit_problem)]
# Named here, not written inline in an annotation: typing.get_type_hints evaluates a
# class's annotations with the class namespace as globals, so a lambda written there
# could not see this module's names when it runs.
PortRange = Check(
    lambda ports: len(ports) == 2 and all(1 <= p <= 65535 for p in ports) and ports[0] <= ports[1],
    "[first, last] host ports within 1-65535",
    lambda ports: describe(list(ports)),
)
UrlPath = Check(lambda path: path.startswith("/"), "an absolute URL path such as /health")
ApiPath = Check(lambda path: path.startswith("/v1/") and not path.endswith("/"), "an API path such as /v1/chat/completions")
ContainerDirectory = Check(
    lambda path: path.startswith("/") and ":" not in path and ".." not in path.split("/"),
    "an absolute directory inside the container, without ':' or '..'",
)
SleepLevel = Check(lambda level: level in (1, 2), "1 (weights offloaded to CPU memory) or 2 (weights discarded)")
LeaseTimeoutCap = Check(lambda value: value <= MAX_LEASE_TIMEOUT_S, f"at most {MAX_LEASE_TIMEOUT_S:.0f} seconds")

OptionalNodeName = Annotated[str, matches(r"^$|" + MODEL_NAME.pattern, "a node name of letters, digits, '.', '_' or '-'")]
QueuePolicy = Literal["queue", "reject"]
LifecycleClass = Literal["normal", "exclusive", "utility", "pinned"]
ToolSupport = Literal["full", "none", "force-required"]
OnShutdown = Literal["stop", "keep"]
LogFormat = Literal["auto", "console", "journal", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
MemoryProbe = Literal["auto", "nvidia-smi", "meminfo", "none"]
AnonymousAccess = Literal["off", "loopback", "any"]
SwapPolicy = Literal["quantum", "fifo"]
Parallelism = Literal["tensor", "pipeline", "none"]
VLLM_API_PATHS = (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages", "/v1/models",
    "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/score", "/v1/rerank", "/v1/classify", "/v1/pooling",
)
"""The API paths a vLLM engine serves (a listed path also covers its sub-paths)."""
TokenizeApi = Literal["vllm", "llama-cpp", "none"]
"""How an engine counts tokens: vLLM's ``/tokenize``, llama-cpp-python's ``/extras/tokenize/count``, or not at all."""
LoadingFeedback = Literal["off", "content", "reasoning"]
"""How a stream that waits for its model shows the wait: SSE comments only (off), or also as answer text or reasoning."""


@dataclass(frozen=True)
class ServerConfig:
    listen: ListenAddresses = ("127.0.0.1:8009",)
    """``host:port`` addresses; ``0.0.0.0:8009`` (or a LAN address) exposes sparkd to the LAN."""
    keys_file: str = "/etc/sparkd/keys.toml"
    anonymous: AnonymousAccess = "off"
    """Requests without a valid key: refused (off), served from loopback only, or from anywhere (see http/auth.py)."""
    cors_origins: OriginPatterns = (
        "http://localhost:*",
        "http://127.0.0.1:*",
        "vscode-webview://*",
    )
    max_body_bytes: PositiveInt = 64 * MIB
    body_timeout_s: PositiveFloat = 120.0
    """A request body must arrive within this time (slow or stalled uploads get a 408); answers are not limited."""
    keepalive_timeout_s: PositiveFloat = 75.0
    """An idle keep-alive connection is closed after this long (nginx's default; aiohttp's own is an hour)."""
    header_timeout_s: PositiveFloat = 10.0
    """A request's line and headers must arrive within this time of the connection opening (or of its
    first byte, on a kept-alive connection), or the connection is closed: slow-header clients hold no slot."""
    max_connections: PositiveInt = 2048
    """Open TCP connections at most (the admin unix socket is not counted); more are closed at once."""
    instance: Annotated[str, matches(MODEL_NAME, "a name of letters, digits, '.', '_' or '-'")] = "default"
    """Names this daemon's containers (``sparkd-<model>``, or ``sparkd-<instance>-<model>``
    otherwise) so several sparkd on one Podman never touch each other's containers."""
    state_dir: Annotated[str, AbsolutePath] = "/var/lib/sparkd"
    runtime_dir: Annotated[str, AbsolutePath] = "/run/sparkd"
    shutdown_grace_s: AtLeastZeroFloat = 30.0
    on_shutdown: OnShutdown = "stop"


@dataclass(frozen=True)
class LogConfig:
    format: LogFormat = "auto"
    """auto = journal priority prefixes under systemd (JOURNAL_STREAM set), console otherwise."""
    level: LogLevel = "info"
    requests: bool = True
    """One ``request_done`` line at info per inference request (key name, model, path, status, ...)."""


@dataclass(frozen=True)
class PodmanConfig:
    url: Annotated[
        str, matches(r"^(unix|http|https|tcp)://.+", "unix:///path/to/podman.sock or http(s)://host:port")
    ] = "unix:///run/podman/podman.sock"
    timeout_s: PositiveFloat = 60.0


@dataclass(frozen=True)
class GpuConfig:
    devices: tuple[str, ...] = ("nvidia.com/gpu=all",)
    """CDI device names given to models with ``gpu = true``."""
    memory_budget: Annotated[float, Fraction] = 0.94
    """Fraction of GPU memory the models may claim together."""
    memory_probe: MemoryProbe = "auto"
    reclaim_timeout_s: PositiveFloat = 30.0
    """Upper bound on waiting for memory to come back after a model stopped."""
    min_free: AtLeastZeroInt = 4 * GIB
    """Bytes of memory that must stay free on unified memory (the ``meminfo`` probe): a model whose
    load or run takes it below this is stopped at once (0 = no guard)."""
    drop_caches_before_load: bool = False
    """On unified memory, drop the page cache before a load whose peak (plus ``min_free``) is more than
    the memory free outright; needs sparkd to run as root with a writable /proc/sys."""
    concurrent_loads: AtLeastZeroInt = 0
    """Models that may load (start or wake) at once; 0 = automatic: one on unified memory, any number
    on discrete GPUs."""


@dataclass(frozen=True)
class LifecycleConfig:
    idle_stop_s: PositiveFloat = 1200.0
    min_uptime_s: AtLeastZeroFloat = 30.0
    start_timeout_s: PositiveFloat = 900.0
    stop_timeout_s: PositiveFloat = 5.0
    probe_interval_s: PositiveFloat = 0.1
    failure_backoff_s: AtLeastZeroFloat = 5.0
    """After a failed start, requests get the failure at once for this long instead of a new start."""
    policy: QueuePolicy = "queue"
    queue_size: PositiveInt = 1024
    queue_timeout_s: PositiveFloat = 900.0
    queue_body_bytes: int = 256 * MIB
    """Request bodies held by waiting requests, in bytes, at most (503 past it); at least server.max_body_bytes."""
    queue_per_key: PositiveInt = 256
    """Waiting requests of one key at most (429 past it), so one client cannot fill the queue."""
    stall_s: AtLeastZeroFloat = 120.0
    """A READY vLLM engine whose token counters do not move this long while it runs requests is
    wedged: it is failed and stopped (0 = never)."""
    swap_policy: SwapPolicy = "quantum"
    """"quantum": a model swapped in for waiters keeps the GPU, while it has work, for its quantum
    (``scheduler/quantum.py``); "fifo": the next waiting model evicts it once its requests are done."""
    swap_cost_factor: AtLeastZeroFloat = 4.0
    """The quantum is max(min_uptime_s, swap_cost_factor x the model's measured load time)."""
    auto_pull: bool = True
    """A start of a model whose weights (``hf_model``) are not in the cache pulls them first; false: the
    request is a 503 naming ``sparkctl pull MODEL``."""


@dataclass(frozen=True)
class EngineConfig:
    """Time limits toward engines and toward clients of engine answers (0 = no limit)."""

    connect_timeout_s: AtLeastZeroFloat = 10.0
    response_head_timeout_s: AtLeastZeroFloat = 3600.0
    """Request sent → the engine's response head; a non-streamed answer's head comes after the whole
    generation, so this is longer than any client waits (the OpenAI SDKs give up after 600 s)."""
    idle_read_timeout_s: AtLeastZeroFloat = 300.0
    """Longest silence between two reads of an engine's answer (a stream's tokens, a body's bytes)."""
    write_stall_timeout_s: AtLeastZeroFloat = 60.0
    """Longest a client may leave a write of the answer blocked (it stopped reading)."""
    readiness_check_s: PositiveFloat = 10.0
    """How often the readiness path of a READY model's engine is probed."""
    unresponsive_fail_s: AtLeastZeroFloat = 60.0
    """A READY model whose engine has not answered its readiness path for this long is failed."""


@dataclass(frozen=True)
class ContainerDefaults:
    """Values every model container gets unless its own table overrides them.

    ``env`` and ``volumes`` are merged with the model's own (the model wins on a clash);
    the other keys are replaced by the model's value when it sets one.
    """

    port_range: Annotated[tuple[int, ...], PortRange] = (18000, 18999)
    """Host ports (published on 127.0.0.1 only) for models without an explicit ``port``."""
    engine_port: int = 8000
    readiness_path: str = "/health"
    shm_size: str = "16g"
    ulimits: dict[str, int] = field(default_factory=lambda: {"memlock": -1, "stack": 67108864})
    env: dict[str, str] = field(default_factory=dict)
    volumes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    name: str
    image: ImageReference
    entrypoint: tuple[str, ...] = ()
    """Replaces the image's entrypoint (empty: keep it)."""
    command: tuple[str, ...] = ()
    """Tokens before ``args`` (e.g. ``["vllm", "serve"]``); empty = the image's entrypoint."""
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    volumes: ModelVolumes = ()
    """``host_path:container_path[:ro]`` entries, added to the defaults' volumes (one
    at the same container path replaces the default's)."""
    skip_default_volumes: tuple[str, ...] = ()
    """Container paths of ``[defaults] volumes`` this model does not get: an image that
    carries its own files there (the CPU demo's ``/models``) must not have them hidden."""
    devices: tuple[str, ...] = ()
    gpu: bool = True
    """Attach ``gpu.devices`` (CDI) to the container."""
    port: Annotated[int | None, Port] = None
    """Host port on 127.0.0.1; unset = the first free port of ``defaults.port_range``."""
    engine_port: PortNumber = 8000
    """The port the engine listens on inside the container (its ``--port``)."""
    readiness_path: Annotated[str, UrlPath] = "/health"
    engine_key_env: str = "VLLM_API_KEY"
    """The env variable through which the engine reads its internal API key."""
    shm_size: Annotated[str, matches(SHM_SIZE, "a size like 16g, 512m or 1073741824")] = "16g"
    ulimits: Ulimits = field(default_factory=dict)
    gpu_memory: float = 0.0
    """The model's claim on the GPU lease (its ``--gpu-memory-utilization``)."""
    max_model_len: Annotated[int | None, PositiveTokens] = None
    tokenize: TokenizeApi = "vllm"
    """The engine's token-count endpoint, used to fit a prompt into ``max_model_len`` exactly."""
    lifecycle: LifecycleClass = "normal"
    sleep_mode: bool = False
    """vLLM's sleep mode: a swap puts the engine to sleep instead of stopping it (sparkd adds
    ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``)."""
    sleep_gpu_memory: float = 0.0
    sleep_level: Annotated[int | None, SleepLevel] = None
    """vLLM's sleep level: 1 keeps the weights in CPU memory (on unified memory: the same pool), 2 discards
    them (reloaded on wake); unset = 2 on unified memory, 1 on discrete GPUs."""
    kv_cache_bytes: Annotated[int | None, positive("number of bytes")] = None
    """The engine's KV cache in bytes (vLLM's ``--kv-cache-memory-bytes``), so its footprint does not
    depend on vLLM's memory profiling, which on unified memory counts other processes' memory."""
    profile: str | None = None
    tools: ToolSupport = "full"
    multimodal: bool = False
    """Accepts images (vision models): client configs advertise image support."""
    aliases: tuple[str, ...] = ()
    hf_model: str | None = None
    enabled: bool = True
    experimental: bool = False
    experimental_reason: str | None = None
    disabled_reason: str | None = None
    notes: tuple[str, ...] = ()
    api_paths: Annotated[tuple[str, ...], Each(ApiPath)] = VLLM_API_PATHS
    """The API paths the model's engine serves: others are refused before the engine (and shown in /v1/models)."""
    nodes: tuple[str, ...] = ()
    """Nodes a model spans (``["local", "<peer>", ...]``): vLLM over a Ray cluster, one worker per peer;
    with ``parallel = "none"`` (or without ``local``) the nodes that may each run it whole (``sparkd/fleet``)."""
    parallel: Parallelism = "tensor"
    """How a multi-node model is split: ``--tensor-parallel-size N`` or ``--pipeline-parallel-size N``;
    ``none``: not split, ``nodes`` are placement candidates."""
    worker_image: str | None = None
    """Image the peers' Ray workers run (default: ``image``); a peer whose ``[workers.<model>]`` names another refuses."""
    idle_stop_s: Annotated[float | None, PositiveSeconds] = None
    start_timeout_s: Annotated[float | None, PositiveSeconds] = None
    """Overrides ``lifecycle.start_timeout_s`` for a model known to load slowly."""
    encodings: bool = False
    """Mount the tiktoken encodings GPT-OSS needs (``sparkd encodings fetch``) read-only."""
    engine_cache: bool = True
    """Keep the engine's compile caches (``[engine_cache] paths``) across container re-creation."""
    loading_feedback: LoadingFeedback = "off"
    """A stream that waits for this model always gets SSE comments saying why (loading, waking,
    queued); "content" or "reasoning" also sends that text as answer or reasoning deltas, which chat
    UIs display (a key's own ``loading_feedback`` wins)."""
    source: str = ""
    """The file the model's table came from (not a TOML key): warnings name the line to change there."""

    @property
    def spans(self) -> bool:
        """Runs across its ``nodes`` at once (a head here, Ray workers on the peers), not whole on one of them."""
        return len(self.nodes) > 1 and self.parallel != "none" and "local" in self.nodes


@dataclass(frozen=True)
class EngineCacheConfig:
    """Caches an engine fills while it starts, kept in ``<state_dir>/engine-cache/<image id>/``.

    vLLM's torch.compile cache, torch inductor's compiled kernels (its default
    TORCHINDUCTOR_CACHE_DIR, /tmp/torchinductor_<user>), and on GPU images Triton's,
    FlashInfer's and the CUDA JIT cache would otherwise die with the container, so a re-created container
    (new args, ``sparkctl prepare``) would compile everything again. Keyed by the
    image id: models of one image share them, another vLLM build never reads them.
    """

    paths: Annotated[tuple[str, ...], Each(ContainerDirectory)] = (
        "/root/.cache/vllm",
        "/tmp/torchinductor_root",  # noqa: S108 - a path inside the container, not on this host
        "/root/.triton",
        "/root/.cache/flashinfer",
        "/root/.nv/ComputeCache",
    )
    """Directories inside the container to persist (absolute paths); empty = none."""


@dataclass(frozen=True)
class PeerConfig:
    name: str
    url: Annotated[str, matches(PEER_URL, "the peer sparkd's URL, e.g. https://spark2.lan:8443")]
    """The peer sparkd's URL, ``https://spark2.lan:8443`` (``http://`` only with ``insecure = true``)."""
    key_file: str
    """File holding the key the peer made for this head (role ``peer``); owned by sparkd, mode 0600."""
    address: Annotated[str, not_empty("the peer's cluster-network address", "an empty string")]
    """The peer's address on the cluster network (its ConnectX-7 link)."""
    tls_ca: str | None = None
    tls_verify: bool = True
    insecure: bool = False
    """Allow an ``http://`` URL: the peer key then crosses the network in clear text (logged as a warning at start-up)."""


WORKER_COMMAND = ("ray", "start", "--block", "--address={head_address}:{ray_port}", "--node-ip-address={node_address}")


@dataclass(frozen=True)
class WorkerConfig:
    """A Ray worker this node runs for a multi-node model whose head is another sparkd (``[workers.<model>]``).

    Everything the container is comes from here: a head only names the model and
    sends its address and ports, which fill ``{head_address}``, ``{ray_port}`` and
    ``{head_port}`` in ``command``; ``{node_address}`` is this node's ``cluster.address``.
    """

    name: str
    image: ImageReference
    command: Annotated[
        tuple[str, ...], not_empty("the worker's command, e.g. the default ray start ...", "an empty list")
    ] = WORKER_COMMAND
    gpu_memory: float = 0.0
    """This node's GPU share for the worker (more than 0, at most ``gpu.memory_budget``)."""
    env: dict[str, str] = field(default_factory=dict)
    volumes: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    gpu: bool = True
    heads: tuple[str, ...] = ()
    """Names of the peer keys (keys file) that may ask for this worker; empty = every key with role ``peer``."""


@dataclass(frozen=True)
class ImageConfig:
    """What the catalog knows of one engine image (``[images."<image reference>"]``)."""

    name: str
    wake_crash: str = ""
    """Why waking a model on this image is unsafe (a known crash, e.g. vLLM issue #50011 on GB10):
    when set, ``sleep_mode`` stays off for its models, with this reason in their notes.  Set it to
    ``""`` once a fixed build of the image is verified."""


@dataclass(frozen=True)
class ClusterConfig:
    """This node's part in models that span several Sparks."""

    address: str = ""
    """This node's cluster-network address (VLLM_HOST_IP; the Ray head address for the peers)."""
    interface: str = ""
    """Cluster network interface (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, UCX_NET_DEVICES)."""
    ib_hca: str = ""
    """InfiniBand/RoCE device for NCCL (NCCL_IB_HCA)."""
    devices: tuple[str, ...] = ("/dev/infiniband",)
    ray_port: PortNumber = 6379
    heartbeat_s: PositiveFloat = 5.0
    lease_timeout_s: Annotated[float, LeaseTimeoutCap] = 30.0
    """A worker lease whose head sent no heartbeat for this long is released (and vice versa); at most 300 s."""
    max_leases_per_head: PositiveInt = 4
    """Worker leases one head (one peer key) may hold on this node at a time."""
    name: OptionalNodeName = ""
    """This node's name in ``[models.x] nodes`` lists (besides ``local``), so the nodes of a fleet can share drop-ins."""


@dataclass(frozen=True)
class WeightsConfig:
    """``sparkctl pull`` and the pulls before a start: where the hub is, its token, the disk kept free."""

    token_file: str = "/etc/sparkd/hf-token"  # noqa: S105 - the path of the token file, not a token
    """The Hugging Face token for gated repositories (owner-only, like the keys file); a missing file = no token."""
    reserve_bytes: AtLeastZeroInt = 10 * 1024 * MIB
    """Bytes a pull leaves free on the cache's filesystem: a pull that would take more is refused before it starts."""
    endpoint: str = ""
    """The hub's address (empty: huggingface_hub's own, or ``HF_ENDPOINT``): a mirror or a test hub."""


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    podman: PodmanConfig = field(default_factory=PodmanConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    defaults: ContainerDefaults = field(default_factory=ContainerDefaults)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=lambda: dict(BUILTIN_PROFILES))
    """Fixup profiles by name: the built-in ones plus the ``[profiles.<name>]`` tables."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    engine_cache: EngineCacheConfig = field(default_factory=EngineCacheConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    peers: dict[str, PeerConfig] = field(default_factory=dict)
    workers: dict[str, WorkerConfig] = field(default_factory=dict)
    images: dict[str, ImageConfig] = field(default_factory=dict)
    cluster_configured: bool = False
    """Whether the file has a ``[cluster]`` table (not a TOML key): worker-lease routes exist only then."""
    source: str = "<defaults>"
    """The file the configuration was read from (not a TOML key)."""

    def enabled_models(self) -> list[ModelConfig]:
        return [m for m in self.models.values() if m.enabled]
