"""``sparkd doctor``: check the host before (or while) sparkd serves.

Each check says what it found; a failing one says what to run to fix it.  The
exit code is 1 when any check failed, so scripts and the installer can rely on it.
"""

from __future__ import annotations

import errno
import json
import shutil
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__, encodingfiles
from ..cluster.peers import PeerError, in_clear_text, load_peers
from ..config import Config, parse_listen
from ..hardware import cdi
from ..weights.cache import NoHostCache, cache_dirs, presence
from ..weights.disk import human

MIN_FREE_DISK_GB = 50


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    message: str
    fix: str = ""
    warning: bool = False
    """A finding that does not stop sparkd from serving (e.g. low disk)."""

    def render(self) -> str:
        word = "PASS" if self.ok else ("WARN" if self.warning else "FAIL")
        line = f"{word:<5} {self.name:<10} {self.message}"
        return line + (f"\n{'':16} fix: {self.fix}" if self.fix and not self.ok else "")


def check_podman(config: Config) -> list[Check]:
    from podman import PodmanClient

    try:
        with PodmanClient(base_url=config.podman.url, timeout=10) as client:
            version = client.version().get("Version", "?")
    except Exception as error:  # noqa: BLE001 - any failure means "not reachable"
        return [
            Check(
                "podman",
                False,
                f"Podman does not answer at {config.podman.url} ({type(error).__name__}: {error})",
                "sudo systemctl enable --now podman.socket (or fix [podman] url in sparkd.toml)",
            )
        ]
    return [Check("podman", True, f"Podman {version} answers at {config.podman.url}")]


def check_gpu(config: Config) -> list[Check]:
    gpu_models = [m.name for m in config.enabled_models() if m.gpu]
    if not gpu_models:
        return [Check("gpu", True, "no enabled model needs a GPU")]
    known, source = cdi.known_devices()
    missing = [d for d in config.gpu.devices if d not in known]
    if not missing:
        return [Check("gpu", True, f"CDI devices {', '.join(config.gpu.devices)} are known ({source})")]
    fix = "install the NVIDIA Container Toolkit, then: sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"
    return [
        Check(
            "gpu",
            False,
            f"no NVIDIA CDI spec provides {', '.join(missing)} ({source} found {len(known)} device(s)); "
            f"{len(gpu_models)} enabled model(s) need it, e.g. {gpu_models[0]}",
            fix + "; or disable GPU models and use the CPU demo model smollm2-135m-cpu",
        )
    ]


def check_images(config: Config) -> list[Check]:
    from podman import PodmanClient

    needed: dict[str, list[str]] = {}
    for model in config.enabled_models():
        needed.setdefault(model.image, []).append(model.name)
    checks = []
    try:
        with PodmanClient(base_url=config.podman.url, timeout=10) as client:
            for image, models in sorted(needed.items()):
                if client.images.exists(image):
                    checks.append(Check("image", True, f"{image} is present (used by {', '.join(models)})"))
                else:
                    checks.append(Check("image", False, f"{image} is missing (needed by {', '.join(models)})", image_fix(image)))
    except Exception as error:  # noqa: BLE001 - any failure means "cannot list", said as a failed check
        checks.append(Check("image", False, f"cannot list images: {error}", "fix the podman check first"))
    return checks


def image_fix(image: str) -> str:
    from ..imagerecipes import recipe_for

    recipe = recipe_for(image)
    if recipe is not None:
        return f"sparkd images build {recipe.name}   (about {recipe.build_minutes} min)"
    if image.startswith("nvcr.io/"):
        return f"podman login nvcr.io (NGC API key), then: podman pull {image}"
    return f"podman pull {image}"


def check_encodings(config: Config) -> list[Check]:
    users = [m.name for m in config.enabled_models() if m.encodings]
    if not users:
        return []
    found = encodingfiles.problems(config.server.state_dir)
    if found:
        return [Check("encodings", False, "; ".join(found) + f" (needed by {', '.join(users)})", "sudo sparkd encodings fetch")]
    return [Check("encodings", True, f"tiktoken encodings verified in {encodingfiles.directory(config.server.state_dir)}")]


def check_disk(config: Config) -> list[Check]:
    path = Path(config.server.state_dir)
    while not path.exists():
        path = path.parent
    free_gb = shutil.disk_usage(path).free / 1e9
    ok = free_gb >= MIN_FREE_DISK_GB
    return [
        Check(
            "disk",
            ok,
            f"{free_gb:.0f} GB free under {config.server.state_dir} (model weights and caches)",
            f"free space: models need tens of GB each (at least {MIN_FREE_DISK_GB} GB recommended)",
            warning=not ok,
        )
    ]


