"""The hub, through huggingface_hub: a repository's file list with sizes, and one file into a cache.

Blocking calls (huggingface_hub is synchronous): the daemon runs them in worker
threads only.  A file is written where huggingface_hub's cache layout keeps it
(``blobs/<etag>``, linked from ``snapshots/<commit>/<name>``), so vLLM and
``huggingface_hub`` itself find it offline.  sparkd downloads into its own
``blobs/<etag>.incomplete`` and resumes it with a ``Range`` request after an
interrupted pull: huggingface_hub's own downloads start each file over in a new
temporary file, which would cost a 60 GB model's transfer again.  A file whose
ETag is a SHA-256 (the hub's large files) is checked against it before it is used.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.file_download import http_get
from huggingface_hub.utils._headers import build_hf_headers

from .cache import repo_folder
from .selection import RepoFile

SHA256 = re.compile(r"^[0-9a-f]{64}$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
ETAG = re.compile(r"^[0-9A-Za-z._-]{1,128}$")
"""An ETag becomes a file name in the cache: anything else from the hub is refused."""
DEFAULT_ENDPOINT = "https://huggingface.co"


class HubError(Exception):
    """The hub refused or could not be reached; the message says which repository and what to do."""


class PullCancelled(Exception):
    """The daemon stops: a download ends at its next write (its partial file stays, to be resumed)."""


class StoppableFile(io.FileIO):
    """A partial blob opened for appending whose writes end the download once ``stop`` is set, so a
    worker thread never holds the daemon's shutdown for the rest of a 30 GB file."""

    def __init__(self, path: Path, stop: threading.Event) -> None:
        super().__init__(path, "ab")
        self._stop = stop

    def write(self, data: Any) -> int:
        if self._stop.is_set():
            raise PullCancelled(str(self.name))
        return super().write(data)


@dataclass(frozen=True)
class Listing:
    commit: str
    files: list[RepoFile]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def link(blob: Path, pointer: Path) -> None:
    """``snapshots/<commit>/<name>`` -> ``blobs/<etag>``, relative, as huggingface_hub makes them."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    temporary = pointer.with_name(pointer.name + ".sparkd-link")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(os.path.relpath(blob, pointer.parent))
    temporary.replace(pointer)


def write_ref(cache: Path, repo: str, revision: str, commit: str) -> None:
    refs = cache / repo_folder(repo) / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / revision).write_text(commit)


@dataclass(frozen=True)
class HubClient:
    endpoint: str | None
    token: str | None = field(default=None, repr=False)
    stop: threading.Event = field(default_factory=threading.Event)
    """Set when the daemon stops: the running download ends at its next write."""

    def listing(self, repo: str, revision: str = "main") -> Listing:
        try:
            info = HfApi(endpoint=self.endpoint, token=self.token).model_info(repo, revision=revision, files_metadata=True)
        except GatedRepoError:
            raise HubError(
                f"repository {repo} is gated: accept its terms on the hub and put a token that may read it in the "
                f"weights.token_file (mode 0600)"
            ) from None
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise HubError(f"repository {repo} (revision {revision}) is not on the hub, or needs a token") from None
        except Exception as error:  # noqa: BLE001 - the hub client raises its own, its HTTP library's and OS errors: each is this pull's failure
            raise HubError(f"could not list repository {repo} on the hub: {error}") from None
        commit = info.sha or ""
        if not COMMIT.match(commit):
            # It names a folder of the cache: anything but a commit hash from the hub is refused.
            raise HubError(f"the hub answered no commit hash for {repo} ({commit[:60]!r}); check weights.endpoint")
        files = [RepoFile(s.rfilename, s.size or 0) for s in info.siblings or []]
        return Listing(commit=commit, files=files)

    def download(self, repo: str, name: str, commit: str, cache: Path) -> Path:
        """The file in ``cache`` (downloaded, or resumed from an earlier pull's partial blob); its snapshot path."""
        pointer = cache / repo_folder(repo) / "snapshots" / commit / name
        if pointer.exists():
            return pointer
        try:
            self._fetch(repo, name, commit, cache, pointer)
        except (HubError, PullCancelled):
            raise
        except Exception as error:  # noqa: BLE001 - as in listing: any failure of one file fails the pull, with its reason
            raise HubError(f"could not download {name} of {repo}: {error}") from None
        return pointer

    def _fetch(self, repo: str, name: str, commit: str, cache: Path, pointer: Path) -> None:
        url = hf_hub_url(repo, name, revision=commit, endpoint=self.endpoint)
        metadata = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint)
        etag = metadata.etag or ""
        if not ETAG.match(etag):
            raise HubError(f"the hub sent no usable ETag for {name} of {repo} ({etag[:40]!r}); try again later")
        blob = cache / repo_folder(repo) / "blobs" / etag
        if not blob.exists():
            self._transfer(metadata.location, blob, metadata.size, name)
            if SHA256.match(etag) and _sha256(blob.with_name(etag + ".incomplete")) != etag:
                blob.with_name(etag + ".incomplete").unlink()
                raise HubError(f"{name} of {repo} arrived corrupted (its SHA-256 is not the hub's); pull it again")
            blob.with_name(etag + ".incomplete").replace(blob)
        link(blob, pointer)

    def _transfer(self, location: str, blob: Path, size: int | None, name: str) -> None:
        partial = blob.with_name(blob.name + ".incomplete")
        partial.parent.mkdir(parents=True, exist_ok=True)
        # The token goes to the hub only, never to the storage host a file's location may redirect to.
        same_host = urlsplit(location).hostname == urlsplit(self.endpoint or DEFAULT_ENDPOINT).hostname
        headers = build_hf_headers(token=self.token if same_host else False)
        with StoppableFile(partial, self.stop) as handle:
            try:
                # Two models naming one repository share its cache: one writer per partial blob.
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise HubError(f"{name}: another pull is downloading this file into {blob.parent} now; "
                               "pull again once it is done") from None
            resume = handle.tell()
            if size is not None and resume > size:
                handle.truncate(0)
                resume = 0
            http_get(location, handle, resume_size=resume, headers=headers, expected_size=size, displayed_filename=name)
        if size is not None and partial.stat().st_size != size:
            raise HubError(f"{name}: the hub sent {partial.stat().st_size} of its {size} bytes; pull again to resume")
