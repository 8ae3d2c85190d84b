"""A pull as a load stage: what status, ETAs and a waiting stream's comments show while it runs."""

from __future__ import annotations

from ..engine.progress import DOWNLOAD_PHASE, LoadProgress
from .disk import human
from .service import PullJob


def pull_progress(job: PullJob) -> LoadProgress:
    rate = f", {human(job.rate_bps)}/s" if job.rate_bps else ""
    line = f"pulling {job.repo}: {human(job.done_bytes)} of {human(job.total_bytes)}{rate}"
    return LoadProgress(phase=DOWNLOAD_PHASE, fraction=job.fraction, line=line, eta_s=job.eta_s)
