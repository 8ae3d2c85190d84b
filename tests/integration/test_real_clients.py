"""Real coding clients through sparkd serving the CPU demo model (issue 14, acceptance a).

OpenCode (npm ``opencode-ai``, ``opencode run``) is configured with the output of
``sparkd clients opencode``, the Cline CLI (npm ``cline``) with the ``cline auth``
command ``sparkd clients cline`` prints. Each answers a short prompt; with a prompt
too long for the model's context each shows sparkd's ``context_length_exceeded``
message and stops, and sparkd's own request counter shows it did not loop (the
report this comes from: OpenCode sent 1 860 requests in 300 s).

The clients are installed by tests/clients/install.sh at the versions
tests/clients/package-lock.json pins; each runs with HOME and the XDG directories of
its own in tmp, pointed at 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from harness import REPO

pytestmark = pytest.mark.podman

CLI_TIMEOUT_S = 240
# ~74 KB of Python pasted into the prompt, as in the report: SmolLM2's tokenizer makes ~37 000 tokens of it.
LONG_PROMPT = "Explain this code:\n" + "".join(
    f"def function_{i}(argument):\n    return argument * {i} + len('text {i}')\n\n" for i in range(1300)
)
# A refused request followed by a few retries at most; a loop sends hundreds.
MAX_REQUESTS_FOR_A_REFUSAL = 5
SPARKDS_MESSAGE = re.compile(r"has a context of 8192 tokens \(its max_model_len\)")


def require_or_skip(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def client_bin() -> Path:
    """node_modules/.bin with ``opencode`` and ``cline``, installed once per lock file."""
    try:
        result = subprocess.run(
            [str(REPO / "tests" / "clients" / "install.sh")], capture_output=True, text=True, timeout=900, check=False
        )
    except subprocess.TimeoutExpired:
        require_or_skip("installing the clients from npm took more than 900 s")
    if result.returncode != 0:
        require_or_skip(f"tests/clients/install.sh failed (npm registry reachable? Node.js installed?): {result.stderr[-1500:]}")
    return Path(result.stdout.strip().splitlines()[-1]) / "node_modules" / ".bin"


def demo_table(image: str) -> dict[str, Any]:
    table = dict(tomllib.loads((REPO / "etc" / "sparkd.toml").read_text())["models"]["smollm2-135m-cpu"])
    table.pop("skip_default_volumes")  # the test daemon mounts no default volumes
    return {**table, "image": image}


@dataclass
class Served:
    sparkd: Any
    key: str
    name: str

    async def requests(self) -> int:
        """Requests sparkd answered for the model, from its own counter (``sparkd_requests_total``)."""
        async with self.sparkd.admin_session() as session, session.get(self.sparkd.admin_url + "/metrics") as response:
            text = await response.text()
        pattern = re.compile(r'^sparkd_requests_total\{([^}]*)\} ([0-9.e+]+)$', re.MULTILINE)
        return int(sum(float(value) for labels, value in pattern.findall(text) if f'model="{self.name}"' in labels))

    def clients_output(self, client: str) -> str:
        command = [
            sys.executable, "-m", "sparkd", "clients", client, "--config", str(self.sparkd.config_path),
            "--base-url", self.sparkd.base_url + "/v1",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture
async def served(sparkd_factory, cpu_demo_image) -> Served:
    sparkd = sparkd_factory({"demo": demo_table(cpu_demo_image)})
    key = sparkd.add_user_key()  # the clients send a key, and only a real one passes
    await sparkd.start()
    return Served(sparkd, key, sparkd.model("demo"))


def isolated_env(home: Path, key: str) -> dict[str, str]:
    """A client's own HOME and XDG directories; no proxy, no update checks, nothing but 127.0.0.1 to call."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "SPARKD_API_KEY": key,
        "NO_COLOR": "1",
        "TERM": "dumb",
        "OPENCODE_DISABLE_AUTOUPDATE": "1",
        "OPENCODE_DISABLE_MODELS_FETCH": "1",
        "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
        "OPENCODE_DISABLE_SHARE": "1",
        "OPENCODE_DISABLE_CLAUDE_CODE": "1",
        # The machine reaches package registries only: no telemetry from either client.
        "DO_NOT_TRACK": "1",
        "DISABLE_TELEMETRY": "1",
    }
    for directory in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        Path(env[directory]).mkdir(parents=True, exist_ok=True)
    return env


