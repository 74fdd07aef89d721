"""Prefixes, Redis Cluster, Sentinel, TLS + ACL, and the cost of an idle fleet.

    python -m pytest -q tests/test_topology.py

The session starts the real thing on free localhost ports, each in its own temp folder,
and kills every process by pid at the end: a Redis Cluster of 3 masters + 3 replicas,
a master + replica + 3 sentinels, a TLS redis-server (CA, server and client certificates
made with `openssl` here; an ACL user whose password is not ASCII), and two plain
redis-servers for the idle-cost measurements. Ports and the folder are fixed when the
pytest process first imports this module and passed to worker processes in WAKAQ_TOPO_*
variables, because workers import the apps below as `tests.test_topology:APP`.

Tasks record what they saw in the harness's private test Redis (conftest.rec, keys
`test:*`), never in the Redis under test, so a failover cannot eat a record.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from urllib.parse import quote

import pytest
import redis

from conftest import (
    ENV,
    PRIVATE,
    REDIS_CLI,
    REDIS_SERVER,
    URL,
    Server,
    children,
    cli,
    need_binaries,
    rec,
    redis_argv,
    retrying,
    runs,
    stop_servers,
    wait_for,
)
from wakaq import CronTask, WakaQ

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.slow

# ===================================================================== ports, folder, urls

N_CLUSTER = 6
_NAMES = ["c%d" % i for i in range(N_CLUSTER)] + [
    "s_master",
    "s_replica",
    "sent1",
    "sent2",
    "sent3",
    "tls",
    "down",
    "idle1",
    "idle3",
]


def _bindable(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ephemeral_start():
    """The first port of the kernel's range for outgoing connections: a port in it may be
    taken by a client socket between the pick and the server's start."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _pick_ports():
    """Free ports below the ephemeral range, from 20000; a cluster node's bus port
    (+10000) must be free and below that range too."""
    rng, chosen, start = random.Random(), [], _ephemeral_start()
    top, node_top = (29000, 22000) if start < 23000 else (min(start, 29000), start - 10000)
    while len(chosen) < len(_NAMES):
        node = len(chosen) < N_CLUSTER
        p = rng.randrange(20000, node_top if node else top)
        bus_ok = not node or _bindable(p + 10000)
        if p not in chosen and _bindable(p) and bus_ok:
            chosen.append(p)
    return chosen


if "WAKAQ_TOPO_PORTS" not in os.environ:  # the pytest process decides; workers inherit
    os.environ["WAKAQ_TOPO_PORTS"] = ",".join(map(str, _pick_ports()))
    os.environ["WAKAQ_TOPO_DIR"] = os.path.join(tempfile.gettempdir(), f"wakaq-topo-{os.getpid()}")
    os.environ["WAKAQ_TOPO_OWNER"] = str(os.getpid())
for _var in ("WAKAQ_TOPO_PORTS", "WAKAQ_TOPO_DIR", "WAKAQ_TOPO_OWNER"):
    ENV[_var] = os.environ[_var]  # the harness's spawn() passes ENV to workers
PORT = dict(zip(_NAMES, map(int, os.environ["WAKAQ_TOPO_PORTS"].split(","))))
TOPO_DIR = os.environ["WAKAQ_TOPO_DIR"]
TLS_DIR = os.path.join(TOPO_DIR, "tls")
CLUSTER_PORTS = [PORT["c%d" % i] for i in range(N_CLUSTER)]
SENTINEL_PORTS = [PORT["sent1"], PORT["sent2"], PORT["sent3"]]

# redis-cli --cluster create makes the first three nodes masters of slots 0-5460,
# 5461-10922, 10923-16383; "{wakaq}" hashes to slot 10243, so node 0 does NOT own the
# app's keys (the cluster fixture asserts it).
CLUSTER_URL = f"redis://127.0.0.1:{CLUSTER_PORTS[0]}/0"
SENTINEL_URL = (
    "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in SENTINEL_PORTS) + "/mymaster/0"
)
ACL_USER = "wakaq_user"
PASSWORD = "topsecret42-Grüße-секрет-ü"  # non-ASCII; "topsecret42" must never show
TLS_QUERY = (
    f"ssl_ca_certs={TLS_DIR}/ca.crt&ssl_certfile={TLS_DIR}/client.crt"
    f"&ssl_keyfile={TLS_DIR}/client.key&ssl_cert_reqs=required"
)
TLS_URL = f"rediss://{ACL_USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{PORT['tls']}/0?{TLS_QUERY}"
TLS_DOWN_URL = (
    f"rediss://{ACL_USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{PORT['down']}/0?{TLS_QUERY}"
)
IDLE1_URL = f"redis://127.0.0.1:{PORT['idle1']}/0"
IDLE3_URL = f"redis://127.0.0.1:{PORT['idle3']}/0"

# ===================================================================== apps and tasks


