"""The build context `sparkd images build` sends to Podman: a temporary copy of a recipe,
plus the CA bundle the host's pip trusts, for recipes that ask for one.

Hosts behind a TLS-inspecting proxy (CI machines, company networks) trust the proxy's
CA through pip's settings (``PIP_CERT``, ...). A build sees none of the host's files,
and Podman's API build has no volume mounts, so the bundle travels in the build context:
a recipe with a ``build-ca/`` directory gets ``build-ca/pip-ca.pem`` in its temporary
copy, and COPYs it into its builder stage only. The recipe itself never holds a CA (its
``build-ca/`` has a ``.keep`` only), and the copy is deleted after the build.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

CA_DIRECTORY = "build-ca"
CA_FILE_NAME = "pip-ca.pem"
PLACEHOLDER = ".keep"
# The order pip itself gives them: its own setting first, then the ones its
# requests/ssl layers read.
CA_VARIABLES = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")


class BuildContextError(RuntimeError):
    """The build context cannot be made; the message says why and what to do."""


@dataclass(frozen=True)
class PipCa:
    path: Path
    variable: str
    """The environment variable that named it."""


def wants_pip_ca(recipe_dir: Path) -> bool:
    return (recipe_dir / CA_DIRECTORY).is_dir()


def host_pip_ca(environ: Mapping[str, str]) -> PipCa | None:
    """The CA bundle the host's pip uses, if its environment names one."""
    for variable in CA_VARIABLES:
        value = environ.get(variable, "").strip()
        if not value:
            continue
        path = Path(value)
        if not path.is_file():
            what = "a directory" if path.is_dir() else "nothing"
            raise BuildContextError(
                f"{variable}={value} names {what}, not a CA bundle file: point {variable} at the bundle pip "
                f"should trust inside the build (a PEM file), or unset it"
            )
        return PipCa(path, variable)
    return None


def _refuse_a_carried_ca(recipe_dir: Path) -> None:
    carried = sorted(p.name for p in (recipe_dir / CA_DIRECTORY).iterdir() if p.name != PLACEHOLDER)
    if carried:
        raise BuildContextError(
            f"{recipe_dir / CA_DIRECTORY} holds {', '.join(carried)}: a recipe must not carry a machine's CA; "
            f"remove it (sparkd adds the host's pip CA to a temporary copy of the recipe for each build)"
        )


@contextlib.contextmanager
def build_context(recipe_dir: Path, ca: PipCa | None) -> Iterator[Path]:
    """A temporary copy of ``recipe_dir`` holding ``ca`` as build-ca/pip-ca.pem; deleted afterwards."""
    if wants_pip_ca(recipe_dir):
        _refuse_a_carried_ca(recipe_dir)
    with tempfile.TemporaryDirectory(prefix="sparkd-build-") as work:
        context = Path(work) / recipe_dir.name
        # copy2 keeps modification times: Podman's layer cache then sees the same files.
        shutil.copytree(recipe_dir, context, symlinks=True)
        if ca is not None and wants_pip_ca(recipe_dir):
            bundle = context / CA_DIRECTORY / CA_FILE_NAME
            shutil.copy2(ca.path, bundle)
            bundle.chmod(0o644)
        yield context
