"""Conformance suite: drives two federated controlplane-lite agents with `py-consul`, a Consul
client we did not write, and checks what the client gets back.

Run by `tests/py_consul.rs` (cargo test), which starts the agents and passes:
  CP_PRIMARY, CP_SECONDARY  host:port of each agent's HTTP API
  CP_MANAGEMENT             the bootstrap (global-management) token's secret
Every check runs even after one fails; the exit status is 1 when any failed.
"""

import os
import sys
import time
import traceback

import consul
from consul import Check

PRIMARY = os.environ["CP_PRIMARY"]
SECONDARY = os.environ["CP_SECONDARY"]
MANAGEMENT = os.environ["CP_MANAGEMENT"]


def client(address, token=MANAGEMENT, dc=None):
    host, port = address.rsplit(":", 1)
    return consul.Consul(host=host, port=int(port), token=token, dc=dc)


p = client(PRIMARY)
s = client(SECONDARY)
failures = []
state = {}


def check(fn):
    """Runs one named check and records its failure instead of stopping."""
    try:
        fn()
        print(f"ok    {fn.__name__}")
    except Exception:  # noqa: BLE001 - every failure is reported, then the next check runs.
        failures.append(fn.__name__)
        print(f"FAIL  {fn.__name__}\n{traceback.format_exc()}")
    return fn


def expect(condition, message):
    if not condition:
        raise AssertionError(message)


def eventually(what, predicate, limit=20.0):
    """Polls `predicate` every 50 ms for at most `limit` seconds."""
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s: {what}")
        time.sleep(0.05)


def raises(exception_type, text, fn):
    try:
        fn()
    except exception_type as e:
        expect(text in str(e), f"{exception_type.__name__} without {text!r}: {e}")
        return
    raise AssertionError(f"expected {exception_type.__name__} ({text!r})")


# --- The guide's workflow -------------------------------------------------------------------


@check
def acl_policy_and_token():
    rules = {"service": {"web": {"policy": "write"}}, "service_prefix": {"": {"policy": "read"}}}
    policy = p.acl.policy.create(name="web-write", rules=rules, description="web")
    expect(policy["Name"] == "web-write", policy)
    state["policy_id"] = policy["ID"]
    expect(p.acl.policy.read(policy["ID"])["Description"] == "web", "policy read")
    token = p.acl.token.create(description="web", policies_name=["web-write"])
    expect(token["Policies"][0]["Name"] == "web-write", token)
    state["web_token"] = token
    me = p.acl.token.read_self(token=token["SecretID"])
    expect(me["AccessorID"] == token["AccessorID"], me)


@check
def anonymous_token_reads_services():
    # As the guide would for DNS and dashboards: the anonymous token may read services and
    # nodes. Some py-consul calls (agent.service_definition) never send a token.
    rules = {"service_prefix": {"": {"policy": "read"}}, "node_prefix": {"": {"policy": "read"}}}
    p.acl.policy.create(name="anonymous-read", rules=rules)
    updated = p.acl.token.update(
        "00000000-0000-0000-0000-000000000002",
        description="Anonymous Token",
        policies_name=["anonymous-read"],
    )
    expect(updated["Policies"][0]["Name"] == "anonymous-read", updated)
    anonymous = client(PRIMARY, token=None)
    eventually("anonymous reads", lambda: "consul" in anonymous.catalog.services()[1] or True)


@check
def acl_token_update_and_delete():
    token = p.acl.token.create(description="temp", policies_name=["web-write"])
    updated = p.acl.token.update(
        token["AccessorID"], description="temp, updated", policies_name=["web-write"]
    )
    expect(updated["Description"] == "temp, updated", updated)
    expect(updated["SecretID"] == token["SecretID"], "secret kept")
    expect(p.acl.token.delete(token["AccessorID"]) is True, "delete")
    # Consul answers a read by accessor with a 404, which py-consul turns into None.
    expect(p.acl.token.read(token["AccessorID"]) is None, "deleted token read")
    raises(
        consul.ACLPermissionDenied,
        "ACL not found",
        lambda: p.acl.token.read_self(token=token["SecretID"]),
    )


