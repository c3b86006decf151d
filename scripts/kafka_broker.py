#!/usr/bin/env python3
"""A real single-node Apache Kafka broker (KRaft combined mode) for tests and benchmarks.

There is no Docker and no Kafka tarball here, so the broker is assembled from Maven
Central jars (scripts/kafka/pom.xml) into a cache outside the clone and run with plain
`java`. Stdlib only; usable as a CLI and as a module (tests/conftest.py loads it by path):

    python scripts/kafka_broker.py fetch              # prints the libs dir
    python scripts/kafka_broker.py start --dir DIR    # prints 127.0.0.1:PORT
    python scripts/kafka_broker.py stop --dir DIR
    python scripts/kafka_broker.py start-cluster --dir DIR [--nodes 3]   # prints the bootstrap list
    python scripts/kafka_broker.py stop-cluster --dir DIR

    broker = kafka_broker.start(tmp_path)   # Broker(bootstrap, pid, workdir)
    ...
    broker.stop()                           # or kafka_broker.stop(tmp_path)
    secure = kafka_broker.start_secure(tmp_path)   # SecureBroker(plaintext, sasl, ssl, ...)
    (CLI: `start-secure --dir DIR` prints its listeners; `stop --dir DIR` stops it.)

    cluster = kafka_broker.start_cluster(tmp_path, nodes=3)   # Cluster(bootstrap, nodes, workdir)
    cluster.kill(2)       # kill -9 node 2 (node ids are 1..N)
    cluster.restart(2)    # the same command, ports and data; waits until it serves again
    cluster.stop_node(3)  # clean shutdown (SIGTERM); cluster.start_all() starts stopped nodes
    cluster.stop()        # every node

Cluster mode (fault tests): N nodes, each broker and controller in KRaft combined mode with
static voters (controller.quorum.voters lists every node; storage is formatted without
--standalone, with one shared cluster id). A separate quorum would cost more JVMs on 2 cores;
with N=3 combined nodes, any one node can die and the other two keep both the quorum and the
in-sync replicas. Each node lives in DIR/node<id> with its own ports (picked once, kept in
its server.properties, reused on every restart), log.dirs and broker.log. Defaults: RF 3 for
new and internal topics, min.insync.replicas 2, and a short broker session (a killed node
is fenced after 3 s, not 9 s) so that leaders move quickly.

Needs `java` 17+ (JAVA_HOME or PATH) and `mvn` on PATH for the first fetch.
Cache root: $FASTCONSUME_CACHE, default ~/.cache/fastconsume.
"""

import argparse
import atexit
import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

KAFKA_DIR = Path(__file__).resolve().parent / "kafka"
POM = KAFKA_DIR / "pom.xml"
LOG4J_CONFIG = KAFKA_DIR / "log4j2.properties"

START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
HOST = "127.0.0.1"

# Files kept in a broker's workdir.
PID_FILE = "broker.pid"
BOOTSTRAP_FILE = "bootstrap"
LOG_FILE = "broker.log"
PROPS_FILE = "server.properties"
DATA_DIR = "data"

# Marker written into libs/ once Maven succeeded; holds the pom's hash so an edited
# pom (another log4j, say) triggers a fresh fetch even when the Kafka version is the same.
MARKER = ".complete"

# Kafka's own defaults from kafka-run-class.sh / kafka-server-start.sh, with a small heap.
# Default JIT on purpose: benchmarks measure against this broker.
JVM_OPTS = [
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
]

# Brokers started by this process (pid -> Popen, workdir). Polling the Popen reaps the
# JVM when it exits, so a stopped broker is not mistaken for a live one while it is a
# zombie; the workdir lets the atexit hook below stop what a test run forgot to.
_CHILDREN: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}


class BrokerError(RuntimeError):
    """Fetching, starting or stopping the broker failed."""


# ---------------------------------------------------------------------------- fetch


