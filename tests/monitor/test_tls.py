"""TLS, mTLS, certificate reload and secure-by-default, over real loopback connections.

Every case is tried with the Python client and with `buf curl` (Go's TLS stack), refusals
included: plain text against TLS, an untrusted server, no client certificate under mTLS, a
client certificate from another CA, an expired one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from monitor.client import AsyncClient, Client
from monitor.config import Settings
from monitor.tls import TlsError, channel_credentials, server_credentials
from tests.monitor.cli_helpers import error_line, run
from tests.monitor.pki import write_pki
from tests.monitor.server_fixtures import RunningServer, make_pack, runner

BUF = Path(__file__).resolve().parents[2] / "node_modules" / ".bin" / "buf"
LIST = "latentwatch.v1.Monitor/ListDetectors"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    r = runner()
    return r, make_pack(r, tmp_path_factory.mktemp("pack") / "toy")


def tls_settings(model, tmp, **tls) -> Settings:
    return Settings(packs=[model[1]], port=0, metrics_port=None, db=f"sqlite:///{tmp}/db.sqlite", drain_seconds=0,
                    **tls)


@pytest.fixture(scope="module")
def tls_server(pki, model, tmp_path_factory):
    srv = RunningServer(tls_settings(model, tmp_path_factory.mktemp("tls"), tls_cert=pki["server.pem"],
                                     tls_key=pki["server.key"]), model[0])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mtls_server(pki, model, tmp_path_factory):
    srv = RunningServer(tls_settings(model, tmp_path_factory.mktemp("mtls"), tls_cert=pki["server.pem"],
                                     tls_key=pki["server.key"], tls_client_ca=pki["ca1.pem"]), model[0])
    yield srv
    srv.stop()


def python_list(target: str, **tls) -> list[str]:
    with Client(target, timeout=10, **tls) as c:
        return [d.id for d in c.list_detectors()]


def buf_list(port: int, **tls) -> subprocess.CompletedProcess:
    """`buf curl` ListDetectors through reflection; https with the tls_* files given, else plain text."""
    flags = {"tls_ca": "--cacert", "tls_cert": "--cert", "tls_key": "--key"}
    args = [x for name, path in tls.items() for x in (flags[name], str(path))]
    url = f"https://127.0.0.1:{port}/{LIST}" if tls else f"http://127.0.0.1:{port}/{LIST}"
    if not BUF.exists():
        pytest.fail("buf is not installed: run `make install` (npm ci)")
    return subprocess.run([str(BUF), "curl", "--protocol", "grpc", "--connect-timeout", "10", *args,
                           *([] if tls else ["--http2-prior-knowledge"]), "-d", "{}", url],
                          capture_output=True, text=True, timeout=60)


def cli_info(target: str, **tls):
    flags = [a for k, v in tls.items() for a in (f"--{k.replace('_', '-')}", v)]
    return run("info", "--target", target, *flags)


def check_both(srv, files: dict[str, Path], accepted: bool) -> None:
    """The call is accepted (or refused) alike through the Python client, buf curl and the CLI."""
    if accepted:
        assert python_list(srv.target, **files) == ["toy"]
        done = buf_list(srv.server.port, **files)
        assert done.returncode == 0, done.stderr
        assert [d["id"] for d in json.loads(done.stdout)["detectors"]] == ["toy"]
        shown = cli_info(srv.target, **files)
        assert shown.exit_code == 0 and "toy" in shown.stdout and "tiny-llama" in shown.stdout, shown.output
        return
    assert "UNAVAILABLE" in error_line(cli_info(srv.target, **files))
    with pytest.raises(grpc.RpcError) as refused:
        python_list(srv.target, **files)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    done = buf_list(srv.server.port, **files)
    assert done.returncode != 0 and done.stderr, done.stdout


@pytest.mark.parametrize("case, files, accepted", [
    ("trusted CA", {"tls_ca": "ca1.pem"}, True),
    ("plain text against TLS", {}, False),
    ("server certificate from an untrusted CA", {"tls_ca": "ca2.pem"}, False),
])
def test_tls_server(tls_server, pki, case, files, accepted):
    check_both(tls_server, {k: pki[v] for k, v in files.items()}, accepted)


@pytest.mark.parametrize("case, files, accepted", [
    ("client certificate from the client CA", {"tls_ca": "ca1.pem", "tls_cert": "client.pem",
                                               "tls_key": "client.key"}, True),
    ("no client certificate", {"tls_ca": "ca1.pem"}, False),
    ("client certificate from another CA", {"tls_ca": "ca1.pem", "tls_cert": "client-other-ca.pem",
                                            "tls_key": "client.key"}, False),
    ("expired client certificate", {"tls_ca": "ca1.pem", "tls_cert": "client-expired.pem",
                                    "tls_key": "client.key"}, False),
    ("plain text against mTLS", {}, False),
])
def test_mtls_server(mtls_server, pki, case, files, accepted):
    check_both(mtls_server, {k: pki[v] for k, v in files.items()}, accepted)


def test_async_client_and_the_server_name_localhost(tls_server, pki):
    async def detectors():
        async with AsyncClient(f"localhost:{tls_server.server.port}", timeout=10, tls_ca=pki["ca1.pem"]) as c:
            return [d.id for d in await c.list_detectors()]

    assert asyncio.run(detectors()) == ["toy"]


# ---------------------------------------------------------------------------------- reload


def served_serial(port: int) -> int:
    """The serial number of the certificate a NEW connection is shown."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # we only look at it
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as conn:
        return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True)).serial_number


