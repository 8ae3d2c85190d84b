"""The mount check of ``sparkd check-config``: volumes that would hide an image's own files."""

from __future__ import annotations

from ..config import Config


def report(config: Config) -> None:
    """Print a warning per mount that hides image content; a note when Podman cannot tell.

    Warnings only: the configuration is valid, and a model whose image is not built
    yet must not make check-config fail.
    """
    from podman import PodmanClient

    from ..runtime.imagepaths import check_mounts

    try:
        with PodmanClient(base_url=config.podman.url, timeout=30) as client:
            result = check_mounts(client, config, config.enabled_models())
    except Exception as error:  # noqa: BLE001 - an absent socket is a requests ConnectionError, a refusal an APIError
        print(f"  note: could not check the models' mounts against their images: Podman at {config.podman.url} did not answer ({error})")
        return
    for hidden in result.hidden:
        print(
            f"  warning: model {hidden.model}: volume {hidden.volume!r} hides {hidden.path}, which holds {hidden.what} "
            f"in image {hidden.image}; mount elsewhere, or leave the default out with "
            f"skip_default_volumes = [{hidden.path!r}] in [models.{hidden.model}]"
        )
    for unchecked in result.unchecked:
        print(f"  note: could not check the mounts of {', '.join(unchecked.models)} against {unchecked.image}: {unchecked.reason}")
