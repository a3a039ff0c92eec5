"""The semantics table: policies, a connection, and the decision written down by hand.

Reused by the kernel tests, which must reach the same decisions from the compiled maps. Every
expected value was worked out from Istio's rules (docs/policy.md), not computed, and carries a
one-line reason. The world is fixed and small:

    destination  default/server (app=server)  10.240.2.2, ports 8080 and 9090
    sources      default/client  cluster.local/ns/default/sa/client  10.240.1.2
                 other/client    cluster.local/ns/other/sa/client    10.240.1.5
                 default/admin   cluster.local/ns/default/sa/admin   10.240.1.9
                 plaintext       no identity                         10.240.9.9
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.identity.spiffe import SpiffeId
from agent.sources.authorization_policy import parse_policy
from agent.state.policy import Connection, Decision, Policy, Reason, Verdict, WorkloadSelectorTarget

SERVER_IP = "10.240.2.2"
PORT = 8080
OTHER_PORT = 9090
SERVER = WorkloadSelectorTarget("default", {"app": "server"})

CLIENT_IP = "10.240.1.2"
OTHER_IP = "10.240.1.5"
ADMIN_IP = "10.240.1.9"
PLAIN_IP = "10.240.9.9"
CLIENT_ID = SpiffeId("cluster.local", "default", "client")
OTHER_ID = SpiffeId("cluster.local", "other", "client")
ADMIN_ID = SpiffeId("cluster.local", "default", "admin")

CLIENT = Connection(CLIENT_IP, SERVER_IP, PORT, CLIENT_ID)
CLIENT_9090 = Connection(CLIENT_IP, SERVER_IP, OTHER_PORT, CLIENT_ID)
OTHER = Connection(OTHER_IP, SERVER_IP, PORT, OTHER_ID)
ADMIN = Connection(ADMIN_IP, SERVER_IP, PORT, ADMIN_ID)
ADMIN_9090 = Connection(ADMIN_IP, SERVER_IP, OTHER_PORT, ADMIN_ID)
PLAIN = Connection(PLAIN_IP, SERVER_IP, PORT, None)


@dataclass(frozen=True)
class Case:
    name: str
    policies: tuple[Policy, ...]
    target: WorkloadSelectorTarget
    conn: Connection
    expected: Decision


NO_POLICY = Decision(Verdict.ALLOW, Reason.NO_POLICY)
DEFAULT_DENY = Decision(Verdict.DENY, Reason.DEFAULT_DENY)


def allowed_by(key: str, *, dry_run_would_deny: str | None = None) -> Decision:
    return Decision(Verdict.ALLOW, Reason.ALLOWED_BY_POLICY, key, dry_run_would_deny)


def denied_by(key: str) -> Decision:
    return Decision(Verdict.DENY, Reason.DENIED_BY_POLICY, key)


def k8s(
    name: str, spec: dict[str, Any], *, namespace: str = "default", dry_run: bool = False
) -> Policy:
    """A Kubernetes AuthorizationPolicy, as `kubectl apply` would take it."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if dry_run:
        metadata["annotations"] = {"istio.io/dry-run": "true"}
    return parse_policy(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": metadata,
            "spec": spec,
        }
    )


def local(
    name: str,
    action: str,
    rules: list[Any],
    *,
    namespace: str = "default",
    scope: str = "Namespace",
    selector: dict[str, str] | None = None,
    dry_run: bool = False,
) -> Policy:
    """An entry of the local config's `policies:` list."""
    document: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "scope": scope,
        "action": action,
        "dryRun": dry_run,
        "rules": rules,
    }
    if selector is not None:
        document["selector"] = {"matchLabels": selector}
    return parse_policy(document)


def one_match(match: dict[str, Any]) -> list[Any]:
    """Local-shape rules of one rule, one clause, one match."""
    return [{"clauses": [{"matches": [match]}]}]


def source(**fields: Any) -> dict[str, Any]:
    """A k8s rule with one `from` entry."""
    return {"from": [{"source": fields}]}


# --- the policies -----------------------------------------------------------------------------

ALLOW_CLIENT = k8s(
    "allow-client",
    {
        "selector": {"matchLabels": {"app": "server"}},
        "rules": [source(principals=["cluster.local/ns/default/sa/client"])],
    },
)
ALLOW_NOTHING = k8s("allow-nothing", {})
DENY_NO_RULES = k8s("deny-no-rules", {"action": "DENY"})
ALLOW_ALL = k8s("allow-all", {"rules": [{}]})
DENY_DEFAULT_NS = k8s(
    "deny-default-ns", {"action": "DENY", "rules": [source(namespaces=["default"])]}
)
DENY_CLIENT_FIRST = k8s(
    "a-deny-client",
    {"action": "DENY", "rules": [source(principals=["cluster.local/ns/default/sa/client"])]},
)

