"""The build context `sparkd images build` sends: a copy of the recipe plus the host's pip CA."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sparkd.buildcontext import (
    CA_DIRECTORY,
    CA_FILE_NAME,
    BuildContextError,
    build_context,
    host_pip_ca,
)
from sparkd.commands.images import build_recipe
from sparkd.imagerecipes import containerfiles_dir, recipe_named


def bundle(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text(f"-----BEGIN CERTIFICATE-----\n{name}\n-----END CERTIFICATE-----\n")
    return path


def recipe_dir(tmp_path: Path, with_ca_directory: bool = True) -> Path:
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "Containerfile").write_text("FROM scratch\n")
    (recipe / "patches").mkdir()
    (recipe / "patches" / "a.patch").write_text("patch\n")
    if with_ca_directory:
        (recipe / CA_DIRECTORY).mkdir()
        (recipe / CA_DIRECTORY / ".keep").write_text("")
    return recipe


def test_pip_cert_wins_then_requests_then_ssl_cert_file(tmp_path: Path) -> None:
    pip, requests, ssl = bundle(tmp_path, "pip"), bundle(tmp_path, "requests"), bundle(tmp_path, "ssl")
    everything = {"PIP_CERT": str(pip), "REQUESTS_CA_BUNDLE": str(requests), "SSL_CERT_FILE": str(ssl)}
    assert host_pip_ca(everything) == host_pip_ca({"PIP_CERT": str(pip)})
    found = host_pip_ca(everything)
    assert found is not None and (found.path, found.variable) == (pip, "PIP_CERT")
    found = host_pip_ca({**everything, "PIP_CERT": ""})
    assert found is not None and (found.path, found.variable) == (requests, "REQUESTS_CA_BUNDLE")
    found = host_pip_ca({"SSL_CERT_FILE": str(ssl)})
    assert found is not None and (found.path, found.variable) == (ssl, "SSL_CERT_FILE")
    assert host_pip_ca({"HOME": "/root"}) is None


def test_a_setting_naming_no_bundle_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BuildContextError, match=r"PIP_CERT=.*/missing\.pem names nothing, not a CA bundle file: point PIP_CERT"):
        host_pip_ca({"PIP_CERT": str(tmp_path / "missing.pem"), "SSL_CERT_FILE": str(bundle(tmp_path, "ssl"))})
    with pytest.raises(BuildContextError, match=r"REQUESTS_CA_BUNDLE=.* names a directory"):
        host_pip_ca({"REQUESTS_CA_BUNDLE": str(tmp_path)})


def test_the_copy_holds_the_ca_and_the_recipe_is_untouched(tmp_path: Path) -> None:
    recipe = recipe_dir(tmp_path)
    ca = host_pip_ca({"PIP_CERT": str(bundle(tmp_path, "proxy-ca"))})
    before = sorted(str(p.relative_to(recipe)) for p in recipe.rglob("*"))
    with build_context(recipe, ca) as context:
        assert context != recipe and context.name == recipe.name
        assert (context / CA_DIRECTORY / CA_FILE_NAME).read_bytes() == (tmp_path / "proxy-ca").read_bytes()
        assert (context / CA_DIRECTORY / CA_FILE_NAME).stat().st_mode & 0o777 == 0o644
        assert (context / "patches" / "a.patch").read_text() == "patch\n"
        # Same modification times: Podman's layer cache sees the same files as last build.
        assert (context / "Containerfile").stat().st_mtime == (recipe / "Containerfile").stat().st_mtime
    assert not context.exists()
    assert sorted(str(p.relative_to(recipe)) for p in recipe.rglob("*")) == before


def test_no_ca_leaves_the_placeholder_only(tmp_path: Path) -> None:
    with build_context(recipe_dir(tmp_path), None) as context:
        assert sorted(p.name for p in (context / CA_DIRECTORY).iterdir()) == [".keep"]


def test_a_recipe_without_the_ca_directory_gets_no_ca(tmp_path: Path) -> None:
    ca = host_pip_ca({"PIP_CERT": str(bundle(tmp_path, "proxy-ca"))})
    with build_context(recipe_dir(tmp_path, with_ca_directory=False), ca) as context:
        assert not (context / CA_DIRECTORY).exists()
        assert not list(context.rglob(CA_FILE_NAME))


def test_a_recipe_carrying_a_ca_is_refused(tmp_path: Path) -> None:
    recipe = recipe_dir(tmp_path)
    (recipe / CA_DIRECTORY / "corp.pem").write_text("a machine's CA")
    refused = pytest.raises(BuildContextError, match=r"build-ca holds corp\.pem: a recipe must not carry a machine's CA")
    with refused, build_context(recipe, None):
        pass


def test_the_shipped_demo_recipe_carries_no_ca_and_copies_it_into_the_builder_stage_only() -> None:
    recipe = containerfiles_dir() / "smollm2-cpu"
    assert sorted(p.name for p in (recipe / CA_DIRECTORY).iterdir()) == [".keep"]
    assert (recipe / CA_DIRECTORY / ".keep").read_bytes() == b""
    stages = re.split(r"^FROM\s", (recipe / "Containerfile").read_text(), flags=re.MULTILINE)
    builder = [s for s in stages if s.startswith("${BUILDER_IMAGE} AS wheels")]
    assert len(builder) == 1 and "COPY build-ca/ /build/ca/" in builder[0]
    others = [s for s in stages[1:] if s is not builder[0]]
    assert others and all("build-ca" not in s and "/build/ca" not in s and "from=wheels,source=/build" not in s for s in others)


def test_build_recipe_stops_before_podman_on_a_bad_ca_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = recipe_named("smollm2-cpu")
    assert recipe is not None
    # No Podman client: the error comes before anything is asked of Podman.
    ok = build_recipe(None, recipe, recipe_dir(tmp_path), {}, "localhost/x:y", environ={"PIP_CERT": "/nonexistent/ca.pem"})
    assert not ok
    assert "cannot build localhost/x:y: PIP_CERT=/nonexistent/ca.pem names nothing" in capsys.readouterr().err