def cache_root() -> Path:
    env = os.environ.get("FASTCONSUME_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastconsume"


def kafka_version() -> str:
    """The Kafka version pinned in scripts/kafka/pom.xml (single source of truth)."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(POM).getroot().find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise BrokerError(f"{POM} has no <kafka.version> property")
    return (node.text or "").strip()


def libs_dir() -> Path:
    return cache_root() / "kafka" / kafka_version() / "libs"


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def _libs_complete(libs: Path, digest: str) -> bool:
    marker = libs / MARKER
    return marker.is_file() and marker.read_text().strip() == digest


def _maven_errors(output: str) -> str:
    """The telling part of Maven's output: its first [ERROR] lines, colour codes removed.

    (Maven ends with generic "[Help 1]" boilerplate, so the tail says little.)
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", output).strip()
    errors = [line for line in text.splitlines() if line.startswith("[ERROR]")]
    return "\n".join(errors[:12]) if errors else text[-4000:]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive file lock, so parallel test workers do not run Maven into one dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch() -> Path:
    """Gather the broker's runtime jars into the cache; return the libs dir.

    Skips Maven when the libs dir is complete for the current pom.
    """
    libs = libs_dir()
    digest = _pom_digest()
    if _libs_complete(libs, digest):
        return libs
    with _locked(libs.parent / ".lock"):
        if _libs_complete(libs, digest):  # another process fetched while we waited
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError("Maven (`mvn`) is not on PATH; it is needed once to fetch Kafka")
        # Fill a scratch dir and rename it, so an interrupted run never looks complete.
        scratch = libs.parent / "libs.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        cmd = [
            mvn, "-q", "-B", "-Dstyle.color=never",
            "-f", str(POM),
            f"-Dmaven.repo.local={cache_root() / 'm2'}",
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={scratch}",
        ]  # fmt: skip
        print(
            f"kafka_broker: fetching Kafka {kafka_version()} jars into {libs}",
            file=sys.stderr,
        )
        res = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if res.returncode != 0:
            raise BrokerError(
                f"mvn exited with {res.returncode}: {' '.join(cmd)}\n" + _maven_errors(res.stdout + res.stderr)
            )
        broker_jar = scratch / f"kafka_2.13-{kafka_version()}.jar"
        if not broker_jar.is_file() or not list(scratch.glob("log4j-slf4j-impl-*.jar")):
            raise BrokerError(f"mvn succeeded but {scratch} lacks the broker or log4j binding jar")
        (scratch / MARKER).write_text(digest + "\n")
        shutil.rmtree(libs, ignore_errors=True)
        scratch.rename(libs)
    return libs


# ---------------------------------------------------------------------------- start


@dataclass
class Broker:
    """A running broker started by start()."""

    bootstrap: str
    pid: int
    workdir: Path

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        stop(self.workdir, timeout=timeout)


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise BrokerError("no `java` found (set JAVA_HOME or put Java 17+ on PATH)")
    return java


def _cluster_id() -> str:
    """A Kafka Uuid: base64url of 16 random bytes, no padding (22 chars).

    Made here rather than with `StorageTool random-uuid`, which costs a JVM start.
    Like Kafka's Uuid.randomUuid(), reroll the reserved ids and ids starting with "-"
    (a CLI parser would read those as a flag).
    """
    while True:
        raw = os.urandom(16)
        cid = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        if raw not in (bytes(16), bytes(15) + b"\x01") and not cid.startswith("-"):
            return cid


