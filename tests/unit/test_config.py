"""Configuration validation: every mistake is reported with its file, key path, expectation and finding."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparkd.config import ConfigError, load_config

VALID_MODEL = textwrap.dedent(
    """
    [models.alpha]
    image = "localhost/sparkd-test-engine:latest"
    args = ["--port", "8000"]
    gpu_memory = 0.5
    """
)


def write(tmp_path: Path, text: str, dropins: dict[str, str] | None = None) -> Path:
    path = tmp_path / "sparkd.toml"
    path.write_text(textwrap.dedent(text))
    for name, body in (dropins or {}).items():
        (tmp_path / "models.d").mkdir(exist_ok=True)
        (tmp_path / "models.d" / name).write_text(textwrap.dedent(body))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [str(p) for p in caught.value.problems]


def test_valid_minimal_config_loads_with_defaults(tmp_path):
    config = load_config(write(tmp_path, VALID_MODEL))
    model = config.models["alpha"]
    assert model.readiness_path == "/health"
    assert config.lifecycle.idle_stop_s == 1200 and config.lifecycle.min_uptime_s == 30
    assert config.lifecycle.start_timeout_s == 900
    assert config.server.listen == ("127.0.0.1:8009",)
    assert model.ulimits == {"memlock": -1, "stack": 67108864}


MISTAKES = [
    ("wrong type", '[server]\nmax_body_bytes = "big"\n', "server.max_body_bytes: expected an integer, found string 'big'"),
    ("unknown key with hint", "[gpu]\nmemory_budgte = 0.9\n", "gpu.memory_budgte: expected one of the known keys"),
    ("unknown section", "[sever]\nlisten = []\n", "sever: expected one of the sections"),
    ("bad listen address", '[server]\nlisten = ["localhost"]\n', "server.listen[0]: expected host:port"),
    ("bad listen host", '[server]\nlisten = ["example.com:80"]\n', "server.listen[0]: expected host:port"),
    ("budget out of range", "[gpu]\nmemory_budget = 1.5\n", "gpu.memory_budget: expected a fraction"),
    ("policy literal", '[lifecycle]\npolicy = "drop"\n', "lifecycle.policy: expected one of 'queue', 'reject'"),
    ("negative timeout", "[lifecycle]\nqueue_timeout_s = -1\n", "lifecycle.queue_timeout_s: expected a positive number"),
    ("negative engine timeout", "[engine]\nidle_read_timeout_s = -5\n", "engine.idle_read_timeout_s: expected zero or a positive number"),
    ("engine check period", "[engine]\nreadiness_check_s = 0\n", "engine.readiness_check_s: expected a positive number"),
    ("engine timeout type", '[engine]\nwrite_stall_timeout_s = "1m"\n', "engine.write_stall_timeout_s: expected a number"),
    ("missing image", "[models.beta]\nargs = []\n", "models.beta.image: expected a string (required), found nothing"),
    ("empty image", '[models.beta]\nimage = " "\n', "models.beta.image: expected an image reference"),
    ("args element type", '[models.beta]\nimage = "x"\nargs = ["--port", 8000]\n', "models.beta.args[1]: expected a string, found integer 8000"),
    ("claim above budget", '[models.beta]\nimage = "x"\ngpu_memory = 0.99\n', "models.beta.gpu_memory: expected a fraction between 0 and gpu.memory_budget"),
    ("lifecycle class", '[models.beta]\nimage = "x"\nlifecycle = "greedy"\n', "models.beta.lifecycle: expected one of 'normal', 'exclusive', 'utility', 'pinned'"),
    ("bad volume", '[models.beta]\nimage = "x"\nvolumes = ["/a:relative"]\n', "models.beta.volumes[0]: expected host_path:/container/path"),
    ("bad readiness path", '[models.beta]\nimage = "x"\nreadiness_path = "health"\n', "models.beta.readiness_path: expected an absolute URL path"),
    ("bad shm size", '[models.beta]\nimage = "x"\nshm_size = "lots"\n', "models.beta.shm_size: expected a size like 16g"),
    ("unknown ulimit", '[models.beta]\nimage = "x"\nulimits = {memlok = -1}\n', "models.beta.ulimits.memlok: expected one of"),
    ("bad model name", '[models."bad/name"]\nimage = "x"\n', 'models."bad/name": expected a model name'),
    ("port range", "[defaults]\nport_range = [9000, 8000]\n", "defaults.port_range: expected [first, last]"),
    ("syntax error", "[server\n", "(syntax): expected valid TOML"),
]


@pytest.mark.parametrize("label, text, expected", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_mistake_is_reported_with_its_key_path(tmp_path, label, text, expected):
    found = problems(write(tmp_path, VALID_MODEL + "\n" + text if not text.startswith("[server\n") else text))
    assert any(expected in line for line in found), found
    assert all(line.startswith(str(tmp_path / "sparkd.toml")) for line in found)


def test_duplicate_ports_and_aliases_across_models(tmp_path):
    found = problems(
        write(
            tmp_path,
            """
            [models.a]
            image = "x"
            port = 18001
            aliases = ["shared"]
            [models.b]
            image = "x"
            port = 18001
            aliases = ["shared"]
            """,
        )
    )
    assert any("models.b.port: expected a host port no other model uses, found 18001, already used by model 'a'" in p for p in found)
    assert any("models.b.aliases" in p and "'shared'" in p for p in found)


def test_all_problems_are_listed_at_once(tmp_path):
    found = problems(write(tmp_path, '[server]\nmax_body_bytes = "x"\nlisten = ["nonsense"]\n[gpu]\ntypo = 1\n[models.m]\nargs = []\n'))
    assert len(found) >= 4, found


def test_dropins_are_merged_and_problems_name_their_file(tmp_path):
    path = write(
        tmp_path,
        VALID_MODEL,
        {
            "10-extra.toml": '[models.gamma]\nimage = "x"\ngpu_memory = "lots"\n',
            "20-dup.toml": '[models.alpha]\nimage = "y"\n[server]\nlisten = []\n',
        },
    )
    found = problems(path)
    assert any(p.startswith(str(tmp_path / "models.d" / "10-extra.toml")) and "models.gamma.gpu_memory" in p for p in found)
    assert any("20-dup.toml: models.alpha: expected each model defined once" in p for p in found)
    assert any("20-dup.toml: server: expected only [models.<name>] and [images.\"<image>\"] tables" in p for p in found)


def test_dropin_models_load(tmp_path):
    config = load_config(write(tmp_path, VALID_MODEL, {"extra.toml": '[models.gamma]\nimage = "x"\nenv = {A = "1"}\n'}))
    assert set(config.models) == {"alpha", "gamma"}
    assert config.models["gamma"].env["A"] == "1"


def test_defaults_env_and_volumes_merge_into_models(tmp_path):
    config = load_config(
        write(
            tmp_path,
            '[defaults]\nenv = {HF_HOME = "/hf", SHARED = "d"}\nvolumes = ["/srv/hf:/hf"]\nengine_port = 9000\n'
            '[models.a]\nimage = "x"\nenv = {SHARED = "model"}\nvolumes = ["/srv/m:/models:ro"]\n',
        )
    )
    model = config.models["a"]
    assert model.env == {"HF_HOME": "/hf", "SHARED": "model"}
    assert model.volumes == ("/srv/hf:/hf", "/srv/m:/models:ro")
    assert model.engine_port == 9000


def test_check_config_cli_exit_codes(tmp_path):
    good = write(tmp_path, VALID_MODEL)
    result = subprocess.run([sys.executable, "-m", "sparkd", "check-config", "--config", str(good)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "OK: 1 models" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[gpu]\nmemory_budget = "high"\n[models.a]\nimage = 3\n')
    result = subprocess.run([sys.executable, "-m", "sparkd", "check-config", "--config", str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "gpu.memory_budget: expected a number, found string 'high'" in result.stderr
    assert "models.a.image: expected a string, found integer 3" in result.stderr
    missing = subprocess.run([sys.executable, "-m", "sparkd", "check-config", "--config", str(tmp_path / "nope.toml")], capture_output=True, text=True, check=False)
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_a_model_leaves_out_default_volumes_and_replaces_one_at_the_same_path(tmp_path):
    config = load_config(
        write(
            tmp_path,
            '[defaults]\nvolumes = ["/srv/hf:/hf", "/srv/models:/models"]\n'
            '[models.own-files]\nimage = "x"\nskip_default_volumes = ["/models"]\n'
            '[models.own-mount]\nimage = "x"\nvolumes = ["/data/gguf:/models:ro"]\n'
            '[models.plain]\nimage = "x"\n',
        )
    )
    assert config.models["own-files"].volumes == ("/srv/hf:/hf",)
    # Two mounts on /models would make Podman refuse the container: the model's own wins.
    assert config.models["own-mount"].volumes == ("/srv/hf:/hf", "/data/gguf:/models:ro")
    assert config.models["plain"].volumes == ("/srv/hf:/hf", "/srv/models:/models")


def test_skipping_a_volume_the_defaults_do_not_have_is_an_error(tmp_path):
    path = write(tmp_path, '[defaults]\nvolumes = ["/srv/hf:/hf"]\n[models.a]\nimage = "x"\nskip_default_volumes = ["/model"]\n')
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert "models.a.skip_default_volumes[0]: expected a container path of [defaults] volumes (they mount: /hf), found string '/model'" in str(raised.value)


def test_the_shipped_demo_model_gets_no_volume_over_its_own_models(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    config = load_config(repo / "etc" / "sparkd.toml")
    assert "/var/lib/sparkd/models:/models" in config.defaults.volumes
    assert config.models["smollm2-135m-cpu"].volumes == ()
    # The catalog's vLLM models keep /models: their --download-dir.
    assert "/var/lib/sparkd/models:/models" in config.models["gpt-oss-20b"].volumes


def test_check_config_says_when_podman_cannot_check_the_mounts(tmp_path):
    path = write(tmp_path, f'[podman]\nurl = "unix://{tmp_path}/absent.sock"\n[defaults]\nvolumes = ["/srv/m:/models"]\n' + VALID_MODEL)
    result = subprocess.run([sys.executable, "-m", "sparkd", "check-config", "--config", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert f"note: could not check the models' mounts against their images: Podman at unix://{tmp_path}/absent.sock did not answer" in result.stdout
    skipped = subprocess.run([sys.executable, "-m", "sparkd", "check-config", "--no-images", "--config", str(path)], capture_output=True, text=True, check=False)
    assert skipped.returncode == 0 and "could not check" not in skipped.stdout
