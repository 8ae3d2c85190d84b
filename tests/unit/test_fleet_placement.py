"""Issue 18: placement decisions for a model allowed on several nodes, the ``nodes`` configuration, who a
forwarded request is for, what a peer's model list may hold, and which peer answers are refusals."""

from __future__ import annotations

import json
import textwrap

import pytest
from aiohttp import web
from multidict import CIMultiDict

from sparkd.cli import check_config
from sparkd.config import ConfigError, load_config
from sparkd.config.keys import PEER, USER
from sparkd.ctl.render import status_with_fleet
from sparkd.engine.client import Endpoint
from sparkd.engine.outbound import engine_request
from sparkd.errors import BadRequest
from sparkd.fleet.nodes import candidates, runs_here, this_node
from sparkd.fleet.onbehalf import KEY_NAME_HEADER, on_behalf
from sparkd.fleet.peerwatch import parse_models
from sparkd.fleet.placement import Candidate, rank
from sparkd.fleet.relay import _refusal, endpoint_of
from sparkd.http.auth import Principal

# -- placement ------------------------------------------------------------------------------------


def nodes(*rows: tuple[str, str | None, bool] | tuple[str, str | None, bool, bool]) -> list[Candidate]:
    return [Candidate(row[0], row[1], row[2], *(row[3:])) for row in rows]


def test_ready_wins_over_loading_over_fits_over_the_local_policy():
    ranked = rank(nodes(("local", "stopped", False), ("p1", "stopped", True), ("p2", "starting", False), ("p3", "ready", False)))
    assert [(c.node, c.reason) for c in ranked] == [
        ("p3", "ready on p3"),
        ("p2", "loading on p2"),
        ("p1", "fits on p1 without evicting another model"),
        ("local", "this node's policy: it queues or swaps here"),
    ]


def test_ready_here_is_served_here_and_waking_counts_as_loading():
    assert rank(nodes(("p1", "ready", True), ("local", "ready", True)))[0].node == "p1"  # the configured order breaks ties
    assert rank(nodes(("local", "ready", True), ("p1", "ready", True)))[0].node == "local"
    assert rank(nodes(("local", "sleeping", False), ("p1", "waking", False)))[0].reason == "loading on p1"
    # A node pulling the model's weights is loading it: another would download them again.
    assert rank(nodes(("local", "stopped", True), ("p1", "pulling", False)))[0].reason == "loading on p1"


def test_without_any_fit_this_node_queues_when_it_may_else_the_first_peer():
    assert rank(nodes(("p1", "stopped", False), ("local", "stopped", False)))[0].node == "local"
    ranked = rank(nodes(("p1", "stopped", False), ("p2", "failed", False)))
    assert [c.node for c in ranked] == ["p1", "p2"]
    assert ranked[0].reason.startswith("the first reachable node allowed (p1)")


def test_an_unreachable_peer_is_never_chosen_and_the_rest_is_the_fallback():
    ranked = rank(nodes(("p1", "ready", True, False), ("local", "stopped", True)))
    assert [c.node for c in ranked] == ["local"]
    assert rank(nodes(("p1", "ready", True, False))) == []


def test_every_reachable_candidate_is_ranked_once():
    ranked = rank(nodes(("local", "ready", True), ("p1", "ready", True), ("p2", None, False)))
    assert [c.node for c in ranked] == ["local", "p1", "p2"]


# -- configuration --------------------------------------------------------------------------------

PEERS = textwrap.dedent(
    """
    [cluster]
    name = "spark1"
    address = "192.168.100.10"

    [peers.spark2]
    url = "https://spark2.lan:8443"
    key_file = "/etc/sparkd/peers/spark2.key"
    address = "192.168.100.11"
    """
)


def load(tmp_path, text):
    path = tmp_path / "sparkd.toml"
    path.write_text(PEERS + textwrap.dedent(text))
    return load_config(path)


def problems(tmp_path, text):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    return [str(problem) for problem in caught.value.problems]