DRY_DENY_CLIENT = local(
    "dry-deny-client",
    "Deny",
    one_match({"principals": [{"exact": "cluster.local/ns/default/sa/client"}]}),
    dry_run=True,
)
DRY_ALLOW_ADMIN = k8s(
    "dry-allow-admin",
    {"rules": [source(principals=["cluster.local/ns/default/sa/admin"])]},
    dry_run=True,
)

GLOBAL_ALLOW_OTHER_NS = k8s(
    "allow-other-ns", {"rules": [source(namespaces=["other"])]}, namespace="istio-system"
)
OTHER_NS_ALLOW_NOTHING = k8s("allow-nothing", {}, namespace="other")
DB_ALLOW_NOTHING = k8s("db-allow-nothing", {"selector": {"matchLabels": {"app": "db"}}})
LOCAL_DENY_9090 = local(
    "deny-9090",
    "Deny",
    one_match({"destinationPorts": [9090]}),
    scope="WorkloadSelector",
    selector={"app": "server"},
)
ROOT_SELECTOR_DENY = k8s(
    "deny-server-everywhere",
    {
        "selector": {"matchLabels": {"app": "server"}},
        "action": "DENY",
        "rules": [source(notNamespaces=["default"])],
    },
    namespace="istio-system",
)
LOCAL_OTHER_NS_DENY_ALL = local("deny-all", "Deny", [{"clauses": []}], namespace="other")
LOCAL_GLOBAL_DENY_PLAINTEXT = local(
    "deny-plaintext",
    "DENY",
    one_match({"notPrincipals": [{"presence": {}}]}),
    namespace="ops",
    scope="Global",
)

NS_EXACT = local("allow-ns-other", "Allow", one_match({"namespaces": [{"exact": "other"}]}))
NS_PREFIX = k8s("allow-ns-prefix", {"rules": [source(namespaces=["oth*"])]})
NS_SUFFIX = k8s("allow-ns-suffix", {"rules": [source(namespaces=["*ault"])]})
NS_PRESENCE = k8s("allow-any-ns", {"rules": [source(namespaces=["*"])]})
NOT_NS = k8s("allow-not-default", {"rules": [source(notNamespaces=["default"])]})

SA_CLIENT = local(
    "allow-sa-client",
    "Allow",
    one_match({"serviceAccounts": [{"namespace": "default", "serviceAccount": "client"}]}),
)
NOT_SA_CLIENT = local(
    "allow-not-sa-client",
    "Allow",
    one_match({"notServiceAccounts": [{"namespace": "default", "serviceAccount": "client"}]}),
)
K8S_SA = k8s("allow-sa", {"rules": [source(serviceAccounts=["client", "other/client"])]})

PRINCIPAL_PREFIX = k8s(
    "allow-default-principals", {"rules": [source(principals=["cluster.local/ns/default/*"])]}
)
PRINCIPAL_SUFFIX = k8s("allow-client-sa-anywhere", {"rules": [source(principals=["*/sa/client"])]})
PRINCIPAL_PRESENCE = local(
    "allow-authenticated", "Allow", one_match({"principals": [{"presence": {}}]})
)
DENY_PLAINTEXT = k8s("deny-plaintext", {"action": "DENY", "rules": [source(notPrincipals=["*"])]})
NOT_PRINCIPAL_ADMIN = local(
    "allow-not-admin",
    "Allow",
    one_match({"notPrincipals": [{"exact": "cluster.local/ns/default/sa/admin"}]}),
)

SRC_CIDR = k8s("allow-client-subnet", {"rules": [source(ipBlocks=["10.240.1.0/24"])]})
SRC_IP = local("allow-admin-ip", "Allow", one_match({"sourceIps": ["10.240.1.9"]}))
NOT_SRC_CIDR = k8s(
    "deny-outside-subnet", {"action": "DENY", "rules": [source(notIpBlocks=["10.240.1.0/24"])]}
)
REMOTE_IP = k8s("allow-remote-admin", {"rules": [source(remoteIpBlocks=["10.240.1.9/32"])]})
DST_IP = local("allow-to-server-ip", "Allow", one_match({"destinationIps": ["10.240.2.2/32"]}))
DST_OTHER_SUBNET = local(
    "allow-to-other-subnet", "Allow", one_match({"destinationIps": ["10.240.3.0/24"]})
)
NOT_DST_SERVER = local(
    "deny-not-server-ip", "Deny", one_match({"notDestinationIps": ["10.240.2.2"]})
)
NOT_DST_OTHER_SUBNET = local(
    "deny-not-other-subnet", "Deny", one_match({"notDestinationIps": ["10.240.3.0/24"]})
)