def replace(path: Path, data: bytes) -> None:
    """As Kubernetes updates a mounted Secret: a new file moved into place."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_changed_files_reach_new_connections_while_open_ones_keep_working(pki, model, tmp_path):
    live = write_pki(tmp_path / "pki")  # this test's own files: it rewrites them
    srv = RunningServer(tls_settings(model, tmp_path, tls_cert=live["server.pem"], tls_key=live["server.key"]),
                        model[0])
    try:
        with Client(srv.target, timeout=10, tls_ca=live["ca1.pem"]) as open_conn:
            assert [d.id for d in open_conn.list_detectors()] == ["toy"]
            assert served_serial(srv.server.port) == 1001
            replace(live["server.pem"], b"half written")  # a bad replacement is ignored, the old pair stays
            assert served_serial(srv.server.port) == 1001
            replace(live["server.pem"], live["server-next.pem"].read_bytes())  # CA 2, serial 1002
            assert served_serial(srv.server.port) == 1002
            # the open connection trusts only CA 1, so it can only still work if it was not dropped
            assert [d.id for d in open_conn.list_detectors()] == ["toy"]
        assert python_list(srv.target, tls_ca=live["ca2.pem"]) == ["toy"]
        with pytest.raises(grpc.RpcError):
            python_list(srv.target, tls_ca=live["ca1.pem"])
    finally:
        srv.stop()


def test_sighup_rereads_files_whose_stat_did_not_change(model, tmp_path):
    """`serve()` re-reads the files on SIGHUP even when a changed file kept its inode, size and mtime."""
    from monitor.server import serve

    live = write_pki(tmp_path / "pki")
    cert = live["server.pem"]
    settings = tls_settings(model, tmp_path, tls_cert=cert, tls_key=live["server.key"])

    async def main():
        ready = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(settings, runner=model[0], on_ready=ready.set_result))
        port = (await asyncio.wait_for(ready, 60)).port
        try:
            assert await asyncio.to_thread(served_serial, port) == 1001
            before = cert.stat()
            cert.write_bytes(live["server-next.pem"].read_bytes())  # in place: same inode, same size
            os.utime(cert, ns=(before.st_atime_ns, before.st_mtime_ns))
            assert cert.stat().st_size == before.st_size and cert.stat().st_ino == before.st_ino
            assert await asyncio.to_thread(served_serial, port) == 1001  # no change seen
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN), "no SIGHUP handler"
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.2)  # the handler runs on this loop
            assert await asyncio.to_thread(served_serial, port) == 1002
        finally:
            os.kill(os.getpid(), signal.SIGTERM)
            await task

    asyncio.run(main())


# ---------------------------------------------------------------------------------- startup errors


@pytest.mark.parametrize("tls, message", [
    ({"tls_cert": "missing.pem", "tls_key": "server.key"}, "tls_cert missing.pem: no such file"),
    ({"tls_cert": "server.pem", "tls_key": "."}, "tls_key .: cannot read it (Is a directory)"),
    ({"tls_cert": "server.key", "tls_key": "server.key"}, "tls_cert server.key: not a PEM certificate"),
    ({"tls_cert": "server.pem", "tls_key": "server.pem"}, "tls_key server.pem: not an unencrypted PEM private key"),
    ({"tls_cert": "server.pem", "tls_key": "other.key"},
     "tls_key other.key does not match the certificate in tls_cert server.pem"),
    ({"tls_cert": "server.pem"}, "tls_cert and tls_key go together: give both, or neither"),
    ({"tls_client_ca": "ca1.pem"}, "tls_client_ca needs tls_cert and tls_key: mTLS is TLS plus client certificates"),
    ({"tls_cert": "server.pem", "tls_key": "server.key", "tls_client_ca": "server.key"},
     "tls_client_ca server.key: not a PEM certificate"),
])
def test_unusable_files_are_one_line_errors_before_the_model_loads(pki, tmp_path, monkeypatch, fake_serve, tls,
                                                                   message):
    folder = pki["ca1.pem"].parent
    monkeypatch.chdir(folder)
    with pytest.raises(TlsError) as e:
        server_credentials(Settings(**tls))
    assert str(e.value) == message
    flags = [x for name, path in tls.items() for x in (f"--{name.replace('_', '-')}", path)]
    line = error_line(run("serve", "--port", 0, "--metrics-port", 0, "--db", f"sqlite:///{tmp_path}/db.sqlite",
                          *flags))
    assert line == f"error: {str(e.value)}"


def test_a_client_certificate_needs_its_key(pki):
    with pytest.raises(TlsError, match="tls_cert and tls_key go together"):
        channel_credentials(pki["ca1.pem"], cert=pki["client.pem"])


# ---------------------------------------------------------------------------------- secure by default


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "LocalHost", "::1", "[::1]"])
def test_loopback_needs_no_protection(host):
    assert not Settings(host=host).unprotected


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "my-host", ""])
def test_any_other_host_needs_tls_and_client_authentication(host, pki):
    tls = {"tls_cert": pki["server.pem"], "tls_key": pki["server.key"]}
    assert Settings(host=host).unprotected
    assert Settings(host=host, auth_tokens="tokens.yaml").unprotected  # tokens in plain text
    assert Settings(host=host, **tls).unprotected  # TLS, but anyone may call
    assert not Settings(host=host, auth_tokens="tokens.yaml", **tls).unprotected
    assert not Settings(host=host, tls_client_ca=pki["ca1.pem"], **tls).unprotected  # mTLS
    assert not Settings(host=host, insecure=True).unprotected


def test_serve_refuses_a_host_beyond_loopback_without_tls_and_authentication(fake_serve, pki, tmp_path):
    args = ["serve", "--host", "0.0.0.0", "--port", 0, "--metrics-port", 0, "--db", f"sqlite:///{tmp_path}/db.sqlite"]
    refusal = ("error: refusing to serve 0.0.0.0:0 without TLS and client authentication: set --tls-cert/--tls-key "
               "and --auth-tokens (or --tls-client-ca for mTLS), or pass --insecure to accept the risk")
    assert error_line(run(*args, "--pack", "does/not/exist")) == refusal  # checked first
    tls = ["--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"]]
    assert error_line(run(*args, *tls)) == refusal
    assert run(*args, "--insecure").exit_code == 0 and fake_serve.pop().insecure
    assert run(*args, *tls, "--tls-client-ca", pki["ca1.pem"]).exit_code == 0
    assert fake_serve.pop().tls_client_ca == pki["ca1.pem"]
    env = {"LATENTWATCH_TLS_CERT": str(pki["server.pem"]), "LATENTWATCH_TLS_KEY": str(pki["server.key"]),
           "LATENTWATCH_TLS_CLIENT_CA": str(pki["ca1.pem"])}
    assert run(*args, env=env).exit_code == 0 and fake_serve.pop().tls_cert == pki["server.pem"]
