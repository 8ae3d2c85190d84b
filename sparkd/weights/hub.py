"""The hub, through huggingface_hub: a repository's file list with sizes, and one file into a cache.

Blocking calls (huggingface_hub is synchronous): the daemon runs them in worker
threads only.  A download resumes a file's ``.incomplete`` blob left by an earlier,
interrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from .selection import RepoFile


class HubError(Exception):
    """The hub refused or could not be reached; the message says which repository and what to do."""


@dataclass(frozen=True)
class Listing:
    commit: str
    files: list[RepoFile]


@dataclass(frozen=True)
class HubClient:
    endpoint: str | None
    token: str | None

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
        files = [RepoFile(s.rfilename, s.size or 0) for s in info.siblings or []]
        return Listing(commit=info.sha or revision, files=files)

    def download(self, repo: str, name: str, commit: str, cache: Path) -> Path:
        try:
            path = hf_hub_download(repo, name, revision=commit, cache_dir=cache, token=self.token, endpoint=self.endpoint)
        except Exception as error:  # noqa: BLE001 - as in listing: any failure of one file fails the pull, with its reason
            raise HubError(f"could not download {name} of {repo}: {error}") from None
        return Path(str(path))