def _free_ports(n: int) -> list[int]:
    """n distinct free ports on HOST. Holding all sockets open until all are bound
    keeps them distinct; the broker could still lose a race for one, see start()."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _server_properties(workdir: Path, port: int, ctrl_port: int, overrides: Mapping[str, str]) -> dict[str, str]:
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        # Static voters, as in a multi-node setup; storage is then formatted without
        # --standalone. (The doc's --standalone + controller.quorum.bootstrap.servers
        # works too, including restarts on new ports; checked with Kafka 4.4.0.)
        "controller.quorum.voters": f"1@{HOST}:{ctrl_port}",
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{ctrl_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(workdir / DATA_DIR),
        "num.partitions": "1",
        # One node: every internal topic must make do with one replica.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Internal topics get 50 partitions by default; one node needs few, and fewer
        # means fewer files to create and load. (It does not speed up the first group
        # join on 4.4.0, measured; the FindCoordinator warm-up in start() does.)
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.num.partitions": "4",
        # Classic-protocol groups otherwise wait 3 s for more members before the first rebalance.
        "group.initial.rebalance.delay.ms": "0",
        # The log cleaner would otherwise take 128 MiB of a 512 MiB heap.
        "log.cleaner.dedupe.buffer.size": "2097152",
    }
    props.update(overrides)
    return props


def _write_properties(path: Path, props: Mapping[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))


def _read_properties(path: Path) -> dict[str, str]:
    props: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def _log_tail(workdir: Path, lines: int = 40, since: int = 0) -> str:
    """The last lines of broker.log (from byte offset `since`), for error messages."""
    try:
        with (workdir / LOG_FILE).open("rb") as fh:
            fh.seek(since)
            text = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no broker.log)"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(broker.log is empty)"


def _free_workdir(workdir: str | os.PathLike[str]) -> Path:
    """`workdir`, resolved and created; BrokerError if a broker already runs in it."""
    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    running = _running_pid(wd)
    if running is not None:
        raise BrokerError(f"a broker is already running in {wd} (pid {running}); stop it first")
    return wd


def _format_storage(java: str, libs: Path, workdir: Path, extra: Sequence[str] = ()) -> None:
    # With static voters (controller.quorum.voters) format takes no --standalone flag.
    cmd = [
        java, f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        "-cp", str(libs / "*"),
        "kafka.tools.StorageTool", "format",
        "-t", _cluster_id(),
        "-c", str(workdir / PROPS_FILE),
        *extra,
    ]  # fmt: skip
    res = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    with (workdir / LOG_FILE).open("a") as log:
        log.write(res.stdout + res.stderr)
    if res.returncode != 0:
        raise BrokerError(
            f"kafka StorageTool format failed ({res.returncode}) in {workdir}:\n"
            f"{(res.stdout + res.stderr).strip()[-4000:]}"
        )


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return buf


def _find_coordinator(port: int) -> int | None:
    """Send FindCoordinator for a group; return Kafka's error code, None if unreachable.

    The first such request makes the broker create __consumer_offsets; until that is
    loaded the answer is 15 (COORDINATOR_NOT_AVAILABLE). Doing it here takes ~0.1 s
    and makes a client's first group join ~0.1 s instead of ~1 s: librdkafka
    retries FindCoordinator only about once a second.
    """
    client_id, group = b"kafka_broker.py", b"fastconsume-warmup"
    # Request header v1 (api_key 10, version 1, correlation_id, client_id), then the
    # v1 body: key and key_type 0 (= group). v1 is not flexible: no tagged fields.
    req = struct.pack(">hhih", 10, 1, 1, len(client_id)) + client_id + struct.pack(">h", len(group)) + group + b"\x00"
    try:
        with socket.create_connection((HOST, port), timeout=2.0) as sock:
            sock.sendall(struct.pack(">i", len(req)) + req)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            resp = _recv_exact(sock, size)
    except OSError:
        return None
    # Response v1: correlation_id int32, throttle_time_ms int32, error_code int16, ...
    (error_code,) = struct.unpack_from(">h", resp, 8)
    return int(error_code)


def start(
    workdir: str | os.PathLike[str],
    *,
    timeout: float = START_TIMEOUT,
    overrides: Mapping[str, str] | None = None,
    reuse_ports: bool = False,
) -> Broker:
    """Start a single-node KRaft broker whose files live in `workdir`; wait until ready.

    Formats `workdir/data` on first use and reuses it afterwards (topics and offsets
    survive a stop/start). Picks fresh free ports each time unless `reuse_ports` is set
    and the workdir has run before: then the old ports are reused, so a client that
    keeps its bootstrap address can reconnect (broker-restart tests). `overrides` are
    extra or replacement server.properties entries.
    Ready means the broker answers on its client port and the group coordinator
    (__consumer_offsets) is available. Raises BrokerError, quoting broker.log's tail.
    """
    wd = _free_workdir(workdir)
    libs = fetch()
    java = _java()
    old_props = wd / PROPS_FILE
    fixed: tuple[int, int] | None = None
    if reuse_ports and old_props.is_file():
        old = _read_properties(old_props)
        fixed = (int(old["listeners"].split(",")[0].rsplit(":", 1)[1]),
                 int(old["controller.quorum.voters"].rsplit(":", 1)[1]))  # fmt: skip

    # A picked port can be taken by someone else before the JVM binds it: retry on that.
    attempts = 1 if fixed else 3
    for attempt in range(1, attempts + 1):
        port, ctrl_port = fixed or _free_ports(2)
        _write_properties(wd / PROPS_FILE, _server_properties(wd, port, ctrl_port, overrides or {}))
        if not (wd / DATA_DIR / "meta.properties").is_file():
            _format_storage(java, libs, wd)
        try:
            return _launch(java, libs, wd, port=port, ctrl_port=ctrl_port, timeout=timeout)
        except _PortTakenError:
            if attempt == attempts:
                raise BrokerError(f"broker could not bind {HOST}:{port}/{ctrl_port}:\n{_log_tail(wd)}") from None
    raise AssertionError("unreachable")


class _PortTakenError(Exception):
    pass


def _launch(java: str, libs: Path, wd: Path, *, port: int, ctrl_port: int, timeout: float) -> Broker:
    proc, since = _spawn(java, libs, wd, port=port, ctrl_port=ctrl_port)

    try:
        _wait_ready(proc, wd, port, since, timeout)
    except BaseException:
        # Whatever went wrong (timeout, Ctrl-C), leave no orphan JVM behind.
        stop(wd)
        raise
    bootstrap = f"{HOST}:{port}"
    (wd / BOOTSTRAP_FILE).write_text(bootstrap + "\n")
    return Broker(bootstrap=bootstrap, pid=proc.pid, workdir=wd)


def _wait_ready(proc: subprocess.Popen[bytes], wd: Path, port: int, since: int, timeout: float) -> None:
    """Wait until the client port answers and the group coordinator is available.

    The client port opens only once the broker is unfenced, so a connect alone would
    do; the FindCoordinator round trip also warms up consumer groups (see above).
    """
    deadline = time.monotonic() + timeout
    state = "client port closed"
    while True:
        rc = proc.poll()
        if rc is not None:
            _forget(wd, proc.pid)
            if "Address already in use" in _log_tail(wd, lines=400, since=since):
                raise _PortTakenError
            raise BrokerError(
                f"kafka broker exited with code {rc} before it was ready; "
                f"{wd / LOG_FILE} ends with:\n{_log_tail(wd, since=since)}"
            )
        error_code = _find_coordinator(port)
        if error_code == 0:
            return
        if error_code is not None:
            state = f"FindCoordinator answers error {error_code}"
        if time.monotonic() > deadline:
            raise BrokerError(
                f"kafka broker not ready on {HOST}:{port} after {timeout:.0f} s ({state}; "
                f"stopping it); {wd / LOG_FILE} ends with:\n{_log_tail(wd, since=since)}"
            )
        time.sleep(0.05)


# ---------------------------------------------------------------------------- secure broker

# A broker with, besides PLAINTEXT, a SASL_PLAINTEXT listener (SCRAM-SHA-512, the user created
# when the storage is formatted) and an SSL listener (a certificate signed by a CA made here
# with the `openssl` CLI, kept in PEM form, which Kafka 4 reads as a keystore). For tests of
# authentication and TLS failures; started and stopped like the plain broker.

TLS_DIR = "tls"
SCRAM_MECHANISM = "SCRAM-SHA-512"
SECRET_FILE = "sasl-secret"


@dataclass
class SecureBroker:
    """A running broker started by start_secure(). `plaintext`, `sasl` and `ssl` are the
    bootstrap addresses of its three client listeners."""

    plaintext: str
    sasl: str
    ssl: str
    username: str
    password: str
    ca_file: Path
    """The CA that signed the broker's certificate (`ssl.ca.location`)."""
    other_ca_file: Path
    """A CA that did not sign it: a client trusting only this one must fail to verify."""
    pid: int
    workdir: Path

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        stop(self.workdir, timeout=timeout)

    def sasl_config(self, password: str | None = None) -> dict[str, str]:
        """librdkafka properties for the SASL listener (the right password unless given)."""
        return {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": SCRAM_MECHANISM,
            "sasl.username": self.username,
            "sasl.password": self.password if password is None else password,
        }

    def ssl_config(self, ca_file: Path | None = None) -> dict[str, str]:
        """librdkafka properties for the SSL listener, trusting `ca_file` (default: the
        broker's CA)."""
        return {"security.protocol": "SSL", "ssl.ca.location": str(ca_file or self.ca_file)}


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BrokerError("the `openssl` command is needed to make the test broker's certificates")
    res = subprocess.run([openssl, *args], cwd=cwd, check=False, capture_output=True, text=True)
    if res.returncode != 0:
        raise BrokerError(f"openssl {' '.join(args)} failed ({res.returncode}):\n{res.stderr.strip()[-2000:]}")


