"""Issue 16: the catalog marks images with a known wake crash, and sleep mode stays off for them."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from sparkd.config import ConfigError, load_config
from sparkd.runtime.spec import render

REPO = Path(__file__).resolve().parents[2]
SHIPPED_IMAGES = REPO / "etc" / "models.d" / "00-images.toml"
GB10_IMAGES = ("localhost/sparkd/vllm-gb10:v1", "localhost/sparkd/vllm-gb10-mxfp4:v1")


def write(tmp_path: Path, image: str, extra: str = "", *, shipped_marks: bool = True) -> Path:
    path = tmp_path / "sparkd.toml"
    path.write_text(textwrap.dedent(f"""
        [models.alpha]
        image = "{image}"
        args = ["--port", "8000"]
        gpu_memory = 0.5
        sleep_mode = true
        sleep_level = 2
        notes = ["Best for: tests"]
        """) + textwrap.dedent(extra))
    if shipped_marks:
        (tmp_path / "models.d").mkdir(exist_ok=True)
        shutil.copy(SHIPPED_IMAGES, tmp_path / "models.d" / SHIPPED_IMAGES.name)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [str(p) for p in caught.value.problems]


def test_the_shipped_catalog_marks_the_gb10_images_it_builds():
    config = load_config(REPO / "etc" / "sparkd.toml")
    for image in GB10_IMAGES:
        assert "#50011" in config.images[image].wake_crash, image
    models_on_them = [m for m in config.models.values() if m.image in GB10_IMAGES]
    assert models_on_them and not any(m.sleep_mode for m in models_on_them)


@pytest.mark.parametrize("image", GB10_IMAGES)
def test_a_model_on_a_marked_image_never_sleeps_and_its_notes_say_why(tmp_path, image):
    config = load_config(write(tmp_path, image))
    model = config.models["alpha"]
    assert model.sleep_mode is False
    assert model.notes[0] == "Best for: tests"
    assert model.notes[-1].startswith("sleep mode kept off: vLLM issue #50011")
    spec = render(config, model)
    assert "--enable-sleep-mode" not in spec.command and "VLLM_SERVER_DEV_MODE" not in spec.env


def test_a_model_on_an_unmarked_image_keeps_its_sleep_mode(tmp_path):
    config = load_config(write(tmp_path, "localhost/sparkd-test-engine:latest"))
    assert config.models["alpha"].sleep_mode is True
    assert config.models["alpha"].notes == ("Best for: tests",)


def test_a_cleared_mark_lets_the_model_sleep(tmp_path):
    image = "localhost/my/vllm:fixed"
    config = load_config(write(tmp_path, image, f'[images."{image}"]\nwake_crash = ""\n', shipped_marks=False))
    assert config.models["alpha"].sleep_mode is True and config.images[image].wake_crash == ""


@pytest.mark.parametrize(("extra", "expected"), [
    ('[images."localhost/x:1"]\nwake_crash = 3\n', 'images."localhost/x:1".wake_crash: expected a string'),
    ('[images."localhost/x:1"]\nwakecrash = "typo"\n', 'images."localhost/x:1".wakecrash'),
    ('[images."localhost x:1"]\nwake_crash = "a"\n', 'images."localhost x:1": expected an image reference'),
    ('[images]\n"localhost/x:1" = "a"\n', 'images."localhost/x:1": expected a table'),
])
def test_a_bad_image_table_is_refused_naming_its_key(tmp_path, extra, expected):
    found = problems(write(tmp_path, "localhost/x:1", extra, shipped_marks=False))
    assert any(expected in problem for problem in found), found


def test_an_image_marked_twice_is_refused_naming_both_files(tmp_path):
    path = write(tmp_path, GB10_IMAGES[0], f'[images."{GB10_IMAGES[0]}"]\nwake_crash = ""\n')
    found = problems(path)
    assert any("each image defined once" in p and "00-images.toml" in p for p in found), found


def test_a_drop_in_holds_only_models_and_images(tmp_path):
    path = write(tmp_path, "localhost/x:1")
    (tmp_path / "models.d" / "50-bad.toml").write_text("[gpu]\nmin_free = 1\n")
    found = problems(path)
    assert any('only [models.<name>] and [images."<image>"] tables in a drop-in' in p for p in found), found