def _mark(key, member):
    """Record that `member` ran at least once (a set in the test Redis)."""
    time.sleep(0.01)  # a drain of 1,000 takes seconds: room for a failover
    retrying(lambda c: c.sadd(f"test:{key}", member))


def _stamp(key, tag):
    rec(key, tag, time.time(), os.getpid(), os.getppid())


# --- Redis Cluster: url names a node that does not own the app's slot
cluster_app = WakaQ(
    queues=[(0, "high"), "default"],
    url=CLUSTER_URL,
    concurrency=2,
    heartbeat_timeout=10,
    schedules=[CronTask("* * * * * *", "ctick")],
)
ctask = cluster_app.task(lambda tag, i: _stamp("c:" + tag, i), name="ctask")
cmark = cluster_app.task(lambda i: _mark("cdone", i), name="cmark")
ctick = cluster_app.task(lambda: _stamp("ctick", 0), name="ctick")

# --- Sentinel
sentinel_app = WakaQ(url=SENTINEL_URL, concurrency=2, heartbeat_timeout=10)
stask = sentinel_app.task(lambda i: _stamp("s:task", i), name="stask")
smark = sentinel_app.task(lambda i: _mark("sdone", i), name="smark")

# --- TLS + ACL user with a non-ASCII password; the same settings against a port where
# nothing listens ("Redis down")
tls_app = WakaQ(url=TLS_URL, concurrency=1, heartbeat_timeout=10)
ttask = tls_app.task(lambda i: _stamp("t:task", i), name="ttask")
tls_down_app = WakaQ(url=TLS_DOWN_URL, concurrency=1, heartbeat_timeout=10)
tdown = tls_down_app.task(lambda i: None, name="tdown")

# --- two apps, one Redis db, plus producers of a task that the
# app's own workers do not know (to make dead letters through the public API)
appa = WakaQ(queues=["emails"], prefix="appa", url=URL, concurrency=1, heartbeat_timeout=10)
send_email = appa.task(lambda i: _stamp("a:email", i), name="send_email")
a_ping = appa.task(lambda tag: _stamp("a:ping", tag), name="a_ping")
appb = WakaQ(queues=["reports"], prefix="appb", url=URL, concurrency=1, heartbeat_timeout=10)
report = appb.task(lambda i: _stamp("b:report", i), name="report")
refresh_cache = appb.task(lambda tag: _stamp("b:refresh", tag), name="refresh_cache")
ghost_a = WakaQ(queues=["emails"], prefix="appa", url=URL).task(lambda: None, name="ghost")
ghost_b = WakaQ(queues=["reports"], prefix="appb", url=URL).task(lambda: None, name="ghost")

# --- the default layout
plain_app = WakaQ(queues=["default", "emails"], url=URL, concurrency=1, heartbeat_timeout=10)
pnote = plain_app.task(lambda tag: _stamp("p:note", tag), name="pnote")
ghost_p = WakaQ(queues=["default", "emails"], url=URL).task(lambda: None, name="ghost")

# --- idle cost: concurrency=2, 3 queues, each on its own private redis-server
idle_app = WakaQ(
    queues=[(0, "a"), (1, "b"), (2, "c")], url=IDLE1_URL, concurrency=2, heartbeat_timeout=10
)
istamp = idle_app.task(lambda i: _stamp("i:stamp", i), name="istamp")
fleet_app = WakaQ(
    queues=[(0, "a"), (1, "b"), (2, "c")], url=IDLE3_URL, concurrency=2, heartbeat_timeout=10
)
fleet_app.task(lambda i: None, name="istamp")

# ===================================================================== servers


@pytest.fixture(scope="session")
def topo_dir():
    os.makedirs(TOPO_DIR, exist_ok=True)
    yield TOPO_DIR
    if os.environ.get("WAKAQ_TOPO_OWNER") == str(os.getpid()):
        shutil.rmtree(TOPO_DIR, ignore_errors=True)


class Cluster:
    def __init__(self, nodes):
        self.nodes = nodes

    def view(self, port):
        """CLUSTER NODES as seen by `port`: [{id, port, master (bool), of, slots, myself}]."""
        out = []
        with redis.Redis(port=port, socket_timeout=5, decode_responses=True) as c:
            text = c.execute_command("CLUSTER", "NODES")
        for line in text.strip().splitlines():
            f = line.split()
            flags = f[2].split(",")
            slots = []
            for s in f[8:]:
                if s.startswith("["):
                    continue
                lo, _, hi = s.partition("-")
                slots.append((int(lo), int(hi or lo)))
            out.append(
                dict(
                    id=f[0],
                    port=int(f[1].split("@")[0].rsplit(":", 1)[1]),
                    master="master" in flags,
                    of=f[3],
                    slots=slots,
                    myself="myself" in flags,
                    fail="fail" in flags,
                )
            )
        return out

    def owner(self, slot, port=None):
        for n in self.view(port or CLUSTER_PORTS[0]):
            if n["master"] and any(lo <= slot <= hi for lo, hi in n["slots"]):
                return n
        return None

    def replica_of(self, node, port=None):
        return [n for n in self.view(port or node["port"]) if n["of"] == node["id"]]

    def masters(self):
        return [n for n in self.view(CLUSTER_PORTS[0]) if n["master"]]

    def describe(self):
        try:
            return "\n".join(str(n) for n in self.view(CLUSTER_PORTS[0]))
        except Exception as e:
            return f"(cluster view failed: {e})"

    def admin(self):
        return redis.RedisCluster(host="127.0.0.1", port=CLUSTER_PORTS[0], socket_timeout=5)