def test_nodes_without_local_or_with_parallel_none_are_placement_candidates(tmp_path):
    config = load(tmp_path, """
        [models.coder]
        image = "i"
        nodes = ["spark2"]
        [models.both]
        image = "i"
        nodes = ["spark1", "spark2"]
        [models.either]
        image = "i"
        nodes = ["local", "spark2"]
        parallel = "none"
        [models.here]
        image = "i"
        """)
    assert candidates(config.models["coder"], config) == ("spark2",)
    assert not runs_here(config.models["coder"], config)
    assert candidates(config.models["both"], config) == ("local", "spark2")  # cluster.name is this node
    assert candidates(config.models["either"], config) == ("local", "spark2")
    assert candidates(config.models["here"], config) == () and runs_here(config.models["here"], config)
    assert not any(model.spans for model in config.models.values())
    assert this_node(config) == "spark1"


def test_a_spanning_model_keeps_its_meaning(tmp_path):
    config = load(tmp_path, """
        [models.big]
        image = "i"
        port = 18500
        nodes = ["local", "spark2"]
        """)
    big = config.models["big"]
    assert big.spans and candidates(big, config) == () and runs_here(big, config)


def test_nodes_naming_an_unknown_peer_is_a_clear_check_config_error(tmp_path):
    found = problems(tmp_path, """
        [models.coder]
        image = "i"
        nodes = ["spark3"]
        """)
    assert len(found) == 1
    assert "models.coder.nodes" in found[0] and "(unknown: spark3; add a [peers.<name>] table for each, or remove it)" in found[0]
    assert "peers: spark2" in found[0] and "also called 'spark1'" in found[0]


def test_sparkd_check_config_names_the_unknown_node_and_exits_1(tmp_path, capsys):
    path = tmp_path / "sparkd.toml"
    path.write_text(PEERS + '[models.coder]\nimage = "i"\nnodes = ["spark2", "spark9"]\n')
    assert check_config(path, check_images=False) == 1
    err = capsys.readouterr().err
    assert "1 problem(s)" in err and "models.coder.nodes" in err and "unknown: spark9" in err, err
    path.write_text(PEERS + '[models.coder]\nimage = "i"\nnodes = ["spark2"]\n')
    assert check_config(path, check_images=False) == 0


def test_a_node_twice_and_a_peer_named_like_this_node_are_errors(tmp_path):
    found = problems(tmp_path, """
        [models.coder]
        image = "i"
        nodes = ["local", "spark1"]
        parallel = "none"
        """)
    assert len(found) == 1 and "models.coder.nodes" in found[0] and "(a node twice)" in found[0]
    found = problems(tmp_path, """
        [peers.spark1]
        url = "https://spark1.lan:8443"
        key_file = "/k"
        address = "a"
        """)
    assert any("peers.spark1" in problem and "a peer other than this node" in problem for problem in found), found