PORTS_8080 = k8s("allow-8080", {"rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]})
NOT_PORT_8080 = local("deny-not-8080", "Deny", one_match({"notDestinationPorts": [8080]}))

FROM_OR = k8s(
    "allow-other-or-admin",
    {
        "rules": [
            {
                "from": [
                    {"source": {"namespaces": ["other"]}},
                    {"source": {"principals": ["cluster.local/ns/default/sa/admin"]}},
                ]
            }
        ]
    },
)
FROM_AND_TO = k8s(
    "allow-default-to-8080",
    {
        "rules": [
            {
                "from": [{"source": {"namespaces": ["default"]}}],
                "to": [{"operation": {"ports": ["8080"]}}],
            }
        ]
    },
)
LOCAL_NESTED = local(
    "allow-nested",
    "Allow",
    [
        {
            "clauses": [
                {
                    "matches": [
                        {"namespaces": [{"exact": "other"}]},
                        {"principals": [{"exact": "cluster.local/ns/default/sa/admin"}]},
                    ]
                },
                {"matches": [{"destinationPorts": [8080]}]},
            ]
        }
    ],
)
LOCAL_EMPTY_CLAUSE = local("allow-empty-clause", "Allow", [{"clauses": [{"matches": []}]}])

WHEN_SOURCE_IP = k8s(
    "allow-when-source-ip",
    {"rules": [{"when": [{"key": "source.ip", "values": ["10.240.1.0/24"]}]}]},
)
WHEN_NAMESPACE = k8s(
    "allow-when-namespace",
    {"rules": [{"when": [{"key": "source.namespace", "values": ["other"]}]}]},
)
WHEN_PRINCIPAL = k8s(
    "deny-when-principal",
    {
        "action": "DENY",
        "rules": [
            {"when": [{"key": "source.principal", "values": ["cluster.local/ns/default/sa/admin"]}]}
        ],
    },
)
WHEN_PORT = k8s(
    "allow-when-port", {"rules": [{"when": [{"key": "destination.port", "values": ["9090"]}]}]}
)
WHEN_NOT_VALUES = k8s(
    "allow-when-not-default",
    {"rules": [{"when": [{"key": "source.namespace", "notValues": ["default"]}]}]},
)
WHEN_AND = k8s(
    "allow-when-default-8080",
    {
        "rules": [
            {
                "when": [
                    {"key": "source.namespace", "values": ["default"]},
                    {"key": "destination.port", "values": ["8080"]},
                ]
            }
        ]
    },
)

L7_ALLOW = k8s("allow-get", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})
L7_ALLOW_MIXED = k8s(
    "allow-get-or-other",
    {
        "rules": [
            {**source(namespaces=["default"]), "to": [{"operation": {"methods": ["GET"]}}]},
            source(namespaces=["other"]),
        ]
    },
)
L7_DENY = k8s(
    "deny-post-from-default",
    {
        "action": "DENY",
        "rules": [{**source(namespaces=["default"]), "to": [{"operation": {"methods": ["POST"]}}]}],
    },
)
L7_DENY_ONLY = k8s("deny-no-jwt", {"action": "DENY", "rules": [source(notRequestPrincipals=["*"])]})
L7_DENY_WHEN = k8s(
    "deny-debug-header",
    {
        "action": "DENY",
        "rules": [
            {
                **source(namespaces=["other"]),
                "when": [{"key": "request.headers[x-debug]", "values": ["1"]}],
            }
        ],
    },
)

RULES_OR = k8s(
    "allow-admin-or-9090",
    {
        "rules": [
            source(principals=["cluster.local/ns/default/sa/admin"]),
            {"to": [{"operation": {"ports": ["9090"]}}]},
        ]
    },
)


# --- the cases --------------------------------------------------------------------------------

CASES: list[Case] = [
    # No policy selects the workload: everything is allowed.
    Case("no policy", (), SERVER, CLIENT, NO_POLICY),
    # An ALLOW policy applies and its principal is the client's.
    Case(
        "allow-client: client", (ALLOW_CLIENT,), SERVER, CLIENT, allowed_by("default/allow-client")
    ),
    # Once an ALLOW applies, whatever it does not match is denied.
    Case("allow-client: other/client", (ALLOW_CLIENT,), SERVER, OTHER, DEFAULT_DENY),
    # No identity never matches a principal.
    Case("allow-client: plaintext", (ALLOW_CLIENT,), SERVER, PLAIN, DEFAULT_DENY),
    # spec: {} is an ALLOW without rules: matches nothing, so everything is denied.
    Case("allow-nothing: client", (ALLOW_NOTHING,), SERVER, CLIENT, DEFAULT_DENY),
    # Same for a source without identity.
    Case("allow-nothing: plaintext", (ALLOW_NOTHING,), SERVER, PLAIN, DEFAULT_DENY),
    # A DENY without rules matches nothing, and no ALLOW applies.
    Case("deny without rules: client", (DENY_NO_RULES,), SERVER, CLIENT, NO_POLICY),
    # rules: [{}] is one empty rule, which matches every connection, even plaintext.
    Case("allow-all: plaintext", (ALLOW_ALL,), SERVER, PLAIN, allowed_by("default/allow-all")),
    # DENY is evaluated first: it wins over a matching ALLOW.
    Case(
        "deny beats allow: client",
        (ALLOW_ALL, DENY_DEFAULT_NS),
        SERVER,
        CLIENT,
        denied_by("default/deny-default-ns"),
    ),
    # The DENY does not match namespace other, so the ALLOW decides.
    Case(
        "deny beats allow: other/client",
        (ALLOW_ALL, DENY_DEFAULT_NS),
        SERVER,
        OTHER,
        allowed_by("default/allow-all"),
    ),
    # Two matching DENYs: the first by (namespace, name) is named.
    Case(
        "two denies: first by name",
        (DENY_DEFAULT_NS, DENY_CLIENT_FIRST),
        SERVER,
        CLIENT,
        denied_by("default/a-deny-client"),
    ),
    # Two matching ALLOWs: likewise, allow-all sorts before allow-client.
    Case(
        "two allows: first by name",
        (ALLOW_CLIENT, ALLOW_ALL),
        SERVER,
        CLIENT,
        allowed_by("default/allow-all"),
    ),
    # --- dry run
    # A dry-run DENY does not deny, but the deny it would have made is reported.
    Case(
        "dry-run deny: client",
        (DRY_DENY_CLIENT,),
        SERVER,
        CLIENT,
        Decision(Verdict.ALLOW, Reason.NO_POLICY, None, "default/dry-deny-client"),
    ),
    # It does not match other/client: nothing to report.
    Case("dry-run deny: other/client", (DRY_DENY_CLIENT,), SERVER, OTHER, NO_POLICY),
    # A dry-run ALLOW does not turn default deny on, but reports that it would have.
    Case(
        "dry-run allow: client",
        (DRY_ALLOW_ADMIN,),
        SERVER,
        CLIENT,
        Decision(Verdict.ALLOW, Reason.NO_POLICY, None, "default-deny"),
    ),
    # The dry-run ALLOW matches admin: enforcing it would change nothing.
    Case("dry-run allow: admin", (DRY_ALLOW_ADMIN,), SERVER, ADMIN, NO_POLICY),
    # An enforced ALLOW decides; a dry-run DENY matching too is reported.
    Case(
        "dry-run deny beside enforced allow: client",
        (ALLOW_CLIENT, DRY_DENY_CLIENT),
        SERVER,
        CLIENT,
        allowed_by("default/allow-client", dry_run_would_deny="default/dry-deny-client"),
    ),
    # The enforced ALLOW matches client, so the dry-run ALLOW would not deny it either.
    Case(
        "dry-run allow beside enforced allow: client",
        (ALLOW_CLIENT, DRY_ALLOW_ADMIN),
        SERVER,
        CLIENT,
        allowed_by("default/allow-client"),
    ),
    # Already denied by an enforced DENY: the dry-run one has nothing to add.
    Case(
        "dry-run deny beside enforced deny: client",
        (DENY_DEFAULT_NS, DRY_DENY_CLIENT),
        SERVER,
        CLIENT,
        denied_by("default/deny-default-ns"),
    ),
    # Already denied by default deny: only a flip from allow to deny is reported.
    Case(
        "dry-run deny beside allow-nothing: client",
        (ALLOW_NOTHING, DRY_DENY_CLIENT),
        SERVER,
        CLIENT,
        DEFAULT_DENY,
    ),
    # --- scope
    # A policy in the root namespace without selector applies to every workload.
    Case("global allow: client", (GLOBAL_ALLOW_OTHER_NS,), SERVER, CLIENT, DEFAULT_DENY),
    # ...and allows what it matches.
    Case(
        "global allow: other/client",
        (GLOBAL_ALLOW_OTHER_NS,),
        SERVER,
        OTHER,
        allowed_by("istio-system/allow-other-ns"),
    ),
    # A namespace policy of namespace other does not govern default/server.
    Case("policy of another namespace", (OTHER_NS_ALLOW_NOTHING,), SERVER, CLIENT, NO_POLICY),
    # Same in the local shape.
    Case(
        "local policy of another namespace", (LOCAL_OTHER_NS_DENY_ALL,), SERVER, CLIENT, NO_POLICY
    ),
    # The selector wants app=db; the server is app=server.
    Case("selector does not match", (DB_ALLOW_NOTHING,), SERVER, CLIENT, NO_POLICY),
    # The local WorkloadSelector policy selects app=server and matches port 9090.
    Case(
        "local selector: port 9090",
        (LOCAL_DENY_9090,),
        SERVER,
        CLIENT_9090,
        denied_by("default/deny-9090"),
    ),
    # Same policy, port 8080: not matched, and no ALLOW applies.
    Case("local selector: port 8080", (LOCAL_DENY_9090,), SERVER, CLIENT, NO_POLICY),
    # A root-namespace policy with a selector selects matching workloads of every namespace.
    Case(
        "root namespace selector: other/client",
        (ROOT_SELECTOR_DENY,),
        SERVER,
        OTHER,
        denied_by("istio-system/deny-server-everywhere"),
    ),
    # Scope Global applies whatever the policy's namespace; plaintext has no principal.
    Case(
        "local global deny-plaintext: plaintext",
        (LOCAL_GLOBAL_DENY_PLAINTEXT,),
        SERVER,
        PLAIN,
        denied_by("ops/deny-plaintext"),
    ),
    # The client has a principal, so notPrincipals [presence] does not hold.
    Case(
        "local global deny-plaintext: client",
        (LOCAL_GLOBAL_DENY_PLAINTEXT,),
        SERVER,
        CLIENT,
        NO_POLICY,
    ),
    # --- namespaces
    # Exact namespace "other".
    Case(
        "namespace exact: other/client",
        (NS_EXACT,),
        SERVER,
        OTHER,
        allowed_by("default/allow-ns-other"),
    ),
    # "oth*" is a prefix match on "other".
    Case(
        "namespace prefix: other/client",
        (NS_PREFIX,),
        SERVER,
        OTHER,
        allowed_by("default/allow-ns-prefix"),
    ),
    # "default" does not start with "oth".
    Case("namespace prefix: client", (NS_PREFIX,), SERVER, CLIENT, DEFAULT_DENY),
    # "*ault" is a suffix match on "default".
    Case(
        "namespace suffix: client",
        (NS_SUFFIX,),
        SERVER,
        CLIENT,
        allowed_by("default/allow-ns-suffix"),
    ),
    # "other" does not end with "ault".
    Case("namespace suffix: other/client", (NS_SUFFIX,), SERVER, OTHER, DEFAULT_DENY),
    # "*" is presence: any authenticated namespace.
    Case(
        "namespace presence: other/client",
        (NS_PRESENCE,),
        SERVER,
        OTHER,
        allowed_by("default/allow-any-ns"),
    ),
    # No identity means namespace "", which presence does not match.
    Case("namespace presence: plaintext", (NS_PRESENCE,), SERVER, PLAIN, DEFAULT_DENY),
    # notNamespaces holds for a source without identity ("" is not "default").
    Case(
        "notNamespaces: plaintext",
        (NOT_NS,),
        SERVER,
        PLAIN,
        allowed_by("default/allow-not-default"),
    ),
    # The client's namespace is the excluded one.
    Case("notNamespaces: client", (NOT_NS,), SERVER, CLIENT, DEFAULT_DENY),
    # --- service accounts
    # default/client is the service account named.
    Case(
        "serviceAccounts: client",
        (SA_CLIENT,),
        SERVER,
        CLIENT,
        allowed_by("default/allow-sa-client"),
    ),
    # Same account name, other namespace: both parts must match.
    Case("serviceAccounts: other/client", (SA_CLIENT,), SERVER, OTHER, DEFAULT_DENY),
    # No identity never matches a service account.
    Case("serviceAccounts: plaintext", (SA_CLIENT,), SERVER, PLAIN, DEFAULT_DENY),
    # ...so notServiceAccounts always holds for it.
    Case(
        "notServiceAccounts: plaintext",
        (NOT_SA_CLIENT,),
        SERVER,
        PLAIN,
        allowed_by("default/allow-not-sa-client"),
    ),
    # The client is the excluded account.
    Case("notServiceAccounts: client", (NOT_SA_CLIENT,), SERVER, CLIENT, DEFAULT_DENY),
    # admin is not the excluded account.
    Case(
        "notServiceAccounts: admin",
        (NOT_SA_CLIENT,),
        SERVER,
        ADMIN,
        allowed_by("default/allow-not-sa-client"),
    ),
    # k8s serviceAccounts: "other/client" names namespace other explicitly.
    Case(
        "k8s serviceAccounts: other/client",
        (K8S_SA,),
        SERVER,
        OTHER,
        allowed_by("default/allow-sa"),
    ),
    # admin is neither "client" (a bare name is in the policy's namespace) nor other/client.
    Case("k8s serviceAccounts: admin", (K8S_SA,), SERVER, ADMIN, DEFAULT_DENY),
    # --- principals
    # "cluster.local/ns/default/*" is a prefix of admin's principal.
    Case(
        "principal prefix: admin",
        (PRINCIPAL_PREFIX,),
        SERVER,
        ADMIN,
        allowed_by("default/allow-default-principals"),
    ),
    # other/client's principal is in ns/other.
    Case("principal prefix: other/client", (PRINCIPAL_PREFIX,), SERVER, OTHER, DEFAULT_DENY),
    # "*/sa/client" is a suffix of other/client's principal.
    Case(
        "principal suffix: other/client",
        (PRINCIPAL_SUFFIX,),
        SERVER,
        OTHER,
        allowed_by("default/allow-client-sa-anywhere"),
    ),
    # admin's principal ends in /sa/admin.
    Case("principal suffix: admin", (PRINCIPAL_SUFFIX,), SERVER, ADMIN, DEFAULT_DENY),
    # presence: any principal.
    Case(
        "principal presence: admin",
        (PRINCIPAL_PRESENCE,),
        SERVER,
        ADMIN,
        allowed_by("default/allow-authenticated"),
    ),
    # No identity, no principal.
    Case("principal presence: plaintext", (PRINCIPAL_PRESENCE,), SERVER, PLAIN, DEFAULT_DENY),
    # DENY notPrincipals ["*"]: the usual "require mTLS" policy denies plaintext...
    Case(
        "deny plaintext: plaintext",
        (DENY_PLAINTEXT,),
        SERVER,
        PLAIN,
        denied_by("default/deny-plaintext"),
    ),
    # ...and lets authenticated sources through (no ALLOW applies).
    Case("deny plaintext: client", (DENY_PLAINTEXT,), SERVER, CLIENT, NO_POLICY),
    # notPrincipals exact admin: admin is excluded.
    Case("notPrincipals exact: admin", (NOT_PRINCIPAL_ADMIN,), SERVER, ADMIN, DEFAULT_DENY),
    # No identity matches no principal, so notPrincipals holds.
    Case(
        "notPrincipals exact: plaintext",
        (NOT_PRINCIPAL_ADMIN,),
        SERVER,
        PLAIN,
        allowed_by("default/allow-not-admin"),
    ),
    # --- addresses and ports
    # 10.240.1.2 is in 10.240.1.0/24.
    Case(
        "ipBlocks CIDR: client",
        (SRC_CIDR,),
        SERVER,
        CLIENT,
        allowed_by("default/allow-client-subnet"),
    ),
    # 10.240.9.9 is not.
    Case("ipBlocks CIDR: plaintext", (SRC_CIDR,), SERVER, PLAIN, DEFAULT_DENY),
    # A plain address is a /32: admin's exactly.
    Case("sourceIps exact: admin", (SRC_IP,), SERVER, ADMIN, allowed_by("default/allow-admin-ip")),
    # ...and not the client's.
    Case("sourceIps exact: client", (SRC_IP,), SERVER, CLIENT, DEFAULT_DENY),
    # notIpBlocks: 10.240.9.9 is outside the subnet, so the DENY matches.
    Case(
        "notIpBlocks: plaintext",
        (NOT_SRC_CIDR,),
        SERVER,
        PLAIN,
        denied_by("default/deny-outside-subnet"),
    ),
    # 10.240.1.5 is inside: not denied, and no ALLOW applies.
    Case("notIpBlocks: other/client", (NOT_SRC_CIDR,), SERVER, OTHER, NO_POLICY),
    # remoteIpBlocks is the source address at L4.
    Case(
        "remoteIpBlocks: admin",
        (REMOTE_IP,),
        SERVER,
        ADMIN,
        allowed_by("default/allow-remote-admin"),
    ),
    # The destination is 10.240.2.2.
    Case(
        "destinationIps: client",
        (DST_IP,),
        SERVER,
        CLIENT,
        allowed_by("default/allow-to-server-ip"),
    ),
    # 10.240.2.2 is not in 10.240.3.0/24.
    Case("destinationIps other subnet: client", (DST_OTHER_SUBNET,), SERVER, CLIENT, DEFAULT_DENY),
    # notDestinationIps names the server's own address: the DENY does not match.
    Case("notDestinationIps own address: client", (NOT_DST_SERVER,), SERVER, CLIENT, NO_POLICY),
    # The server is outside 10.240.3.0/24, so this DENY matches.
    Case(
        "notDestinationIps other subnet: client",
        (NOT_DST_OTHER_SUBNET,),
        SERVER,
        CLIENT,
        denied_by("default/deny-not-other-subnet"),
    ),
    # ports ["8080"]: port 8080 is allowed.
    Case("ports: 8080", (PORTS_8080,), SERVER, CLIENT, allowed_by("default/allow-8080")),
    # ...and 9090 is not.
    Case("ports: 9090", (PORTS_8080,), SERVER, CLIENT_9090, DEFAULT_DENY),
    # notDestinationPorts [8080]: 9090 is denied...
    Case(
        "notDestinationPorts: 9090",
        (NOT_PORT_8080,),
        SERVER,
        CLIENT_9090,
        denied_by("default/deny-not-8080"),
    ),
    # ...8080 is not.
    Case("notDestinationPorts: 8080", (NOT_PORT_8080,), SERVER, CLIENT, NO_POLICY),
    # --- structure
    # Two from entries are OR: admin matches the second.
    Case("from OR: admin", (FROM_OR,), SERVER, ADMIN, allowed_by("default/allow-other-or-admin")),
    # other/client matches the first.
    Case(
        "from OR: other/client",
        (FROM_OR,),
        SERVER,
        OTHER,
        allowed_by("default/allow-other-or-admin"),
    ),
    # The client matches neither.
    Case("from OR: client", (FROM_OR,), SERVER, CLIENT, DEFAULT_DENY),
    # from AND to: default namespace and port 8080.
    Case(
        "from AND to: client 8080",
        (FROM_AND_TO,),
        SERVER,
        CLIENT,
        allowed_by("default/allow-default-to-8080"),
    ),
    # Right source, wrong port.
    Case("from AND to: client 9090", (FROM_AND_TO,), SERVER, CLIENT_9090, DEFAULT_DENY),
    # Right port, wrong source.
    Case("from AND to: other/client 8080", (FROM_AND_TO,), SERVER, OTHER, DEFAULT_DENY),
    # Local nested: (ns other OR principal admin) AND port 8080; admin on 8080 holds.
    Case(
        "local nested: admin 8080",
        (LOCAL_NESTED,),
        SERVER,
        ADMIN,
        allowed_by("default/allow-nested"),
    ),
    # admin on 9090 fails the port clause.
    Case("local nested: admin 9090", (LOCAL_NESTED,), SERVER, ADMIN_9090, DEFAULT_DENY),
    # The client fails the first clause.
    Case("local nested: client 8080", (LOCAL_NESTED,), SERVER, CLIENT, DEFAULT_DENY),
    # A clause without matches matches everything.
    Case(
        "local empty clause: plaintext",
        (LOCAL_EMPTY_CLAUSE,),
        SERVER,
        PLAIN,
        allowed_by("default/allow-empty-clause"),
    ),
    # Two rules are OR: the second (port 9090) matches.
    Case(
        "rules OR: client 9090",
        (RULES_OR,),
        SERVER,
        CLIENT_9090,
        allowed_by("default/allow-admin-or-9090"),
    ),
    # Neither rule: not admin, not 9090.
    Case("rules OR: client 8080", (RULES_OR,), SERVER, CLIENT, DEFAULT_DENY),
    # The first rule: admin.
    Case(
        "rules OR: admin 8080",
        (RULES_OR,),
        SERVER,
        ADMIN,
        allowed_by("default/allow-admin-or-9090"),
    ),
    # --- when
    # source.ip in 10.240.1.0/24.
    Case(
        "when source.ip: client",
        (WHEN_SOURCE_IP,),
        SERVER,
        CLIENT,
        allowed_by("default/allow-when-source-ip"),
    ),
    # 10.240.9.9 is outside.
    Case("when source.ip: plaintext", (WHEN_SOURCE_IP,), SERVER, PLAIN, DEFAULT_DENY),
    # source.namespace other.
    Case(
        "when source.namespace: other/client",
        (WHEN_NAMESPACE,),
        SERVER,
        OTHER,
        allowed_by("default/allow-when-namespace"),
    ),
    # source.principal admin in a DENY.
    Case(
        "when source.principal: admin",
        (WHEN_PRINCIPAL,),
        SERVER,
        ADMIN,
        denied_by("default/deny-when-principal"),
    ),
    # The client is not admin.
    Case("when source.principal: client", (WHEN_PRINCIPAL,), SERVER, CLIENT, NO_POLICY),
    # destination.port 9090.
    Case(
        "when destination.port: 9090",
        (WHEN_PORT,),
        SERVER,
        CLIENT_9090,
        allowed_by("default/allow-when-port"),
    ),
    # 8080 is not 9090.
    Case("when destination.port: 8080", (WHEN_PORT,), SERVER, CLIENT, DEFAULT_DENY),
    # notValues: namespace other is not default.
    Case(
        "when notValues: other/client",
        (WHEN_NOT_VALUES,),
        SERVER,
        OTHER,
        allowed_by("default/allow-when-not-default"),
    ),
    # The client's namespace is the excluded value.
    Case("when notValues: client", (WHEN_NOT_VALUES,), SERVER, CLIENT, DEFAULT_DENY),
    # Two conditions are AND: namespace default and port 8080.
    Case(
        "when AND: client 8080",
        (WHEN_AND,),
        SERVER,
        CLIENT,
        allowed_by("default/allow-when-default-8080"),
    ),
    # Port 9090 fails the second condition.
    Case("when AND: client 9090", (WHEN_AND,), SERVER, CLIENT_9090, DEFAULT_DENY),
    # --- L7 fields (wrong layer)
    # The only rule needs HTTP methods: dropped, yet the ALLOW still turns default deny on.
    Case("L7 allow: client", (L7_ALLOW,), SERVER, CLIENT, DEFAULT_DENY),
    # The L7 rule is dropped even for the namespace it names.
    Case("L7 allow mixed: client", (L7_ALLOW_MIXED,), SERVER, CLIENT, DEFAULT_DENY),
    # The other, pure L4 rule still allows namespace other.
    Case(
        "L7 allow mixed: other/client",
        (L7_ALLOW_MIXED,),
        SERVER,
        OTHER,
        allowed_by("default/allow-get-or-other"),
    ),
    # DENY POST from default: without the method it denies every connection from default.
    Case(
        "L7 deny: client", (L7_DENY,), SERVER, CLIENT, denied_by("default/deny-post-from-default")
    ),
    # The L4 part still holds: namespace other is not denied.
    Case("L7 deny: other/client", (L7_DENY,), SERVER, OTHER, NO_POLICY),
    # A DENY on JWT only: at L4 it denies everything (Istio would deny nothing: issue 61126).
    Case(
        "L7-only deny: plaintext", (L7_DENY_ONLY,), SERVER, PLAIN, denied_by("default/deny-no-jwt")
    ),
    # ...authenticated sources included.
    Case("L7-only deny: client", (L7_DENY_ONLY,), SERVER, CLIENT, denied_by("default/deny-no-jwt")),
    # An L7 when condition is dropped from a DENY: every connection from other is denied.
    Case(
        "L7 when deny: other/client",
        (L7_DENY_WHEN,),
        SERVER,
        OTHER,
        denied_by("default/deny-debug-header"),
    ),
    # The L4 part (namespace other) still holds.
    Case("L7 when deny: client", (L7_DENY_WHEN,), SERVER, CLIENT, NO_POLICY),
]


# --- sets past one page of terms (256): the kernel goes through pages ------------------------
# ztunnel's own test: 10,000 DENY policies that match nothing must allow, not deny everything.


def _deny_principals(count: int) -> tuple[Policy, ...]:
    return tuple(
        k8s(f"deny-{i:05}", {"action": "DENY",
                              "rules": [source(principals=[f"cluster.local/ns/x/sa/blocked-{i}"])]})
        for i in range(count)
    )  # fmt: skip


MANY_DENIES = _deny_principals(10_000)
DENY_CLIENT_LAST = k8s("zz-deny-client", {"action": "DENY", "rules": [source(
    principals=["cluster.local/ns/default/sa/client"])]})  # fmt: skip
ALLOW_CLIENT_PAGE_2 = k8s("zz-allow-client", {"action": "ALLOW", "rules": [source(
    principals=["cluster.local/ns/default/sa/client"])]})  # fmt: skip

MANY_POLICY_CASES = [
    Case("10000 non-matching denies: client", MANY_DENIES, SERVER, CLIENT, NO_POLICY),
    Case(
        "10000 denies, the last matching: client",
        (*MANY_DENIES, DENY_CLIENT_LAST),
        SERVER,
        CLIENT,
        denied_by("default/zz-deny-client"),
    ),
    Case(
        "300 denies then an allow: client",
        (*MANY_DENIES[:300], ALLOW_CLIENT_PAGE_2),
        SERVER,
        CLIENT,
        allowed_by("default/zz-allow-client"),
    ),
    Case(
        "300 denies then an allow: other",
        (*MANY_DENIES[:300], ALLOW_CLIENT_PAGE_2),
        SERVER,
        OTHER,
        DEFAULT_DENY,
    ),
]