def _cluster_ready():
    for port in CLUSTER_PORTS:
        try:
            with redis.Redis(port=port, socket_timeout=2, decode_responses=True) as c:
                if c.cluster("info")["cluster_state"] != "ok":
                    return False
                repl = c.info("replication")
                if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                    return False
                nodes = c.execute_command("CLUSTER", "NODES")
                if isinstance(nodes, str) and (
                    nodes.count("master") != 3 or nodes.count("slave") != 3
                ):
                    return False
        except redis.RedisError:
            return False
    return True


@pytest.fixture(scope="session")
def cluster(topo_dir):
    need_binaries(("redis-server", REDIS_SERVER), ("redis-cli", REDIS_CLI))
    nodes = [
        Server(
            redis_argv(
                p,
                os.path.join(topo_dir, f"cluster-{p}"),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "3000",
            ),
            p,
            os.path.join(topo_dir, f"cluster-{p}"),
        )
        for p in CLUSTER_PORTS
    ]
    try:
        for n in nodes:
            n.start()
        for n in nodes:
            n.wait_up()
        made = subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in CLUSTER_PORTS),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert made.returncode == 0, (
            f"redis-cli --cluster create failed:\n{made.stdout}{made.stderr}"
        )
        cl = Cluster(nodes)
        wait_for(
            _cluster_ready,
            "cluster_state:ok and replicas in sync on all 6 nodes",
            30,
            diag=cl.describe,
        )
        from redis.crc import key_slot

        slot = key_slot(cluster_app._k("q", "default").encode())
        owner = cl.owner(slot)
        assert owner and owner["port"] != CLUSTER_PORTS[0], (
            f"node 0 must not own slot {slot} of the app's keys:\n{cl.describe()}"
        )
        cl.slot = slot
        yield cl
    finally:
        stop_servers(nodes)


def _delete_prefix(client, prefix):
    for key in list(client.scan_iter(match="{%s}*" % prefix, count=1000)):
        client.delete(key)


@pytest.fixture
def cl(cluster, r):
    """The cluster with the app's keys deleted (on whichever master owns them now)."""
    for m in cluster.masters():
        with redis.Redis(port=m["port"], socket_timeout=5) as c:
            _delete_prefix(c, "wakaq")
    yield cluster


def _sentinel_conf(folder, port, master_port):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "sentinel.conf")
    with open(path, "w") as f:
        f.write(
            f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
            f"logfile {os.path.join(folder, 'redis.log')}\n"
            f"sentinel monitor mymaster 127.0.0.1 {master_port} 2\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 5000\n"
            "sentinel parallel-syncs mymaster 1\n"
        )
    return path


class SentinelSet:
    def __init__(self, servers):
        self.servers = servers

    def sentinel(self):
        from redis.sentinel import Sentinel

        return Sentinel([("127.0.0.1", p) for p in SENTINEL_PORTS], socket_timeout=2)

    def master_port(self):
        with redis.Redis(port=SENTINEL_PORTS[0], socket_timeout=2, decode_responses=True) as s:
            return int(s.execute_command("SENTINEL", "get-master-addr-by-name", "mymaster")[1])

    def master(self):
        return redis.Redis(port=self.master_port(), socket_timeout=5)

    def describe(self):
        lines = []
        for p in SENTINEL_PORTS:
            try:
                with redis.Redis(port=p, socket_timeout=2, decode_responses=True) as s:
                    m = s.sentinel_master("mymaster")
                    lines.append(
                        f"sentinel {p}: master {m.get('ip')}:{m.get('port')} "
                        f"flags={m.get('flags')} slaves={m.get('num-slaves')} "
                        f"sentinels={m.get('num-other-sentinels')}"
                    )
            except Exception as e:
                lines.append(f"sentinel {p}: {e}")
        return "\n".join(lines)


