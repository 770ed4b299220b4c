"""TLS, mutual TLS and bearer tokens on a stack of three processes on loopback: the right callers are admitted,
the others refused with the documented codes; per-client limits; a rotated certificate served without a restart."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import threading
import time

import json
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cast.v1 import generation_pb2, generation_pb2_grpc, verify_pb2, verify_pb2_grpc
from cast_runtime.tls import channel_credentials
from orchestrator.auth import bearer
from tests.certs import Authority, served_serial
from tests.integration.stacks import start_stack

ALICE, BOB = "alice-0123456789abcdef", "bob-0123456789abcdef"
REQUEST = generation_pb2.GenerateRequest(prompt="def fibonacci(n):", max_new_tokens=8)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = Authority.create("cast-test-ca"), Authority.create("someone-else")
    files = {"ca": ca.write(d / "ca.pem"), "other_ca": other.write(d / "other-ca.pem"),
             "cert": d / "server.pem", "key": d / "server.key",
             "stranger_cert": d / "stranger.pem", "stranger_key": d / "stranger.key"}
    ca.issue("cast-services", files["cert"], files["key"])
    other.issue("stranger", files["stranger_cert"], files["stranger_key"])  # a client certificate of another CA
    files["authority"] = ca
    (d / "tokens").write_text(f"# the test's clients\n{ALICE} alice\n{BOB} bob\n")
    files["tokens"] = d / "tokens"
    return files


@pytest.fixture(scope="module")
def secure_stack(tiny_pair, pki, tmp_path_factory):
    target, draft = tiny_pair
    stack = start_stack(target, draft, tmp_path_factory.mktemp("logs-secure"), tls_cert=pki["cert"],
                        tls_key=pki["key"], tls_ca=pki["ca"], mtls=True, auth_tokens=pki["tokens"],
                        orchestrator_args=["--client-max-live", "1", "--client-max-queued", "1"])
    yield stack
    stack.stop()


def orchestrator_channel(stack, pki, ca="ca") -> grpc.Channel:
    return grpc.secure_channel(stack.spec.address, grpc.ssl_channel_credentials(pki[ca].read_bytes()))


def status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_tokens_admit_known_clients_and_refuse_the_rest(secure_stack, pki):
    with orchestrator_channel(secure_stack, pki) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        reply = stub.Generate(REQUEST, timeout=60, metadata=bearer(ALICE))
        assert reply.usage.completion_tokens == 8
        assert status_of(lambda: stub.Generate(REQUEST, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        assert status_of(lambda: stub.Generate(REQUEST, timeout=10, metadata=(("authorization", f"Basic {ALICE}"),))
                         ) == grpc.StatusCode.UNAUTHENTICATED
        assert status_of(lambda: stub.Generate(REQUEST, timeout=10, metadata=bearer("x" * 24))
                         ) == grpc.StatusCode.PERMISSION_DENIED
        assert status_of(lambda: list(stub.GenerateStream(REQUEST, timeout=10))) == grpc.StatusCode.UNAUTHENTICATED
        assert status_of(lambda: stub.ListReplicas(generation_pb2.ListReplicasRequest(), timeout=10)
                         ) == grpc.StatusCode.UNAUTHENTICATED
        assert len(stub.ListReplicas(generation_pb2.ListReplicasRequest(), timeout=10, metadata=bearer(BOB)).replicas) == 2
        # Health and reflection stay open: probes and `grpcurl list` carry no token.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for a in answers for s in a.list_services_response.service}
        assert "cast.v1.GenerationService" in names


def test_tls_refuses_plaintext_and_untrusted_servers(secure_stack, pki):
    with grpc.insecure_channel(secure_stack.spec.address) as plain:
        stub = generation_pb2_grpc.GenerationServiceStub(plain)
        assert status_of(lambda: stub.Generate(REQUEST, timeout=5, metadata=bearer(ALICE))) == grpc.StatusCode.UNAVAILABLE
    with orchestrator_channel(secure_stack, pki, ca="other_ca") as wrong_trust:  # not the CA that signed the server
        stub = generation_pb2_grpc.GenerationServiceStub(wrong_trust)
        assert status_of(lambda: stub.Generate(REQUEST, timeout=5, metadata=bearer(ALICE))) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("role", ["draft", "verify"])
def test_mutual_tls_admits_only_clients_the_ca_signed(secure_stack, pki, role):
    address = secure_stack.addresses()[role]
    describe = verify_pb2_grpc.VerifyServiceStub if role == "verify" else None

    def check(credentials) -> grpc.StatusCode:
        with grpc.secure_channel(address, credentials) as channel:
            return status_of(lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5))

    assert check(channel_credentials(pki["ca"])) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    assert check(channel_credentials(pki["ca"], pki["stranger_cert"], pki["stranger_key"])) == grpc.StatusCode.UNAVAILABLE
    assert check(channel_credentials(pki["ca"], pki["cert"], pki["key"])) == grpc.StatusCode.OK
    with grpc.insecure_channel(address) as plain:
        assert status_of(lambda: health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
                         ) == grpc.StatusCode.UNAVAILABLE
    if describe is not None:
        with grpc.secure_channel(address, channel_credentials(pki["ca"], pki["cert"], pki["key"])) as channel:
            assert describe(channel).Describe(verify_pb2.VerifyDescribeRequest(), timeout=10).replica.max_context > 0


def http_get(url: str, trust: ssl.SSLContext, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, context=trust, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_api_over_tls_answers_401_and_403_in_openai_shape(secure_stack, pki):
    url = secure_stack.spec.http_url.replace("http:", "https:")
    trust = ssl.create_default_context(cafile=str(pki["ca"]))
    assert http_get(f"{url}/health", trust)[0] == 200  # open
    status, body = http_get(f"{url}/v1/models", trust)
    assert status == 401 and body["error"]["type"] == "authentication_error" and body["error"]["param"] == "authorization"
    status, body = http_get(f"{url}/v1/models", trust, "y" * 24)
    assert status == 403 and body["error"]["type"] == "permission_error"
    assert http_get(f"{url}/v1/models", trust, BOB)[0] == 200
    with openai.DefaultHttpxClient(verify=trust, timeout=60) as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=ALICE, max_retries=0, http_client=http)
        done = client.completions.create(model="target", prompt="def fibonacci(n):", max_tokens=5)
        assert done.usage.completion_tokens == 5
        stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="z" * 24, max_retries=0, http_client=http)
        with pytest.raises(openai.PermissionDeniedError):
            stranger.completions.create(model="target", prompt="def fibonacci(n):", max_tokens=5)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # a client that does not trust it
        http_get(f"{url}/health", ssl.create_default_context(cafile=str(pki["other_ca"])))


def test_per_client_limits_queue_and_refuse_naming_the_limit(secure_stack, pki):
    """alice may run 1 request and queue 1 more (--client-max-live 1 --client-max-queued 1): of three at once, one
    is refused at once; bob is not held back by her."""
    long = generation_pb2.GenerateRequest(prompt="import os\n", max_new_tokens=300, ignore_eos=True, policy="ar")
    with orchestrator_channel(secure_stack, pki) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        first = stub.GenerateStream(long, timeout=120, metadata=bearer(ALICE))
        next(first)  # running
        outcomes: dict[int, grpc.StatusCode | str] = {}

        def call(i: int) -> None:
            try:
                stub.Generate(REQUEST, timeout=120, metadata=bearer(ALICE))
                outcomes[i] = grpc.StatusCode.OK
            except grpc.RpcError as e:
                outcomes[i] = e.code()
                outcomes[f"{i}-details"] = e.details()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        # bob, meanwhile, is served although alice is at her limits
        assert stub.Generate(REQUEST, timeout=60, metadata=bearer(BOB)).usage.completion_tokens == 8
        assert threads[0].is_alive() or threads[1].is_alive()  # one of alice's waits behind her first
        first.cancel()
        for t in threads:
            t.join(60)
        codes = sorted(str(outcomes[i]) for i in range(2))
        assert codes == sorted([str(grpc.StatusCode.OK), str(grpc.StatusCode.RESOURCE_EXHAUSTED)]), outcomes
        refused = next(outcomes[f"{i}-details"] for i in range(2) if outcomes[i] == grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "client_max_live=1" in refused and "client_max_queued=1" in refused and "alice" in refused


def test_a_rotated_certificate_is_served_without_a_restart(secure_stack, pki):
    """The certificate files are replaced in place (as Kubernetes does with a Secret): new connections to every
    service get the new certificate, and the stack keeps serving through them."""
    addresses = secure_stack.addresses()
    client = (pki["cert"], pki["key"])  # the replicas want a client certificate
    before = {name: served_serial(a, pki["ca"], *client) for name, a in addresses.items()}
    assert len(set(before.values())) == 1
    new_cert, new_key = pki["cert"].with_name("rotated.pem"), pki["key"].with_name("rotated.key")
    serial = pki["authority"].issue("cast-services-rotated", new_cert, new_key)
    os.replace(new_key, pki["key"])  # the key first: for a moment the pair does not match, and the old one serves
    time.sleep(0.05)
    os.replace(new_cert, pki["cert"])
    after = {name: served_serial(a, pki["ca"], *client) for name, a in addresses.items()}
    assert after == {name: serial for name in addresses}, (before, after, serial)
    http = secure_stack.spec.http_url.removeprefix("http://")  # the HTTP API checks its files every 2 s
    deadline = time.monotonic() + 15
    while served_serial(http, pki["ca"]) != serial and time.monotonic() < deadline:
        time.sleep(0.5)
    assert served_serial(http, pki["ca"]) == serial
    processes = secure_stack.processes
    assert all(p.poll() is None for p in processes.values())  # no restart
    with orchestrator_channel(secure_stack, pki) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        assert stub.Generate(REQUEST, timeout=60, metadata=bearer(BOB)).usage.completion_tokens == 8


def test_cast_generate_takes_the_token_and_the_ca(secure_stack, pki):
    command = [sys.executable, "-m", "orchestrator.cli", "generate", "--addr", secure_stack.spec.address,
               "--tls-ca", str(pki["ca"]), "--max-new-tokens", "4", "def f():"]
    env = {k: v for k, v in os.environ.items() if k != "CAST_API_TOKEN"}
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    by_flag = subprocess.run([*command, "--token", ALICE], capture_output=True, text=True, timeout=60, env=env)
    by_env = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**env, "CAST_API_TOKEN": BOB})
    assert by_flag.returncode == 0 and by_env.returncode == 0, by_flag.stderr + by_env.stderr
    assert by_flag.stdout == by_env.stdout  # greedy: the same text for either client
