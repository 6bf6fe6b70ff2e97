"""The optional TLS front: a caller that trusts the server's certificate ranks through it; a
plain-text caller, or one without a client certificate under mutual TLS, is refused."""

from __future__ import annotations

import subprocess

import grpc
import numpy as np
import pytest

from recserve.synth import TrafficGenerator
from serving.api.client import RankingClient
from serving.standalone.monolith import MonolithThread
from serving.ops.server_thread import ServerThread
from serving.standalone.tls_front import create_tls_front


def make_cert(tmp_path, name: str, *, ca: tuple | None = None) -> tuple:
    """(cert path, key path) of a certificate for 127.0.0.1, self-signed or signed by ``ca``."""
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    subj = ["-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1"]
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key,
                        "-out", cert, *subj], check=True, capture_output=True)
    else:
        csr = tmp_path / f"{name}.csr"
        subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                        *subj], check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
                        "-days", "1", "-out", cert, "-copy_extensions", "copy"], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def monolith(tiny_packages):
    with MonolithThread(tiny_packages("singular-1")) as server:
        yield f"127.0.0.1:{server.port}"


def front(upstream: str, cert, key, client_ca=None) -> ServerThread:
    return ServerThread(lambda: create_tls_front(upstream, listen="127.0.0.1:0", cert_chain=cert.read_bytes(),
                                                 private_key=key.read_bytes(),
                                                 client_ca=client_ca.read_bytes() if client_ca else None),
                        name="tls-front", grace_s=0.5)


def test_a_caller_that_trusts_the_certificate_ranks_through_the_front(monolith, tiny, reference, tmp_path):
    cert, key = make_cert(tmp_path, "server")
    batch = TrafficGenerator(tiny, seed=9).batch(6)
    with front(monolith, cert, key) as running:
        client = RankingClient(f"127.0.0.1:{running.port}",
                               credentials=grpc.ssl_channel_credentials(root_certificates=cert.read_bytes()))
        sparse = {f: (b.values, b.lengths) for f, b in batch.sparse.items()}
        scores = client.predict(batch.dense, sparse, timeout=30)
        np.testing.assert_allclose(scores, reference(batch), rtol=1e-4, atol=1e-5)
        with pytest.raises(grpc.RpcError) as bad:  # the upstream's error comes back unchanged
            client.predict(batch.dense, {**sparse, "no_such_feature": ([], [0] * 6)}, timeout=30)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no_such_feature" in bad.value.details()
        with RankingClient(f"127.0.0.1:{running.port}") as plain, pytest.raises(grpc.RpcError) as refused:
            plain.model_info(timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        client.close()


def test_under_mutual_tls_a_caller_without_a_client_certificate_is_refused(monolith, tmp_path):
    ca = make_cert(tmp_path, "ca")
    cert, key = make_cert(tmp_path, "server", ca=ca)
    client_cert, client_key = make_cert(tmp_path, "client", ca=ca)
    with front(monolith, cert, key, client_ca=ca[0]) as running:
        address = f"127.0.0.1:{running.port}"
        trusted = grpc.ssl_channel_credentials(root_certificates=ca[0].read_bytes())
        with RankingClient(address, credentials=trusted) as anonymous, \
                pytest.raises(grpc.RpcError) as refused:
            anonymous.model_info(timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with_cert = grpc.ssl_channel_credentials(root_certificates=ca[0].read_bytes(),
                                                 private_key=client_key.read_bytes(),
                                                 certificate_chain=client_cert.read_bytes())
        with RankingClient(address, credentials=with_cert) as client:
            assert client.model_info().model == "tiny"