def _new_ca(tls: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=fastconsume test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=tls,
    )  # fmt: skip


def make_certificates(directory: str | os.PathLike[str]) -> Path:
    """Makes, once, a CA (`ca.pem`), another CA (`other-ca.pem`) and a broker certificate for
    127.0.0.1 signed by the first, with its key, as a PEM keystore (`broker-keystore.pem`:
    key, certificate, CA). Returns the directory."""
    tls = Path(directory)
    tls.mkdir(parents=True, exist_ok=True)
    keystore = tls / "broker-keystore.pem"
    if keystore.is_file():
        return tls
    _new_ca(tls, "ca")
    _new_ca(tls, "other-ca")
    (tls / "broker.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
        "-subj", "/CN=127.0.0.1", cwd=tls,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "30", "-out", "broker.pem", "-extfile", "broker.ext", cwd=tls,
    )  # fmt: skip
    parts = [(tls / name).read_text() for name in ("broker.key", "broker.pem", "ca.pem")]
    keystore.write_text("".join(parts))
    return tls


def _secure_overrides(ports: tuple[int, int, int, int], keystore: Path) -> dict[str, str]:
    """server.properties entries for the listeners; `ports`: plaintext, controller, SASL, SSL."""
    port, ctrl_port, sasl_port, ssl_port = ports
    return {
        "listeners": (
            f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{ctrl_port},"
            f"SASL_PLAINTEXT://{HOST}:{sasl_port},SSL://{HOST}:{ssl_port}"
        ),
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port},SASL_PLAINTEXT://{HOST}:{sasl_port},SSL://{HOST}:{ssl_port}",
        "listener.security.protocol.map": (
            "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL"
        ),
        "sasl.enabled.mechanisms": SCRAM_MECHANISM,
        "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
        "listener.name.ssl.ssl.keystore.type": "PEM",
        "listener.name.ssl.ssl.keystore.location": str(keystore),
        "listener.name.ssl.ssl.client.auth": "none",
    }