@pytest.fixture(scope="session")
def sentinel_set(topo_dir):
    need_binaries(("redis-server", REDIS_SERVER))
    m, rp = PORT["s_master"], PORT["s_replica"]
    folder = lambda name: os.path.join(topo_dir, name)  # noqa: E731
    servers = [
        Server(redis_argv(m, folder("s-master")), m, folder("s-master")),
        Server(
            redis_argv(rp, folder("s-replica"), "--replicaof", "127.0.0.1", str(m)),
            rp,
            folder("s-replica"),
        ),
    ]
    for i, p in enumerate(SENTINEL_PORTS):
        conf = _sentinel_conf(folder(f"sentinel-{i}"), p, m)
        # no redis-sentinel package needed: redis-server runs as a sentinel with --sentinel
        servers.append(Server([REDIS_SERVER, conf, "--sentinel"], p, folder(f"sentinel-{i}")))
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_up()
        ss = SentinelSet(servers)

        def ready():
            try:
                with redis.Redis(port=rp, socket_timeout=2, decode_responses=True) as c:
                    if c.info("replication").get("master_link_status") != "up":
                        return False
                for p in SENTINEL_PORTS:
                    with redis.Redis(port=p, socket_timeout=2, decode_responses=True) as s:
                        info = s.sentinel_master("mymaster")
                        if (
                            int(info["num-slaves"]) < 1
                            or int(info["num-other-sentinels"]) < 2
                            or info["flags"] != "master"
                        ):
                            return False
                return True
            except redis.RedisError:
                return False

        wait_for(ready, "3 sentinels that know each other and the replica", 30, diag=ss.describe)
        yield ss
    finally:
        stop_servers(servers)


def _make_certs(folder):
    """A CA, and server and client certificates it signed (EC keys: fast to make)."""
    os.makedirs(folder, exist_ok=True)

    def ssl(*args):
        done = subprocess.run([OPENSSL, *args], cwd=folder, capture_output=True, text=True)
        assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ssl(
        "req",
        "-x509",
        *key,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=wakaq test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    for name in ("server", "client"):
        with open(os.path.join(folder, f"{name}.ext"), "w") as f:
            f.write(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                f"extendedKeyUsage={'serverAuth' if name == 'server' else 'clientAuth'}\n"
                "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
            )
        ssl(
            "req",
            "-new",
            *key,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=wakaq test {name}",
        )
        ssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )


TLS_CLIENT = dict(
    ssl=True,
    ssl_ca_certs=f"{TLS_DIR}/ca.crt",
    ssl_certfile=f"{TLS_DIR}/client.crt",
    ssl_keyfile=f"{TLS_DIR}/client.key",
    ssl_cert_reqs="required",
)


@pytest.fixture(scope="session")
def tls_server(topo_dir):
    """TLS only (--port 0), client certificates required, the default user switched off:
    only ACL_USER with PASSWORD gets in."""
    need_binaries(("redis-server", REDIS_SERVER), ("openssl", OPENSSL))
    _make_certs(TLS_DIR)
    p, folder = PORT["tls"], os.path.join(topo_dir, "tls-server")
    argv = redis_argv(
        0,
        folder,
        "--tls-port",
        str(p),
        "--tls-cert-file",
        f"{TLS_DIR}/server.crt",
        "--tls-key-file",
        f"{TLS_DIR}/server.key",
        "--tls-ca-cert-file",
        f"{TLS_DIR}/ca.crt",
        "--tls-auth-clients",
        "yes",
    )
    server = Server(argv, p, folder, **TLS_CLIENT)
    try:
        server.start().wait_up()
        with server.client() as c:
            c.execute_command("ACL", "SETUSER", ACL_USER, "on", ">" + PASSWORD, "~*", "&*", "+@all")
            c.execute_command("ACL", "SETUSER", "default", "off")
        server.kw.update(username=ACL_USER, password=PASSWORD)
        with server.client() as c:
            assert c.acl_whoami() in (b"wakaq_user", "wakaq_user")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def idle_servers(topo_dir):
    need_binaries(("redis-server", REDIS_SERVER))
    servers = [
        Server(redis_argv(PORT[n], os.path.join(topo_dir, n)), PORT[n], os.path.join(topo_dir, n))
        for n in ("idle1", "idle3")
    ]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_up()
        yield servers
    finally:
        stop_servers(servers)


# ===================================================================== helpers


def info_json(spec):
    done = cli("info", spec, "--json")
    assert done.returncode == 0, f"info {spec} --json exited {done.returncode}:\n{done.stderr}"
    return json.loads(done.stdout)


def worker_pids(client, the_app):
    """Pids of the workers registered in the app's workers zset (id HOST.PID.RAND)."""
    try:
        members = client.zrange(the_app._k("workers"), 0, -1)
    except redis.RedisError:
        return set()
    return {int(m.decode().rsplit(".", 2)[1]) for m in members}


def workers_ready(client, the_app, procs, spawned, timeout=20):
    pids = {p.pid for p in procs}
    wait_for(
        lambda: (
            pids <= worker_pids(client, the_app)
            and all(len(children(p)) == the_app.concurrency for p in pids)
        ),
        f"workers {sorted(pids)} of {the_app.prefix} to register and fork",
        timeout,
        diag=spawned.tails,
    )


def scard(r, key):
    return r.scard(f"test:{key}")


