"""Issue 15 point 4: constraints declared on the schema, enforced by the generic builder.

The expected problems below are what the hand-written checks (``config/load.py: check``
before the constraints moved to the schema) reported for the same files, word for word.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pytest

from sparkd.config import ConfigError, load_config
from sparkd.config.constraints import Each, Explained, Port, Positive
from sparkd.config.validate import Problem, build
from sparkd.config.values import volume_error

CASES = {
    'server': (
        '''
[server]
listen = []
cors_origins = ["", "http://a/b", "nope", "*"]
instance = "bad name"
max_body_bytes = 0
body_timeout_s = -1
keepalive_timeout_s = 0
header_timeout_s = -2
max_connections = 0
state_dir = "rel"
runtime_dir = "rel2"
shutdown_grace_s = -1
''',
        [
            'D/sparkd.toml: server.body_timeout_s: expected a positive number, found number -1.0',
            "D/sparkd.toml: server.cors_origins[0]: expected an origin pattern like http://localhost:* or vscode-webview://*, found '' (empty or holds whitespace)",
            "D/sparkd.toml: server.cors_origins[1]: expected an origin pattern like http://localhost:* or vscode-webview://*, found 'http://a/b' (an origin has no path)",
            "D/sparkd.toml: server.cors_origins[2]: expected an origin pattern like http://localhost:* or vscode-webview://*, found 'nope' (expected scheme://host[:port])",
            'D/sparkd.toml: server.header_timeout_s: expected a positive number, found number -2.0',
            "D/sparkd.toml: server.instance: expected a name of letters, digits, '.', '_' or '-', found string 'bad name'",
            'D/sparkd.toml: server.keepalive_timeout_s: expected a positive number, found number 0.0',
            'D/sparkd.toml: server.listen: expected at least one host:port address, found an empty array',
            'D/sparkd.toml: server.max_body_bytes: expected a positive number, found integer 0',
            'D/sparkd.toml: server.max_connections: expected a positive number, found integer 0',
            "D/sparkd.toml: server.runtime_dir: expected an absolute path, found string 'rel2'",
            'D/sparkd.toml: server.shutdown_grace_s: expected zero or a positive number, found number -1.0',
            "D/sparkd.toml: server.state_dir: expected an absolute path, found string 'rel'",
        ],
    ),
    'listen': (
        '''
[server]
listen = ["127.0.0.1:8009", "127.0.0.1:8009", "nohost", "1.2.3.4:99999", "example.com:80"]
''',
        [
            'D/sparkd.toml: server.listen: expected distinct addresses, found the same address twice',
            "D/sparkd.toml: server.listen[2]: expected host:port, e.g. 127.0.0.1:8009 or [::1]:8009, found 'nohost' (missing host or port)",
            "D/sparkd.toml: server.listen[3]: expected host:port, e.g. 127.0.0.1:8009 or [::1]:8009, found '1.2.3.4:99999' (port '99999' is not within 1-65535)",
            "D/sparkd.toml: server.listen[4]: expected host:port, e.g. 127.0.0.1:8009 or [::1]:8009, found 'example.com:80' ('example.com' is not an IP address)",
        ],
    ),
    'sections': (
        '''
[podman]
url = "ftp://x"
timeout_s = 0
[gpu]
memory_budget = 1.5
reclaim_timeout_s = 0
[lifecycle]
idle_stop_s = 0
start_timeout_s = -1
stop_timeout_s = 0
probe_interval_s = 0
queue_timeout_s = 0
min_uptime_s = -1
failure_backoff_s = -1
queue_size = 0
queue_per_key = 0
queue_body_bytes = 10
[engine]
connect_timeout_s = -1
response_head_timeout_s = -1
idle_read_timeout_s = -1
write_stall_timeout_s = -1
unresponsive_fail_s = -1
readiness_check_s = 0
[defaults]
port_range = [5, 3, 1]
[engine_cache]
paths = ["rel", "/a:b", "/a/../b", "/ok"]
[cluster]
ray_port = 0
heartbeat_s = 0
lease_timeout_s = 400
max_leases_per_head = 0
''',
        [
            'D/sparkd.toml: cluster.heartbeat_s: expected a positive number, found number 0.0',
            'D/sparkd.toml: cluster.lease_timeout_s: expected at most 300 seconds, found number 400.0',
            'D/sparkd.toml: cluster.max_leases_per_head: expected a positive number, found integer 0',
            'D/sparkd.toml: cluster.ray_port: expected a port within 1-65535, found integer 0',
            'D/sparkd.toml: defaults.port_range: expected [first, last] host ports within 1-65535, found array [5, 3, 1]',
            'D/sparkd.toml: engine.connect_timeout_s: expected zero or a positive number, found number -1.0',
            'D/sparkd.toml: engine.idle_read_timeout_s: expected zero or a positive number, found number -1.0',
            'D/sparkd.toml: engine.readiness_check_s: expected a positive number, found number 0.0',
            'D/sparkd.toml: engine.response_head_timeout_s: expected zero or a positive number, found number -1.0',
            'D/sparkd.toml: engine.unresponsive_fail_s: expected zero or a positive number, found number -1.0',
            'D/sparkd.toml: engine.write_stall_timeout_s: expected zero or a positive number, found number -1.0',
            "D/sparkd.toml: engine_cache.paths[0]: expected an absolute directory inside the container, without ':' or '..', found string 'rel'",
            "D/sparkd.toml: engine_cache.paths[1]: expected an absolute directory inside the container, without ':' or '..', found string '/a:b'",
            "D/sparkd.toml: engine_cache.paths[2]: expected an absolute directory inside the container, without ':' or '..', found string '/a/../b'",
            'D/sparkd.toml: gpu.memory_budget: expected a fraction of GPU memory in (0, 1], found number 1.5',
            'D/sparkd.toml: gpu.reclaim_timeout_s: expected a positive number, found number 0.0',
            'D/sparkd.toml: lifecycle.failure_backoff_s: expected zero or a positive number, found number -1.0',
            'D/sparkd.toml: lifecycle.idle_stop_s: expected a positive number, found number 0.0',
            'D/sparkd.toml: lifecycle.min_uptime_s: expected zero or a positive number, found number -1.0',
            'D/sparkd.toml: lifecycle.probe_interval_s: expected a positive number, found number 0.0',
            'D/sparkd.toml: lifecycle.queue_body_bytes: expected at least server.max_body_bytes (67108864), found integer 10',
            'D/sparkd.toml: lifecycle.queue_per_key: expected a positive number, found integer 0',
            'D/sparkd.toml: lifecycle.queue_size: expected a positive number, found integer 0',
            'D/sparkd.toml: lifecycle.queue_timeout_s: expected a positive number, found number 0.0',
            'D/sparkd.toml: lifecycle.start_timeout_s: expected a positive number, found number -1.0',
            'D/sparkd.toml: lifecycle.stop_timeout_s: expected a positive number, found number 0.0',
            'D/sparkd.toml: podman.timeout_s: expected a positive number, found number 0.0',
            "D/sparkd.toml: podman.url: expected unix:///path/to/podman.sock or http(s)://host:port, found string 'ftp://x'",
        ],
    ),
    'cluster2': (
        '''
[cluster]
heartbeat_s = 10
lease_timeout_s = 5
[peers.p1]
url = "http://x:1"
key_file = "/k"
address = ""
[peers.p2]
url = "notaurl"
key_file = "/k"
address = "a"
[peers.p3]
url = "http://x:1"
key_file = "/k"
address = "a"
insecure = true
[workers.w]
image = " "
command = []
gpu_memory = 2.0
volumes = ["bad", "/a:/b", "a:b"]
''',
        [
            'D/sparkd.toml: cluster.lease_timeout_s: expected more than cluster.heartbeat_s (10.0), found number 5.0',
            "D/sparkd.toml: peers.p1.address: expected the peer's cluster-network address, found an empty string",
            "D/sparkd.toml: peers.p1.url: expected an https:// URL: the peer key travels with every heartbeat (put the peer's sparkd behind TLS, or set insecure = true in this table to send it in clear text on a network you trust), found string 'http://x:1'",
            "D/sparkd.toml: peers.p2.url: expected the peer sparkd's URL, e.g. https://spark2.lan:8443, found string 'notaurl'",
            "D/sparkd.toml: workers.w.command: expected the worker's command, e.g. the default ray start ..., found an empty list",
            "D/sparkd.toml: workers.w.gpu_memory: expected this node's share for the worker: more than 0, at most gpu.memory_budget (0.94), found number 2.0",
            'D/sparkd.toml: workers.w.image: expected an image reference, e.g. localhost/sparkd/vllm-gb10:v1, found an empty string',
            "D/sparkd.toml: workers.w.volumes: expected host_path:container_path[:ro], found 'a:b' (the container path must be absolute)",
            "D/sparkd.toml: workers.w.volumes: expected host_path:container_path[:ro], found 'bad' (expected two or three ':'-separated parts)",
        ],
    ),
    'workers_nocluster': (
        '''
[workers.w]
image = "x"
gpu_memory = 0.5
''',
        [
            'D/sparkd.toml: workers.w: expected a [cluster] table too: this node grants worker leases only with one, found no [cluster] table',
        ],
    ),
    'models': (
        '''
[server]
listen = ["127.0.0.1:18500"]
[gpu]
memory_budget = 0.5
[models.a]
image = " "
gpu_memory = 0.8
sleep_gpu_memory = 0.9
port = 70000
engine_port = 0
idle_stop_s = 0
start_timeout_s = -1
max_model_len = 0
profile = "nope"
api_paths = ["/v1/x/", "/x", "/v1/ok"]
readiness_path = "health"
shm_size = "lots"
ulimits = {bogus = 1, nofile = -5, stack = 3}
volumes = ["x", "/a:rel", "a:/b:qq", "a:/b:ro"]
aliases = ["b", "bad name"]
nodes = ["p", "p"]
[models.b]
image = "i"
port = 18500
[models.c]
image = "i"
port = 18400
aliases = ["a"]
[models.d]
image = "i"
port = 18400
nodes = ["local", "x"]
[models.e]
image = "i"
gpu_memory = -1
''',
        [
            "D/sparkd.toml: cluster.address: expected this node's cluster-network address (model d spans nodes), found an empty string",
            "D/sparkd.toml: models.a.aliases: expected names of letters, digits, '.', '_' or '-', found string 'bad name'",
            "D/sparkd.toml: models.a.api_paths[0]: expected an API path such as /v1/chat/completions, found string '/v1/x/'",
            "D/sparkd.toml: models.a.api_paths[1]: expected an API path such as /v1/chat/completions, found string '/x'",
            'D/sparkd.toml: models.a.engine_port: expected a port within 1-65535, found integer 0',
            'D/sparkd.toml: models.a.gpu_memory: expected a fraction between 0 and gpu.memory_budget (0.5), found number 0.8',
            'D/sparkd.toml: models.a.idle_stop_s: expected a positive number of seconds, found number 0.0',
            'D/sparkd.toml: models.a.image: expected an image reference, e.g. localhost/sparkd/vllm-gb10:v1, found an empty string',
            'D/sparkd.toml: models.a.max_model_len: expected a positive number of tokens, found integer 0',
            # Without "local" the nodes are placement candidates (issue 18), not a span: no head address needed.
            "D/sparkd.toml: models.a.nodes: expected distinct node names that may run the model: 'local' (this node) or the name of a [peers.<name>] table (peers: none configured), found array ['p', 'p'] (unknown: p, p; add a [peers.<name>] table for each, or remove it)",
            'D/sparkd.toml: models.a.port: expected a port within 1-65535, found integer 70000',
            "D/sparkd.toml: models.a.profile: expected one of the profiles coder-force-tools, default, gemma, llama, passthrough, qwen3-next, small-no-tools, thinking, thinking-off, vision (or a [profiles.<name>] table); no profile means 'default', found string 'nope'",
            "D/sparkd.toml: models.a.readiness_path: expected an absolute URL path such as /health, found string 'health'",
            "D/sparkd.toml: models.a.shm_size: expected a size like 16g, 512m or 1073741824, found string 'lots'",
            "D/sparkd.toml: models.a.sleep_gpu_memory: expected between 0 and the model's gpu_memory (0.8), found number 0.9",
            'D/sparkd.toml: models.a.start_timeout_s: expected a positive number of seconds, found number -1.0',
            "D/sparkd.toml: models.a.ulimits.bogus: expected one of core, cpu, data, fsize, locks, memlock, msgqueue, nice, nofile, nproc, rss, rtprio, rttime, sigpending, stack, found unknown ulimit 'bogus'",
            'D/sparkd.toml: models.a.ulimits.nofile: expected a limit >= 0, or -1 for unlimited, found integer -5',
            "D/sparkd.toml: models.a.volumes[0]: expected host_path:/container/path[:ro|rw], found 'x' (expected two or three ':'-separated parts)",
            "D/sparkd.toml: models.a.volumes[1]: expected host_path:/container/path[:ro|rw], found '/a:rel' (the container path must be absolute)",
            "D/sparkd.toml: models.a.volumes[2]: expected host_path:/container/path[:ro|rw], found 'a:/b:qq' (unknown option 'qq')",
            "D/sparkd.toml: models.b.aliases: expected names no other model or alias uses, found 'b', already the name of 'a'",
            'D/sparkd.toml: models.b.port: expected a host port sparkd itself does not listen on, found integer 18500',
            "D/sparkd.toml: models.c.aliases: expected names no other model or alias uses, found 'a', already the name of 'a'",
            "D/sparkd.toml: models.d.nodes: expected distinct node names: 'local' (this node, the head) and [peers.<name>] entries, found array ['local', 'x'] (unknown: x)",
            "D/sparkd.toml: models.d.port: expected a host port no other model uses, found 18400, already used by model 'c'",
            'D/sparkd.toml: models.e.gpu_memory: expected a fraction between 0 and gpu.memory_budget (0.5), found number -1.0',
        ],
    ),
    'budget_bad_models': (
        '''
[gpu]
memory_budget = 2
[models.a]
image = "i"
gpu_memory = 1.5
''',
        [
            'D/sparkd.toml: gpu.memory_budget: expected a fraction of GPU memory in (0, 1], found number 2.0',
        ],
    ),
    'profiles': (
        '''
[profiles.p]
context_margin = -1
default_max_tokens = 0
thinking_default = true
[profiles.q]
thinking_flag = " "
[profiles.r]
extends = "p"
''',
        [
            'D/sparkd.toml: profiles.p.context_margin: expected zero or a positive number of tokens, found integer -1',
            'D/sparkd.toml: profiles.p.default_max_tokens: expected a positive number of tokens, found integer 0',
            'D/sparkd.toml: profiles.p.thinking_default: expected thinking_flag set too (e.g. "enable_thinking"), found thinking_flag unset',
            'D/sparkd.toml: profiles.q.thinking_flag: expected a chat_template_kwargs key such as enable_thinking, found an empty string',
            'D/sparkd.toml: profiles.r.context_margin: expected zero or a positive number of tokens, found integer -1',
            'D/sparkd.toml: profiles.r.default_max_tokens: expected a positive number of tokens, found integer 0',
            'D/sparkd.toml: profiles.r.thinking_default: expected thinking_flag set too (e.g. "enable_thinking"), found thinking_flag unset',
        ],
    ),
    'defaults_inherit': (
        '''
[defaults]
shm_size = "x"
ulimits = {nope = 1}
readiness_path = "bad"
engine_port = 0
[models.a]
image = "i"
''',
        [
            'D/sparkd.toml: models.a.engine_port: expected a port within 1-65535, found integer 0',
            "D/sparkd.toml: models.a.readiness_path: expected an absolute URL path such as /health, found string 'bad'",
            "D/sparkd.toml: models.a.shm_size: expected a size like 16g, 512m or 1073741824, found string 'x'",
            "D/sparkd.toml: models.a.ulimits.nope: expected one of core, cpu, data, fsize, locks, memlock, msgqueue, nice, nofile, nproc, rss, rtprio, rttime, sigpending, stack, found unknown ulimit 'nope'",
        ],
    ),
    'types': (
        '''
[server]
max_body_bytes = "big"
listen = "x"
cors_origins = [1]
[models.a]
image = "i"
port = "p"
max_model_len = 1.5
''',
        [
            'D/sparkd.toml: models.a.max_model_len: expected an integer, found number 1.5',
            "D/sparkd.toml: models.a.port: expected an integer, found string 'p'",
            'D/sparkd.toml: server.cors_origins[0]: expected a string, found integer 1',
            "D/sparkd.toml: server.listen: expected an array of strings, found string 'x'",
            "D/sparkd.toml: server.max_body_bytes: expected an integer, found string 'big'",
        ],
    ),
}



@pytest.mark.parametrize("name", sorted(CASES))
def test_every_problem_is_reported_as_precisely_as_before(tmp_path: Path, name: str):
    text, expected = CASES[name]
    path = tmp_path / "sparkd.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    found = sorted(str(problem).replace(str(tmp_path), "D") for problem in caught.value.problems)
    assert found == expected


@dataclass(frozen=True)
class Toy:
    port: Annotated[int, Port] = 1
    count: Annotated[int, Positive] = 1
    volumes: Annotated[tuple[str, ...], Each(Explained(volume_error, "host_path:/container/path"))] = ()


def test_the_builder_checks_the_constraints_of_any_dataclass_and_keeps_the_value():
    problems: list[Problem] = []
    toy = build(Toy, {"port": 0, "count": "x", "volumes": ["/a:/b", "bad"]}, file="f", path=("toy",), problems=problems)
    assert [str(p) for p in problems] == [
        "f: toy.port: expected a port within 1-65535, found integer 0",
        "f: toy.count: expected an integer, found string 'x'",
        "f: toy.volumes[1]: expected host_path:/container/path, found 'bad' (expected two or three ':'-separated parts)",
    ]
    # A value that breaks a constraint is kept for the checks across fields; one of the wrong type is not.
    assert toy == Toy(port=0, count=1, volumes=("/a:/b", "bad"))


def test_a_value_breaking_its_constraint_still_takes_part_in_cross_field_checks(tmp_path: Path):
    path = tmp_path / "sparkd.toml"
    path.write_text(textwrap.dedent('''
        [server]
        listen = ["127.0.0.1:18001", "127.0.0.1:18001"]
        [models.a]
        image = "i"
        port = 18001
    '''))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert sorted(p.key for p in caught.value.problems) == ["models.a.port", "server.listen"]