def _format_secure_storage(java: str, libs: Path, workdir: Path, username: str, password: str) -> None:
    """As _format_storage, creating the SCRAM user in the same step."""
    _format_storage(java, libs, workdir, ["--add-scram", f"{SCRAM_MECHANISM}=[name={username},password={password}]"])


def start_secure(
    workdir: str | os.PathLike[str],
    *,
    username: str = "fastconsume",
    timeout: float = START_TIMEOUT,
    overrides: Mapping[str, str] | None = None,
) -> SecureBroker:
    """Start a single-node broker with PLAINTEXT, SASL_PLAINTEXT (SCRAM-SHA-512) and SSL
    listeners in `workdir`; wait until ready. The SCRAM user `username` gets a random password
    when the storage is first formatted (kept in the workdir, mode 0600, for restarts). Fresh
    ports each time. Raises BrokerError."""
    wd = _free_workdir(workdir)
    libs = fetch()
    java = _java()
    tls = make_certificates(wd / TLS_DIR)
    secret = wd / SECRET_FILE
    if not secret.is_file():
        secret.touch(mode=0o600)
        secret.write_text(base64.b32encode(os.urandom(15)).decode().lower())  # no , = [ ] in it
    password = secret.read_text().strip()
    for attempt in range(1, 4):
        port, ctrl_port, sasl_port, ssl_port = _free_ports(4)
        props = _secure_overrides((port, ctrl_port, sasl_port, ssl_port), tls / "broker-keystore.pem")
        props.update(overrides or {})
        _write_properties(wd / PROPS_FILE, _server_properties(wd, port, ctrl_port, props))
        if not (wd / DATA_DIR / "meta.properties").is_file():
            _format_secure_storage(java, libs, wd, username, password)
        try:
            broker = _launch(java, libs, wd, port=port, ctrl_port=ctrl_port, timeout=timeout)
        except _PortTakenError:
            if attempt == 3:
                raise BrokerError(f"broker could not bind its ports:\n{_log_tail(wd)}") from None
            continue
        return SecureBroker(
            plaintext=broker.bootstrap,
            sasl=f"{HOST}:{sasl_port}",
            ssl=f"{HOST}:{ssl_port}",
            username=username,
            password=password,
            ca_file=tls / "ca.pem",
            other_ca_file=tls / "other-ca.pem",
            pid=broker.pid,
            workdir=wd,
        )
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------- stop


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child[0].poll() is None
    if Path("/proc/self").exists():
        try:
            # A zombie has exited; its parent just has not reaped it yet.
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_broker(pid: int, wd: Path) -> bool:
    """Guard against a recycled pid: on Linux, check the command line names our config."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not Path("/proc/self").exists():
        return _alive(pid)
    try:
        args = cmdline.read_bytes().split(b"\0")
    except FileNotFoundError:
        return False
    return b"kafka.Kafka" in args and str(wd / PROPS_FILE).encode() in args and _alive(pid)


def _read_pid(wd: Path) -> int | None:
    try:
        return int((wd / PID_FILE).read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise BrokerError(f"{wd / PID_FILE} does not hold a pid") from exc


def _running_pid(wd: Path) -> int | None:
    pid = _read_pid(wd)
    return pid if pid is not None and _is_our_broker(pid, wd) else None


def _forget(wd: Path, pid: int) -> None:
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child[0].wait()
    for name in (PID_FILE, BOOTSTRAP_FILE):
        (wd / name).unlink(missing_ok=True)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stop(workdir: str | os.PathLike[str], *, timeout: float = STOP_TIMEOUT) -> None:
    """Stop the broker of `workdir`: SIGTERM (clean shutdown), SIGKILL after `timeout` s.

    No-op when no broker is running there.
    """
    wd = Path(workdir).resolve()
    pid = _running_pid(wd)
    if pid is None:
        stale = _read_pid(wd)
        _forget(wd, stale if stale is not None else -1)
        return
    # start() made the JVM a session leader, so its process group id is its pid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    if not _wait_gone(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if not _wait_gone(pid, 10.0):
            raise BrokerError(f"kafka broker pid {pid} survived SIGKILL")
    _forget(wd, pid)


@atexit.register
def _stop_leftovers() -> None:
    """Stop brokers this process started and never stopped (a test run that crashed
    before its teardown), so no JVM outlives it. The CLI's `start` opts out."""
    for _proc, wd in list(_CHILDREN.values()):
        with contextlib.suppress(BrokerError, OSError):
            stop(wd)