def tags(r, key):
    return sorted(entry[0] for entry in runs(r, key))


# ===================================================================== Redis Cluster


def test_cluster_tasks_run_via_a_node_that_does_not_own_the_slot(cl, r, spawn):
    assert cl.owner(cl.slot)["port"] != CLUSTER_PORTS[0]
    w = spawn("worker", "tests.test_topology:cluster_app")
    workers_ready(cl.admin(), cluster_app, [w], spawn)
    for i in range(10):
        ctask.delay("run", i)
        ctask.delay("run", 10 + i, queue="high")
    wait_for(
        lambda: len(runs(r, "c:run")) >= 20, "20 tasks to run on the cluster", 20, diag=spawn.tails
    )
    assert tags(r, "c:run") == list(range(20))
    assert {e[3] for e in runs(r, "c:run")} == {w.pid}


def test_cluster_delayed_tasks_run(cl, r, spawn):
    w = spawn("worker", "tests.test_topology:cluster_app")
    workers_ready(cl.admin(), cluster_app, [w], spawn)
    start = time.time()
    ctask.delay("eta", 1, eta=1)
    ctask.delay("eta", 2, eta=2, queue="high")
    wait_for(
        lambda: len(runs(r, "c:eta")) >= 2,
        "2 delayed tasks to run on the cluster",
        20,
        diag=spawn.tails,
    )
    ran = {e[0]: e[1] - start for e in runs(r, "c:eta")}
    assert sorted(ran) == [1, 2]
    assert 0.9 <= ran[1] <= 3.5 and 1.9 <= ran[2] <= 4.5, ran


def test_cluster_broadcast_reaches_each_worker(cl, r, spawn):
    ws = [spawn("worker", "tests.test_topology:cluster_app") for _ in range(2)]
    workers_ready(cl.admin(), cluster_app, ws, spawn)
    assert ctask.broadcast("bcast", 7) == 2
    wait_for(
        lambda: len(runs(r, "c:bcast")) >= 2,
        "the broadcast to run on both workers",
        20,
        diag=spawn.tails,
    )
    assert sorted(e[3] for e in runs(r, "c:bcast")) == sorted(w.pid for w in ws)


def test_cluster_cron_fires(cl, r, spawn):
    w = spawn("worker", "tests.test_topology:cluster_app")
    spawn("scheduler", "tests.test_topology:cluster_app")
    workers_ready(cl.admin(), cluster_app, [w], spawn)
    wait_for(
        lambda: len(runs(r, "ctick")) >= 2,
        "the every-second schedule to fire twice",
        20,
        diag=spawn.tails,
    )


def test_cluster_info_json(cl, r, spawn):
    for i in range(3):
        ctask.delay("info", i)
    for i in range(2):
        ctask.delay("info", 10 + i, eta=3600)
    ctask.delay("info", 20, queue="high", eta=3600)
    j = info_json("tests.test_topology:cluster_app")
    assert j["queues"]["default"]["pending"] == 3 and j["queues"]["default"]["delayed"] == 2, j
    assert j["queues"]["high"]["pending"] == 0 and j["queues"]["high"]["delayed"] == 1, j
    assert j["queues"]["high"]["priority"] == 0, j
    assert (j["workers"], j["dead"], j["inflight"]) == (0, 0, 0), j
    w = spawn("worker", "tests.test_topology:cluster_app")
    workers_ready(cl.admin(), cluster_app, [w], spawn)
    wait_for(lambda: len(runs(r, "c:info")) >= 3, "the 3 ready tasks to run", 20, diag=spawn.tails)
    j = info_json("tests.test_topology:cluster_app")
    assert j["workers"] == 1, j
    assert j["queues"]["default"]["pending"] == 0 and j["queues"]["default"]["delayed"] == 2, j


def test_cluster_failover_of_the_apps_master_loses_no_task(cl, r, spawn):
    n = 1000
    for i in range(n):
        cmark.delay(i)
    old = cl.owner(cl.slot)
    replica = cl.replica_of(old)[0]
    w = spawn("worker", "tests.test_topology:cluster_app")
    wait_for(
        lambda: scard(r, "cdone") >= 100, "the worker to drain 100 tasks", 30, diag=spawn.tails
    )
    with redis.Redis(port=replica["port"], socket_timeout=10) as c:
        c.execute_command("CLUSTER", "FAILOVER")
    wait_for(
        lambda: (
            (cl.owner(cl.slot, replica["port"]) or {}).get("port") == replica["port"]
            and (cl.owner(cl.slot) or {}).get("port") == replica["port"]
        ),
        f"replica {replica['port']} to take over slot {cl.slot}",
        20,
        diag=cl.describe,
    )
    at_failover = scard(r, "cdone")
    wait_for(
        lambda: scard(r, "cdone") >= n,
        f"all {n} tasks to run after the failover",
        60,
        diag=lambda: (
            f"done {scard(r, 'cdone')}/{n}, {at_failover} at the failover\n"
            f"{cl.describe()}\n{spawn.tails()}"
        ),
    )
    assert at_failover < n, "the drain ended before the failover: nothing was tested"
    assert w.alive(), spawn.tails()