@check
def config_entries():
    expect(p.config.set("proxy-defaults", "global", {"MeshGateway": {"Mode": "local"}}), "set")
    entry = p.config.get("proxy-defaults", "global")
    expect(entry["MeshGateway"]["Mode"] == "local", entry)
    expect(p.config.set("service-defaults", "socat", {"Protocol": "tcp"}), "set sd")
    names = [e["Name"] for e in p.config.list("service-defaults")]
    expect("socat" in names, names)


@check
def service_registration():
    expect(
        p.agent.service.register(
            "socat", port=8181, tags=["v1"], connect={"sidecar_service": {}}, enable_tag_override=False
        ),
        "register socat",
    )
    expect(
        p.agent.service.register(
            "web",
            port=9090,
            tags=["v2"],
            connect={
                "sidecar_service": {
                    "proxy": {"upstreams": [{"destination_name": "socat", "local_bind_port": 8182}]}
                }
            },
        ),
        "register web",
    )
    services = p.agent.services()
    expect({"socat", "web", "socat-sidecar-proxy"} <= set(services), services)
    expect(services["socat"]["Datacenter"] == "primary", services["socat"])
    expect(services["socat-sidecar-proxy"]["Kind"] == "connect-proxy", services)
    one = p.agent.service_definition("socat")
    expect(one["Service"] == "socat" and one["Port"] == 8181, one)
    # py-consul turns Consul's 404 into None.
    expect(p.agent.service_definition("nope") is None, "unknown service ID")


@check
def intentions_exact():
    expect(p.connect.intentions.upsert("web", "socat", action="allow"), "upsert")
    got = p.connect.intentions.read("web", "socat")
    expect(got["Action"] == "allow" and got["SourceName"] == "web", got)
    expect(p.connect.intentions.upsert("web", "socat", action="deny"), "upsert again")
    expect(p.connect.intentions.read("web", "socat")["Action"] == "deny", "updated in place")
    listed = p.connect.intentions.list()
    expect(len([i for i in listed if i["DestinationName"] == "socat"]) == 1, listed)
    expect(p.connect.intentions.upsert("web", "socat", action="allow"), "allow again")
    expect(p.connect.intentions.upsert("db", "socat", action="allow"), "second")
    expect(p.connect.intentions.delete("db", "socat"), "delete")
    expect(p.connect.intentions.read("db", "socat") is None, "deleted intention is a 404")
    # Replication carries it to the secondary.
    eventually(
        "intention replicated",
        lambda: any(i["SourceName"] == "web" for i in s.connect.intentions.list()),
    )
    # Written in the secondary, it is forwarded to the primary.
    expect(s.connect.intentions.upsert("api", "socat", action="deny"), "upsert in secondary")
    expect(p.connect.intentions.read("api", "socat")["Action"] == "deny", "forwarded")
    expect(s.connect.intentions.delete("api", "socat"), "delete in secondary")
    expect(p.connect.intentions.read("api", "socat") is None, "deleted in the primary")


@check
def health_and_catalog():
    _, rows = p.health.service("socat")
    expect([r["Service"]["ID"] for r in rows] == ["socat"], rows)
    expect(rows[0]["Node"]["Datacenter"] == "primary", rows[0]["Node"])
    _, rows = p.health.connect("socat")
    expect([r["Service"]["ID"] for r in rows] == ["socat-sidecar-proxy"], rows)
    _, rows = p.health.service("socat", tag="v1")
    expect(len(rows) == 1, rows)
    _, rows = p.health.service("socat", tag="nope")
    expect(rows == [], rows)
    _, rows = p.catalog.service("web", tag="nope")
    expect(rows == [], rows)
    _, services = p.catalog.services()
    expect("socat" in services and "v1" in services["socat"], services)


# --- Endpoints tools call first ---------------------------------------------------------------


@check
def status_and_agent_self():
    leader = p.status.leader()
    expect(leader and ":" in leader, leader)
    peers = p.status.peers()
    expect(peers == [leader], peers)
    me = p.agent.self()
    expect(me["Config"]["Datacenter"] == "primary", me["Config"])
    expect(me["Config"]["PrimaryDatacenter"] == "primary", me["Config"])
    expect(me["Config"]["NodeName"], me["Config"])
    expect(s.agent.self()["Config"]["Datacenter"] == "secondary", "secondary self")