@dataclass
class Run:
    returncode: int | None
    output: str
    seconds_limit_hit: bool


async def run_cli(command: list[str], env: dict[str, str], cwd: Path, timeout: float = CLI_TIMEOUT_S) -> Run:
    process = await asyncio.create_subprocess_exec(
        *command, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
        return Run(process.returncode, out.decode("utf-8", "replace"), False)
    except asyncio.TimeoutError:
        process.kill()
        out, _ = await process.communicate()
        return Run(None, out.decode("utf-8", "replace"), True)


async def test_opencode_answers_and_stops_on_a_prompt_too_long(served: Served, client_bin: Path, tmp_path: Path) -> None:
    home, work = tmp_path / "opencode-home", tmp_path / "opencode-work"
    work.mkdir()
    env = isolated_env(home, served.key)
    document = json.loads(served.clients_output("opencode"))
    assert list(document["provider"]["sparkd"]["models"]) == [served.name]
    (home / ".config" / "opencode").mkdir(parents=True, exist_ok=True)
    (home / ".config" / "opencode" / "opencode.json").write_text(json.dumps(document))
    opencode = [str(client_bin / "opencode"), "run", "--model", f"sparkd/{served.name}"]

    answered = await run_cli([*opencode, "Say hello in one word."], env, work)
    print(f"opencode (short prompt) exit {answered.returncode}:\n{answered.output[-3000:]}")
    assert answered.returncode == 0 and not answered.seconds_limit_hit
    assert answered.output.strip(), "opencode printed no answer"
    before = await served.requests()
    assert before >= 1  # it went through sparkd

    refused = await run_cli([*opencode, LONG_PROMPT], env, work)
    requests = await served.requests() - before
    print(f"opencode (long prompt) exit {refused.returncode}, {requests} request(s):\n{refused.output[-3000:]}")
    assert not refused.seconds_limit_hit, "opencode did not stop"
    assert SPARKDS_MESSAGE.search(refused.output), "opencode did not show sparkd's context_length_exceeded message"
    assert 1 <= requests <= MAX_REQUESTS_FOR_A_REFUSAL


async def test_cline_cli_answers_and_stops_on_a_prompt_too_long(served: Served, client_bin: Path, tmp_path: Path) -> None:
    home, work = tmp_path / "cline-home", tmp_path / "cline-work"
    work.mkdir()
    env = {**isolated_env(home, served.key), "PATH": f"{client_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    script = served.clients_output("cline")
    commands = [line for line in script.splitlines() if line.startswith("cline auth ")]
    assert len(commands) == 1 and f"--modelid {served.name}" in commands[0], script
    # The printed command, run as a user would paste it: the shell expands "$SPARKD_API_KEY".
    auth = await run_cli(["bash", "-c", script], env, work, timeout=60)
    print(f"cline auth exit {auth.returncode}:\n{auth.output[-2000:]}")
    assert auth.returncode == 0, auth.output
    settings = json.loads((home / ".cline" / "data" / "settings" / "providers.json").read_text())
    provider = settings["providers"]["openai-compatible"]["settings"]
    assert provider["baseUrl"] == served.sparkd.base_url + "/v1" and provider["apiKey"] == served.key

    cline = ["cline", "--timeout", str(CLI_TIMEOUT_S - 30)]
    answered = await run_cli([*cline, "Say hello in one word."], env, work)
    print(f"cline (short prompt) exit {answered.returncode}:\n{answered.output[-3000:]}")
    assert answered.returncode == 0 and not answered.seconds_limit_hit
    before = await served.requests()
    assert before >= 1

    refused = await run_cli([*cline, LONG_PROMPT], env, work)
    requests = await served.requests() - before
    print(f"cline (long prompt) exit {refused.returncode}, {requests} request(s):\n{refused.output[-3000:]}")
    assert not refused.seconds_limit_hit, "cline did not stop"
    assert SPARKDS_MESSAGE.search(refused.output), "cline did not show sparkd's context_length_exceeded message"
    assert 1 <= requests <= MAX_REQUESTS_FOR_A_REFUSAL