# ===================================================================== Sentinel


def landed_on_the_sentinel_master(sentinel_set, n=1):
    """Guard: the first task(s) must be on the master the Sentinels name (and nowhere
    else: a wrongly connected client would write to some other Redis, e.g. localhost:6379)."""
    key = sentinel_app._k("q", sentinel_app.default_queue.name)
    with sentinel_set.master() as m:
        length = m.llen(key)
    assert length == n, (
        f"{n} task(s) enqueued via {SENTINEL_URL}, but the Sentinels' master "
        f"127.0.0.1:{sentinel_set.master_port()} holds {length} in {key}"
    )


def test_sentinel_tasks_run(sentinel_set, r, spawn):
    sentinel_set.master().flushall()
    stask.delay(0)
    landed_on_the_sentinel_master(sentinel_set)
    w = spawn("worker", "tests.test_topology:sentinel_app")
    workers_ready(sentinel_set.master(), sentinel_app, [w], spawn)
    for i in range(1, 10):
        stask.delay(i)
    stask.delay(10, eta=1)
    wait_for(
        lambda: len(runs(r, "s:task")) >= 11, "11 tasks to run via sentinel", 20, diag=spawn.tails
    )
    assert tags(r, "s:task") == list(range(11))


def test_sentinel_failover_mid_run_loses_no_task(sentinel_set, r, spawn):
    sentinel_set.master().flushall()
    n = 1000
    smark.delay(0)
    landed_on_the_sentinel_master(sentinel_set)
    for i in range(1, n):
        smark.delay(i)
    old = sentinel_set.master_port()
    w = spawn("worker", "tests.test_topology:sentinel_app")
    wait_for(
        lambda: scard(r, "sdone") >= 100, "the worker to drain 100 tasks", 30, diag=spawn.tails
    )
    with redis.Redis(port=SENTINEL_PORTS[0], socket_timeout=10) as s:
        s.execute_command("SENTINEL", "FAILOVER", "mymaster")
    wait_for(
        lambda: sentinel_set.master_port() != old,
        "sentinels to name a new master",
        30,
        diag=sentinel_set.describe,
    )
    at_failover = scard(r, "sdone")
    wait_for(
        lambda: scard(r, "sdone") >= n,
        f"all {n} tasks to run after the failover",
        60,
        diag=lambda: (
            f"done {scard(r, 'sdone')}/{n}, {at_failover} at the failover\n"
            f"{sentinel_set.describe()}\n{spawn.tails()}"
        ),
    )
    assert at_failover < n, "the drain ended before the failover: nothing was tested"
    assert w.alive(), spawn.tails()


# ===================================================================== TLS + ACL

SECRET_FORMS = (
    "topsecret42",
    quote(PASSWORD, safe=""),
    quote(PASSWORD),
    PASSWORD.encode("unicode_escape").decode(),
    "Grüße",
    "секрет",
)


def assert_no_password(text, where):
    for form in SECRET_FORMS:
        assert form not in text, f"{where} shows the password ({form!r}):\n{text[-3000:]}"


def test_tls_acl_user_tasks_run_and_password_never_shown(tls_server, r, spawn):
    with tls_server.client() as c:
        c.flushall()
    w = spawn("worker", "tests.test_topology:tls_app")
    workers_ready(tls_server.client(), tls_app, [w], spawn)
    for i in range(5):
        ttask.delay(i)
    ttask.delay(5, eta=0.5)
    wait_for(
        lambda: len(runs(r, "t:task")) >= 6,
        "6 tasks to run over TLS as the ACL user",
        20,
        diag=spawn.tails,
    )
    assert tags(r, "t:task") == list(range(6))
    with tls_server.client() as c:  # the worker's connections: TLS, as the ACL user
        users = {client["user"] for client in c.client_list()}
    assert users == {ACL_USER}, users
    for args in (
        ("info", "tests.test_topology:tls_app"),
        ("info", "tests.test_topology:tls_app", "--json"),
        ("dead", "tests.test_topology:tls_app"),
    ):
        done = cli(*args)
        assert done.returncode == 0, done.stderr
        assert_no_password(done.stdout + done.stderr, " ".join(args))
    assert info_json("tests.test_topology:tls_app")["workers"] == 1
    w.stop()
    assert_no_password(w.log(), "the worker's log")