def test_a_cluster_name_must_be_a_name(tmp_path):
    path = tmp_path / "sparkd.toml"
    path.write_text('[cluster]\nname = "no spaces"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "cluster.name" in str(caught.value)


# -- who a forwarded request is for ---------------------------------------------------------------

PEER_PRINCIPAL = Principal("node-a", PEER)


def test_only_a_peer_key_may_say_whose_request_it_carries():
    forwarded = on_behalf(PEER_PRINCIPAL, {KEY_NAME_HEADER: "alice"})
    assert (forwarded.name, forwarded.via, forwarded.role) == ("alice", "node-a", PEER)
    user = Principal("bob", USER)
    assert on_behalf(user, {KEY_NAME_HEADER: "alice"}) is user
    assert on_behalf(Principal("anonymous", USER, anonymous=True), {KEY_NAME_HEADER: "alice"}).name == "anonymous"
    assert on_behalf(PEER_PRINCIPAL, {}) is PEER_PRINCIPAL


@pytest.mark.parametrize("name", ["al ice", "", "x" * 65, "-lead", "a/b", "alice\n", "ālice"])
def test_a_forwarded_name_that_is_no_key_name_is_a_400(name):
    with pytest.raises(BadRequest):
        on_behalf(PEER_PRINCIPAL, {KEY_NAME_HEADER: name})


def test_a_clients_own_fleet_headers_never_reach_an_engine_or_a_peer():
    client = [("X-Sparkd-Key-Name", "victim"), ("x-sparkd-forwarded-by", "evil"), ("X-Trace", "1")]
    request = engine_request("/v1/chat/completions", "/v1/chat/completions", client, Endpoint(port=1, key="k"),
                             {"X-Sparkd-Key-Name": "alice"})
    assert request.headers.getall("X-Sparkd-Key-Name") == ["alice"]
    assert "X-Sparkd-Forwarded-By" not in request.headers and request.headers["X-Trace"] == "1"


# -- a peer's answers -------------------------------------------------------------------------------


def test_a_peers_model_list_keeps_only_well_formed_entries():
    version, node, models = parse_models({
        "sparkd": "1.2", "node": "spark2",
        "models": [
            {"id": "coder", "state": "ready", "fits": True, "aliases": ["c", "bad alias", 3], "endpoints": ["/v1/chat/completions", "/x"],
             "max_model_len": 4096},
            {"id": "../../etc", "state": "ready"}, {"id": 5}, "junk", {"id": "quiet", "state": "\x1b[31m", "max_model_len": True},
        ],
    })
    assert (version, node) == ("1.2", "spark2")
    assert set(models) == {"coder", "quiet"}
    coder = models["coder"]
    assert (coder.state, coder.fits, coder.aliases, coder.endpoints, coder.max_model_len) == ("ready", True, ("c",), ("/v1/chat/completions",), 4096)
    assert models["quiet"].state == "unknown" and models["quiet"].max_model_len is None and not models["quiet"].fits
    assert parse_models(["not", "a", "dict"]) == (None, None, {})


def answer(status: int, error: dict[str, str] | None = None, **headers: str) -> web.Response:
    return web.Response(status=status, body=json.dumps({"error": error or {}}).encode(), headers=CIMultiDict(headers))


def test_which_peer_answers_are_refusals_another_node_may_take():
    assert _refusal(answer(503, {"message": "queue full", "code": "queue_full"})) == "refused with 503: queue full"
    assert _refusal(answer(401, {"message": "the API key is not valid"})) == "refused with 401: the API key is not valid"
    assert "a redirect to 'https://elsewhere'" in (_refusal(answer(302, Location="https://elsewhere")) or "")
    assert _refusal(answer(404, {"message": "not configured", "code": "model_not_found"})) is not None
    # The client's own mistakes are the client's answer, from whichever node.
    assert _refusal(answer(404, {"message": "no such endpoint", "code": "unsupported_endpoint"})) is None
    assert _refusal(answer(400, {"message": "messages must be an array"})) is None
    assert _refusal(answer(413)) is None


def test_a_plain_http_peer_takes_the_raw_relay_and_a_tls_one_does_not():
    from sparkd.cluster.peers import Peer
    from sparkd.config.schema import PeerConfig

    plain, raw = endpoint_of(Peer(PeerConfig("b", "http://10.0.0.2:8009", "/k", "a", insecure=True), "key"))
    assert raw and (plain.host, plain.port, plain.base_url, plain.auth_header) == ("10.0.0.2", 8009, "http://10.0.0.2:8009", "Bearer key")
    tls, raw = endpoint_of(Peer(PeerConfig("b", "https://spark2.lan:8443/", "/k", "a"), "key"))
    assert not raw and tls.base_url == "https://spark2.lan:8443"


# -- sparkctl status --------------------------------------------------------------------------------


def test_sparkctl_status_shows_the_peers_and_the_placements():
    data = {
        "models": [], "lease": {"budget": 0.94, "claimed": 0.0, "free": 0.94, "holders": {}}, "queue": {"depth": 0, "limit": 8, "models": []},
        "worker_leases": [],
        "fleet": {
            "node": "spark1",
            "peers": [
                {"name": "spark2", "url": "https://spark2.lan:8443", "reachable": True, "version": "0.1.0", "node": "spark2",
                 "error": None, "age_s": 2.0, "models": [{"name": "coder", "state": "ready"}]},
                {"name": "spark3", "url": "https://spark3.lan:8443", "reachable": False, "version": None, "node": None,
                 "error": "peer spark3 at https://spark3.lan:8443 is unreachable: ClientConnectorError", "age_s": 1.0, "models": []},
            ],
            "placements": {"coder": {"node": "spark2", "reason": "ready on spark2", "at": 0.0}},
        },
    }
    out = status_with_fleet(data)  # type: ignore[arg-type]
    assert "fleet: this node is spark1" in out
    assert "peer spark2 (https://spark2.lan:8443): reachable, sparkd 0.1.0, checked 2s ago; runs: coder ready" in out
    assert "peer spark3 (https://spark3.lan:8443): unreachable: peer spark3 at https://spark3.lan:8443 is unreachable" in out
    assert "coder placed on spark2: ready on spark2" in out
    assert "fleet" not in status_with_fleet({**data, "fleet": None})  # type: ignore[arg-type]