# ---------------------------------------------------------------------------- cluster

CLUSTER_FILE = "cluster"  # in a cluster's workdir: the node ids, one a line
# Fencing a dead node takes broker.session.timeout.ms (9 s by default); its partitions have
# no leader until then. 3 s with heartbeats every 0.5 s keeps fault tests short.
CLUSTER_SESSION_MS = 3000
CLUSTER_HEARTBEAT_MS = 500
# Three JVMs share 2 cores with the test and its app: the client JIT alone (no C2
# compiler threads) spends less CPU on start-up and restarts; these nodes are never
# benchmarked, unlike the single broker.
CLUSTER_JVM_OPTS = ["-XX:TieredStopAtLevel=1"]
# Every node signalled at once usually shuts down cleanly in ~6 s, but now and then one waits
# for a quorum that has gone and only SIGKILL ends it (seen with 4.4.0: the 30 s of
# STOP_TIMEOUT, then kill). The data survives a kill -9 either way, so wait less.
CLUSTER_STOP_TIMEOUT = 10.0


def _node_dir(workdir: Path, node_id: int) -> Path:
    return workdir / f"node{node_id}"


def _node_properties(
    wd: Path, node_id: int, ports: Mapping[int, tuple[int, int]], overrides: Mapping[str, str]
) -> dict[str, str]:
    """server.properties of one node of a cluster: the single broker's, with every node a
    voter, replication factors of min(3, N) and min.insync.replicas one less (2 for N=3)."""
    port, ctrl_port = ports[node_id]
    rf = str(min(3, len(ports)))
    isr = str(max(1, min(3, len(ports)) - 1))
    props = _server_properties(
        wd,
        port,
        ctrl_port,
        {
            "node.id": str(node_id),
            "controller.quorum.voters": ",".join(f"{n}@{HOST}:{c}" for n, (_, c) in sorted(ports.items())),
            "default.replication.factor": rf,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": rf,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
            "broker.session.timeout.ms": str(CLUSTER_SESSION_MS),
            "broker.heartbeat.interval.ms": str(CLUSTER_HEARTBEAT_MS),
            # No unclean elections: a restarted node must not take over with a stale log.
            "unclean.leader.election.enable": "false",
            **overrides,
        },
    )
    return props


def _node_ports(wd: Path) -> tuple[int, int]:
    """(client port, controller port) of a node, from its server.properties."""
    props = _read_properties(wd / PROPS_FILE)
    port = int(props["listeners"].split(",")[0].rsplit(":", 1)[1])
    node_id = props["node.id"]
    voters = dict(v.split("@", 1) for v in props["controller.quorum.voters"].split(","))
    return port, int(voters[node_id].rsplit(":", 1)[1])