def test_tls_password_not_shown_with_redis_down(topo_dir, r, spawn):
    """The same URL (user, password, certificates) where no Redis listens."""
    for args in (
        ("info", "tests.test_topology:tls_down_app"),
        ("info", "tests.test_topology:tls_down_app", "--json"),
        ("dead", "tests.test_topology:tls_down_app"),
        ("purge", "tests.test_topology:tls_down_app", "default"),
    ):
        done = cli(*args)
        assert done.returncode != 0, f"{args} exited 0 with Redis down:\n{done.stdout}"
        assert_no_password(done.stdout + done.stderr, " ".join(args) + " (Redis down)")
    with pytest.raises(redis.RedisError) as exc:
        tdown.delay(1)
    assert_no_password(f"{exc.value} {exc.value!r}", "the exception from .delay()")
    w = spawn("worker", "tests.test_topology:tls_down_app")
    try:  # it logs the outage (once): wait for that line
        wait_for(lambda: w.log().strip() or not w.alive(), "the worker to log the outage", 10)
    except AssertionError:
        pass
    time.sleep(1.0)
    w.stop()
    assert_no_password(w.log(), "the worker's log (Redis down)")


# ===================================================================== prefixes


def _all_keys(r):
    return {k.decode() for k in r.scan_iter(count=1000)} - {
        k.decode() for k in r.scan_iter(match="test:*", count=1000)
    }


def test_two_prefixes_on_one_db_never_see_each_other(r, spawn):
    a = spawn("worker", "tests.test_topology:appa")
    workers_ready(r, appa, [a], spawn)
    # only A's worker runs; B's broadcast reaches nobody
    assert refresh_cache.broadcast("b-alone") == 0
    report.delay(1)
    report.delay(2, eta=1)
    ghost_a.delay()  # A's worker does not know "ghost": a dead letter
    send_email.delay(1)
    send_email.delay(2, eta=1.5)  # due after B's delayed task
    wait_for(
        lambda: tags(r, "a:email") == [1, 2], "A's tasks (one delayed) to run", 20, diag=spawn.tails
    )
    wait_for(
        lambda: info_json("tests.test_topology:appa")["dead"] == 1,
        "A's dead letter",
        10,
        diag=spawn.tails,
    )
    assert runs(r, "b:report") == [] and runs(r, "b:refresh") == [], "A's worker ran B's tasks"
    ia, ib = info_json("tests.test_topology:appa"), info_json("tests.test_topology:appb")
    assert set(ia["queues"]) == {"emails"} and set(ib["queues"]) == {"reports"}, (ia, ib)
    assert (ia["workers"], ib["workers"]) == (1, 0), (ia, ib)
    assert (ia["dead"], ib["dead"]) == (1, 0), (ia, ib)
    rq = ib["queues"]["reports"]
    assert rq["pending"] + rq["delayed"] == 2, ib
    assert ia["queues"]["emails"]["pending"] + ia["queues"]["emails"]["delayed"] == 0, ia
    done = cli("dead", "tests.test_topology:appb")
    assert done.returncode == 0 and "ghost" not in done.stdout, done.stdout + done.stderr
    assert not [k for k in _all_keys(r) if "{appa}" not in k and "{appb}" not in k], _all_keys(r)

    # now B has a worker too: each app's broadcast reaches its own worker only
    b = spawn("worker", "tests.test_topology:appb")
    workers_ready(r, appb, [b], spawn)
    wait_for(
        lambda: tags(r, "b:report") == [1, 2],
        "B's tasks to run on B's worker",
        20,
        diag=spawn.tails,
    )
    ghost_b.delay()
    wait_for(
        lambda: info_json("tests.test_topology:appb")["dead"] == 1,
        "B's dead letter",
        10,
        diag=spawn.tails,
    )
    assert refresh_cache.broadcast("b-both") == 1
    assert a_ping.broadcast("a-both") == 1
    send_email.delay(3)
    report.delay(3)
    wait_for(
        lambda: (
            len(runs(r, "b:refresh")) >= 1
            and len(runs(r, "a:ping")) >= 1
            and 3 in tags(r, "a:email")
            and 3 in tags(r, "b:report")
        ),
        "each broadcast and a later task to run",
        20,
        diag=spawn.tails,
    )
    assert [(e[0], e[3]) for e in runs(r, "b:refresh")] == [("b-both", b.pid)]
    assert [(e[0], e[3]) for e in runs(r, "a:ping")] == [("a-both", a.pid)]
    assert {e[3] for e in runs(r, "a:email")} == {a.pid}
    assert {e[3] for e in runs(r, "b:report")} == {b.pid}
    # dead letters: purging B's leaves A's
    assert cli("dead", "tests.test_topology:appb", "--purge").returncode == 0
    ia, ib = info_json("tests.test_topology:appa"), info_json("tests.test_topology:appb")
    assert (ia["dead"], ib["dead"]) == (1, 0), (ia, ib)
    assert (ia["workers"], ib["workers"]) == (1, 1), (ia, ib)


