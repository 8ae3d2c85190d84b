"""What the catalog knows of engine images: a known wake crash keeps sleep mode off.

Waking a vLLM engine from sleep has crashed its engine core, and taken whole GB10 hosts
down with it (vLLM issue #50011), on the self-built GB10 images the catalog ships.  A
model on an image whose ``[images."<image>"]`` table names such a crash does not sleep:
a swap stops it instead, and its notes say why.  The mark is data, so the day a fixed
build is verified the operator clears it without waiting for a sparkd release.
"""

from __future__ import annotations

from dataclasses import replace

import structlog

from .schema import Config

log = structlog.get_logger("sparkd.config")


def keep_sleep_off(config: Config) -> Config:
    """``config`` with ``sleep_mode`` off for the models whose image has a known wake crash."""
    models = dict(config.models)
    for name, model in config.models.items():
        image = config.images.get(model.image)
        if not (model.sleep_mode and image is not None and image.wake_crash):
            continue
        log.warning("sleep_mode_kept_off", model=name, image=model.image, reason=image.wake_crash,
                    fix=f'clear [images."{model.image}"].wake_crash once a fixed build is verified')
        models[name] = replace(
            model, sleep_mode=False, notes=(*model.notes, f"sleep mode kept off: {image.wake_crash}"),
        )
    return replace(config, models=models)