def _spawn(
    java: str, libs: Path, wd: Path, *, port: int, ctrl_port: int, jvm_opts: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a broker's JVM in ``wd`` without waiting; return it and broker.log's offset before it."""
    cmd = [
        java, *JVM_OPTS, *jvm_opts,
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        "-cp", str(libs / "*"),
        "kafka.Kafka", str(wd / PROPS_FILE),
    ]  # fmt: skip
    with (wd / LOG_FILE).open("ab") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"=== kafka_broker.py start {stamp} port={port} controller={ctrl_port}\n".encode())
        log.flush()
        since = log.tell()
        # Own session/process group: stop() signals the whole group, and a Ctrl-C
        # aimed at the test runner does not hit the broker mid-test.
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=wd, start_new_session=True,
        )  # fmt: skip
    _CHILDREN[proc.pid] = (proc, wd)
    (wd / PID_FILE).write_text(f"{proc.pid}\n")
    return proc, since


@dataclass
class Node:
    """One node of a Cluster: broker and controller."""

    node_id: int
    workdir: Path
    port: int
    controller_port: int

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The node's JVM pid, None while it is down."""
        return _running_pid(self.workdir)


@dataclass
class Cluster:
    """A running cluster started by start_cluster(); nodes keep their ports across restarts."""

    bootstrap: str  # every node's address, comma-separated
    nodes: dict[int, Node]
    workdir: Path
    timeout: float = START_TIMEOUT

    def node(self, node_id: int) -> Node:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise BrokerError(f"no node {node_id} in {self.workdir} (nodes {sorted(self.nodes)})") from None

    def kill(self, node_id: int) -> None:
        """kill -9 a node (its whole process group) and wait until it is gone."""
        wd = self.node(node_id).workdir
        pid = _running_pid(wd)
        if pid is None:
            raise BrokerError(f"node {node_id} is not running")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if not _wait_gone(pid, 10.0):
            raise BrokerError(f"node {node_id} (pid {pid}) survived SIGKILL")
        _forget(wd, pid)

    def stop_node(self, node_id: int, timeout: float = STOP_TIMEOUT) -> None:
        """Clean shutdown of one node (SIGTERM, SIGKILL after `timeout` s)."""
        stop(self.node(node_id).workdir, timeout=timeout)

    def restart(self, node_id: int) -> None:
        """Start a stopped or killed node again, same ports and data; wait until it serves."""
        self.start_nodes([node_id])

    def start_all(self) -> None:
        """Start every node that is down (all at once: a lone node has no quorum)."""
        self.start_nodes([n for n, node in self.nodes.items() if node.pid is None])

    def start_nodes(self, node_ids: list[int]) -> None:
        libs, java = fetch(), _java()
        for n in node_ids:
            if self.node(n).pid is not None:
                raise BrokerError(f"node {n} is already running")
        spawned = []
        for n in node_ids:
            workdir = self.node(n).workdir
            port, ctrl_port = _node_ports(workdir)
            spawned.append((n, *_spawn(java, libs, workdir, port=port, ctrl_port=ctrl_port, jvm_opts=CLUSTER_JVM_OPTS)))
        try:
            for n, proc, since in spawned:
                node = self.node(n)
                try:
                    _wait_ready(proc, node.workdir, node.port, since, self.timeout)
                except _PortTakenError:
                    raise _ClusterPortTakenError(
                        f"node {n} could not bind {HOST}:{node.port}/{node.controller_port}:\n{_log_tail(node.workdir)}"
                    ) from None
                (node.workdir / BOOTSTRAP_FILE).write_text(node.bootstrap + "\n")
        except BaseException:
            for n, _proc, _since in spawned:
                with contextlib.suppress(BrokerError, OSError):
                    stop(self.node(n).workdir)
            raise

    def stop_all(self, timeout: float = CLUSTER_STOP_TIMEOUT) -> None:
        """Clean shutdown of every running node, signalled at once (one by one, the last
        nodes would wait for a quorum that is already gone); SIGKILL after `timeout` s."""
        pids = {n: node.pid for n, node in self.nodes.items()}
        for pid in pids.values():
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for n, pid in pids.items():
            if pid is None:
                continue
            if not _wait_gone(pid, max(0.0, deadline - time.monotonic())):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                if not _wait_gone(pid, 10.0):
                    raise BrokerError(f"node {n} (pid {pid}) survived SIGKILL")
            _forget(self.nodes[n].workdir, pid)

    def stop(self, timeout: float = CLUSTER_STOP_TIMEOUT) -> None:
        """Stop every node (the cluster's files stay; start_cluster() on the dir resumes it)."""
        self.stop_all(timeout=timeout)


def _load_cluster(wd: Path, timeout: float) -> Cluster:
    ids = [int(line) for line in (wd / CLUSTER_FILE).read_text().split()]
    nodes = {}
    for n in ids:
        port, ctrl_port = _node_ports(_node_dir(wd, n))
        nodes[n] = Node(n, _node_dir(wd, n), port, ctrl_port)
    bootstrap = ",".join(node.bootstrap for node in nodes.values())
    return Cluster(bootstrap=bootstrap, nodes=nodes, workdir=wd, timeout=timeout)


def start_cluster(
    workdir: str | os.PathLike[str],
    *,
    nodes: int = 3,
    timeout: float = START_TIMEOUT,
    overrides: Mapping[str, str] | None = None,
) -> Cluster:
    """Start an N-node KRaft cluster (every node broker and controller) in `workdir`.

    The first start picks ports, writes each node's server.properties and formats its
    storage with one cluster id; later starts on the same dir reuse all of it (`nodes` and
    `overrides` then come from the files). Returns once every node answers on its client
    port and the group coordinator is available. Raises BrokerError, quoting broker.log.
    """
    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    if (wd / CLUSTER_FILE).is_file():
        cluster = _load_cluster(wd, timeout)
        cluster.start_all()
        return cluster
    if nodes < 1:
        raise BrokerError(f"a cluster needs at least one node, not {nodes}")
    # A picked port can be taken by someone else before a JVM binds it: start afresh on that.
    for attempt in range(1, 4):
        _make_cluster(wd, nodes, overrides or {})
        cluster = _load_cluster(wd, timeout)
        try:
            cluster.start_all()
        except _ClusterPortTakenError:
            if attempt == 3:
                raise
            _remove_cluster(wd, nodes)
            continue
        return cluster
    raise AssertionError("unreachable")


class _ClusterPortTakenError(BrokerError):
    pass


def _make_cluster(wd: Path, nodes: int, overrides: Mapping[str, str]) -> None:
    """Pick every node's ports, write its server.properties and format its storage."""
    libs, java = fetch(), _java()
    flat = _free_ports(2 * nodes)
    ports = {n: (flat[2 * i], flat[2 * i + 1]) for i, n in enumerate(range(1, nodes + 1))}
    for n in ports:
        nd = _node_dir(wd, n)
        nd.mkdir(parents=True, exist_ok=True)
        _write_properties(nd / PROPS_FILE, _node_properties(nd, n, ports, overrides))
    try:
        _format_nodes(java, libs, [_node_dir(wd, n) for n in ports], _cluster_id())
    except BaseException:
        _remove_cluster(wd, nodes)  # half-formatted storage would fail the next format
        raise
    (wd / CLUSTER_FILE).write_text("".join(f"{n}\n" for n in ports))


def _remove_cluster(wd: Path, nodes: int) -> None:
    (wd / CLUSTER_FILE).unlink(missing_ok=True)
    for n in range(1, nodes + 1):
        shutil.rmtree(_node_dir(wd, n), ignore_errors=True)


def _format_nodes(java: str, libs: Path, workdirs: list[Path], cluster_id: str) -> None:
    """Format every node's storage with one cluster id, in parallel (a JVM start each).
    Static voters: no --standalone."""
    procs = []
    for wd in workdirs:
        cmd = [
            java, f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp", str(libs / "*"),
            "kafka.tools.StorageTool", "format",
            "-t", cluster_id,
            "-c", str(wd / PROPS_FILE),
        ]  # fmt: skip
        with (wd / LOG_FILE).open("ab") as log:
            procs.append((wd, subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)))
    failed = [(wd, proc.wait()) for wd, proc in procs]
    for wd, rc in failed:
        if rc != 0:
            raise BrokerError(f"kafka StorageTool format failed ({rc}) in {wd}:\n{_log_tail(wd)}")