def check_weights(config: Config) -> list[Check]:
    """Enabled models whose weights (``hf_model``) are not complete in the cache their container mounts."""
    missing, present = [], 0
    for model in config.enabled_models():
        if not model.hf_model:
            continue
        try:
            found = presence(cache_dirs(model), model.hf_model)
        except NoHostCache as error:
            missing.append((model.name, str(error)))
            continue
        if found.state == "complete":
            present += 1
        else:
            detail = found.state + (f", {human(found.size)} so far" if found.size else "")
            missing.append((model.name, f"{model.name} ({model.hf_model}: {detail})"))
    if not missing:
        return [Check("weights", True, f"the weights of {present} enabled models are in the cache")] if present else []
    names = " ".join(name for name, _ in missing)
    pulls = "they are pulled before their first start" if config.lifecycle.auto_pull else "lifecycle.auto_pull is off: their requests get a 503"
    return [
        Check(
            "weights", False, f"enabled models without their weights: {'; '.join(text for _, text in missing)} ({pulls})",
            f"sudo sparkctl pull {names}", warning=config.lifecycle.auto_pull,
        )
    ]


def check_listen(config: Config) -> list[Check]:
    checks = []
    for address in config.server.listen:
        host, port = parse_listen(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    checks.append(Check("port", False, f"cannot listen on {address}: {error.strerror}", "fix server.listen"))
                elif _answers_as_sparkd(host, port):
                    checks.append(Check("port", True, f"{address} is served by a running sparkd"))
                else:
                    checks.append(
                        Check("port", False, f"{address} is in use by another program", f"sudo ss -ltnp 'sport = :{port}' shows which; free it or change server.listen")
                    )
                continue
        checks.append(Check("port", True, f"{address} is free to listen on"))
    return checks


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the error it is for doctor: urllib would resend every header (the peer key) to the new place."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _open(request: urllib.request.Request | str, timeout: float, context: ssl.SSLContext | None = None) -> Any:
    handlers: list[urllib.request.BaseHandler] = [_NoRedirects()]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers).open(request, timeout=timeout)


def _answers_as_sparkd(host: str, port: int) -> bool:
    shown = f"[{host}]" if ":" in host else host
    try:
        with _open(f"http://{shown}:{port}/healthz", timeout=3) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def check_peers(config: Config) -> list[Check]:
    """Every peer answers with our version and accepts the key it made for this head."""
    checks = []
    for name, peer_config in config.peers.items():
        try:
            peer = load_peers({name: peer_config})[name]
        except PeerError as error:
            checks.append(Check("peer", False, str(error), f"write the key peer {name} made for this head (role peer) into {peer_config.key_file}, owner sparkd, mode 0600"))
            continue
        if in_clear_text(peer_config):
            checks.append(Check(
                "peer", False, f"peer {name} at {peer_config.url} is reached without TLS (insecure = true): its key crosses the network in clear text",
                "put the peer's sparkd behind TLS and use an https:// URL", warning=True,
            ))
        if peer.ssl is True:
            context = None  # the default verification
        elif peer.ssl is False:
            context = ssl._create_unverified_context()  # noqa: S323 - the operator turned verification off
        else:
            context = peer.ssl
        request = urllib.request.Request(peer_config.url.rstrip("/") + "/api/version", headers={"Authorization": f"Bearer {peer.key}"})  # noqa: S310 - a peer's http(s) URL, checked when the config loads
        try:
            with _open(request, timeout=10, context=context) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            if 300 <= error.code < 400:
                target = (error.headers.get("Location") or "")[:200]
                checks.append(Check(
                    "peer", False, f"peer {name} at {peer_config.url} answered {error.code}, a redirect to {target!r} (not followed: the key goes to the configured URL only)",
                    "set the peer's url to the address it redirects to",
                ))
                continue
            fix = "the peer does not accept the key: copy the key with role \"peer\" it made for this head" if error.code in (401, 403) else "check the peer's journal"
            checks.append(Check("peer", False, f"peer {name} at {peer_config.url} answered {error.code}", fix))
            continue
        except (urllib.error.URLError, OSError, ValueError) as error:
            checks.append(Check("peer", False, f"peer {name} at {peer_config.url} is unreachable: {error}", "check the URL, the network and that sparkd runs there"))
            continue
        version = answer.get("sparkd") if isinstance(answer, dict) else None
        if version != __version__:
            checks.append(Check("peer", False, f"peer {name} runs sparkd {version}, this node {__version__}", "install the same sparkd version on every node"))
        else:
            checks.append(Check("peer", True, f"peer {name} at {peer_config.url} runs sparkd {version} and accepts its key"))
    return checks


CHECKS: tuple[Callable[[Config], list[Check]], ...] = (
    check_podman, check_gpu, check_images, check_encodings, check_disk, check_listen, check_peers,
    check_weights,
)


def run(config: Config) -> int:
    results = [check for probe in CHECKS for check in probe(config)]
    for check in results:
        print(check.render())
    failed = [c for c in results if not c.ok and not c.warning]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0