def test_default_layout_shares_no_key_with_the_original_wakaq(r, spawn):
    """Every key the default app writes carries the {wakaq} hash tag; none is `wakaq:Q`,
    `wakaq:eta:Q` or `wakaq-broadcast`, and nothing is published on `wakaq-broadcast`."""
    if not PRIVATE:
        pytest.skip("needs the private redis-server (keyspace notifications)")
    r.config_set("notify-keyspace-events", "KA")
    ps = r.pubsub()
    ps.psubscribe("__keyspace@0__:*", "wakaq:*")
    ps.subscribe("wakaq-broadcast")
    try:
        w = spawn("worker", "tests.test_topology:plain_app")
        workers_ready(r, plain_app, [w], spawn)
        pnote.delay("ready")
        pnote.delay("emails", queue="emails")
        pnote.delay("delayed", eta=0.5)
        assert pnote.broadcast("bcast") == 1
        ghost_p.delay()
        wait_for(
            lambda: len(runs(r, "p:note")) >= 4,
            "4 tasks (delayed, broadcast) to run",
            20,
            diag=spawn.tails,
        )
        wait_for(
            lambda: info_json("tests.test_topology:plain_app")["dead"] == 1,
            "a dead letter",
            10,
            diag=spawn.tails,
        )
        cli("dead", "tests.test_topology:plain_app", "--requeue")
        w.stop()
        seen, published = set(), []
        while True:
            msg = ps.get_message(timeout=0.2)
            if msg is None:
                break
            if msg["type"] == "pmessage" and msg["pattern"] == b"__keyspace@0__:*":
                seen.add(msg["channel"].decode().split(":", 1)[1])
            elif msg["type"] in ("message", "pmessage"):
                published.append(msg["channel"])
    finally:
        r.config_set("notify-keyspace-events", "")
        ps.close()
    seen |= _all_keys(r)
    seen = {k for k in seen if not k.startswith("test:")}
    assert seen, "no keyspace event seen: the test saw nothing"
    clash = sorted(k for k in seen if k.startswith("wakaq:") or k == "wakaq-broadcast")
    assert not clash, f"keys of the original WakaQ's layout: {clash}"
    assert not published, f"published on the original's channels: {published}"
    assert all("{wakaq}" in k for k in seen), sorted(k for k in seen if "{wakaq}" not in k)


# ===================================================================== idle cost


def _commands(client):
    """total_commands_processed and per-command calls, from one INFO ALL."""
    info = client.info("all")
    return info["total_commands_processed"], {
        k[len("cmdstat_") :]: v["calls"] for k, v in info.items() if k.startswith("cmdstat_")
    }


def test_idle_workers_cost_few_commands(idle_servers, r, spawn):
    one = idle_servers[0].client()
    three = idle_servers[1].client()
    one.flushall()
    three.flushall()
    w1 = spawn("worker", "tests.test_topology:idle_app")
    w3 = [spawn("worker", "tests.test_topology:fleet_app") for _ in range(3)]
    workers_ready(one, idle_app, [w1], spawn)
    workers_ready(three, fleet_app, w3, spawn)
    time.sleep(2.0)  # past the start-up burst
    t0 = time.monotonic()
    (a1, s1), (a3, s3) = _commands(one), _commands(three)
    time.sleep(10.0)
    (b1, e1), (b3, e3) = _commands(one), _commands(three)
    seconds = time.monotonic() - t0
    # minus our own first INFO, counted in the second reading
    rate1, rate3 = (b1 - a1 - 1) / seconds, (b3 - a3 - 1) / seconds

    def breakdown(start, end):
        d = {k: v - start.get(k, 0) for k, v in end.items() if v - start.get(k, 0)}
        d["info"] = d.get("info", 0) - 1
        return ", ".join(f"{k}={v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v)

    report = (
        f"1 idle worker: {rate1:.1f} commands/s ({breakdown(s1, e1)}); "
        f"3 idle workers: {rate3:.1f} commands/s ({breakdown(s3, e3)}) over {seconds:.1f}s"
    )
    print(report)
    assert all(p.alive() for p in [w1, *w3]), spawn.tails()
    assert rate1 <= 10 and rate3 <= 25, report


def test_idle_worker_runs_a_delayed_task_on_time(idle_servers, r, spawn):
    client = idle_servers[0].client()
    client.flushall()
    w = spawn("worker", "tests.test_topology:idle_app")
    workers_ready(client, idle_app, [w], spawn)
    time.sleep(1.0)  # idle for a while
    due = {}
    for i, (eta, queue) in enumerate([(1.0, "c"), (1.7, "a"), (2.4, "b")]):
        sec, usec = client.time()
        due[i] = sec + usec / 1e6 + eta  # Redis's clock (this host's) when it is due
        istamp.delay(i, eta=eta, queue=queue)
    wait_for(lambda: len(runs(r, "i:stamp")) >= 3, "3 delayed tasks to run", 15, diag=spawn.tails)
    late = {e[0]: round(e[1] - due[e[0]], 3) for e in runs(r, "i:stamp")}
    assert all(-0.05 <= s <= 0.5 for s in late.values()), f"seconds late: {late}"