def stop_cluster(workdir: str | os.PathLike[str], *, timeout: float = CLUSTER_STOP_TIMEOUT) -> None:
    """Stop every node of the cluster in `workdir`; no-op when none runs or none was made."""
    wd = Path(workdir).resolve()
    if (wd / CLUSTER_FILE).is_file():
        _load_cluster(wd, START_TIMEOUT).stop_all(timeout=timeout)


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="gather the broker jars into the cache; print the libs dir")
    p_start = sub.add_parser("start", help="start a broker in DIR; print its bootstrap address")
    p_start.add_argument("--dir", required=True, type=Path)
    p_start.add_argument("--timeout", type=float, default=START_TIMEOUT)
    p_start.add_argument("--reuse-ports", action="store_true", help="keep DIR's previous ports")
    p_secure = sub.add_parser(
        "start-secure", help="start a broker with SASL (SCRAM-SHA-512) and SSL listeners in DIR; print them"
    )
    p_secure.add_argument("--dir", required=True, type=Path)
    p_secure.add_argument("--timeout", type=float, default=START_TIMEOUT)
    p_stop = sub.add_parser("stop", help="stop the broker in DIR (no-op if none)")
    p_stop.add_argument("--dir", required=True, type=Path)
    p_stop.add_argument("--timeout", type=float, default=STOP_TIMEOUT)
    p_cstart = sub.add_parser("start-cluster", help="start an N-node cluster in DIR; print its bootstrap list")
    p_cstart.add_argument("--dir", required=True, type=Path)
    p_cstart.add_argument("--nodes", type=int, default=3)
    p_cstart.add_argument("--timeout", type=float, default=START_TIMEOUT)
    p_cstop = sub.add_parser("stop-cluster", help="stop the cluster in DIR (no-op if none)")
    p_cstop.add_argument("--dir", required=True, type=Path)
    p_cstop.add_argument("--timeout", type=float, default=CLUSTER_STOP_TIMEOUT)
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch())
        elif args.command == "start-secure":
            secure = start_secure(args.dir, timeout=args.timeout)
            _CHILDREN.pop(secure.pid, None)
            # The password stays in DIR/sasl-secret: printing it would put it in CI logs.
            print(f"plaintext={secure.plaintext} sasl={secure.sasl} ssl={secure.ssl} ca={secure.ca_file}")
        elif args.command == "start":
            broker = start(args.dir, timeout=args.timeout, reuse_ports=args.reuse_ports)
            # The broker must outlive this process: drop it from the atexit hook's list.
            _CHILDREN.pop(broker.pid, None)
            print(broker.bootstrap)
        elif args.command == "start-cluster":
            cluster = start_cluster(args.dir, nodes=args.nodes, timeout=args.timeout)
            for node in cluster.nodes.values():  # the nodes outlive this process
                _CHILDREN.pop(node.pid or -1, None)
            print(cluster.bootstrap)
        elif args.command == "stop-cluster":
            stop_cluster(args.dir, timeout=args.timeout)
        else:
            stop(args.dir, timeout=args.timeout)
    except BrokerError as exc:
        print(f"kafka_broker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