@check
def catalog_nodes():
    _, nodes = p.catalog.nodes()
    expect(len(nodes) == 1 and nodes[0]["Datacenter"] == "primary", nodes)
    name = nodes[0]["Node"]
    _, node = p.catalog.node(name)
    expect(node["Node"]["Node"] == name, node)
    expect("socat" in node["Services"], node["Services"])
    _, missing = p.catalog.node("no-such-node")
    expect(missing is None, missing)


@check
def datacenters_local_first():
    expect(p.catalog.datacenters() == ["primary", "secondary"], p.catalog.datacenters())
    expect(s.catalog.datacenters()[0] == "secondary", s.catalog.datacenters())


@check
def connect_ca():
    roots = p.connect.ca.roots()
    expect(roots["Roots"] and roots["Roots"][0]["Active"], roots)
    agent_roots = p.agent.connect.ca.roots()
    expect(agent_roots["ActiveRootID"] == roots["ActiveRootID"], agent_roots)
    config = p.connect.ca.configuration()
    expect(config["Provider"] == "consul", config)
    # PUT /v1/connect/ca/configuration: a leaf TTL in Consul's bounds; no rotation.
    expect(p.connect.ca.update_configuration("consul", {"LeafCertTTL": "12h"}), "update")
    expect(p.connect.ca.configuration()["Config"]["LeafCertTTL"] == "12h", "LeafCertTTL")
    expect(p.connect.ca.roots()["ActiveRootID"] == roots["ActiveRootID"], "no rotation")
    raises(
        consul.exceptions.BadRequest,
        "between 1h and 8760h",
        lambda: p.connect.ca.update_configuration("consul", {"LeafCertTTL": "1m"}),
    )
    leaf = p.agent.connect.ca.leaf("web", token=state["web_token"]["SecretID"])
    expect(leaf["Service"] == "web", leaf)
    expect("BEGIN CERTIFICATE" in leaf["CertPEM"], leaf)
    expect("PRIVATE KEY" in leaf["PrivateKeyPEM"], "key")
    expect(leaf["ServiceURI"].endswith("/svc/web"), leaf["ServiceURI"])
    expect(leaf["ValidBefore"] != leaf["ValidAfter"], leaf)
    raises(
        consul.ACLPermissionDenied,
        "Permission denied",
        lambda: p.agent.connect.ca.leaf("socat", token=state["web_token"]["SecretID"]),
    )


# --- ?dc= -------------------------------------------------------------------------------------


@check
def dc_parameter_forwards():
    to_primary = client(SECONDARY, dc="primary")
    _, services = to_primary.catalog.services()
    expect("socat" in services, services)
    _, rows = to_primary.health.service("socat", passing=True)
    expect([r["Node"]["Datacenter"] for r in rows] == ["primary"], rows)
    _, local = s.catalog.services()
    expect("socat" not in local, local)
    raises(
        consul.ConsulException,
        "No path to datacenter",
        lambda: client(PRIMARY, dc="nowhere").catalog.services(),
    )


# --- Health checks ----------------------------------------------------------------------------


@check
def ttl_check():
    expect(p.agent.check.register("socat-ttl", Check.ttl("30s"), check_id="socat-ttl", service_id="socat"), "reg")
    _, checks = p.health.checks("socat")
    expect(any(c["CheckID"] == "socat-ttl" and c["Status"] == "critical" for c in checks), checks)
    _, rows = p.health.service("socat", passing=True)
    expect(rows == [], rows)
    expect(p.agent.check.ttl_pass("socat-ttl", notes="fine"), "pass")
    _, rows = p.health.service("socat", passing=True)
    expect(len(rows) == 1, rows)
    expect(p.agent.check.ttl_fail("socat-ttl"), "fail")
    _, rows = p.health.connect("socat", passing=True)
    expect(rows == [], f"the sidecar aliases socat's checks: {rows}")
    expect(p.agent.check.deregister("socat-ttl"), "dereg")
    _, rows = p.health.connect("socat", passing=True)
    expect(len(rows) == 1, rows)


if failures:
    print(f"\n{len(failures)} check(s) failed: {', '.join(failures)}")
    sys.exit(1)
print("\nall checks passed")
