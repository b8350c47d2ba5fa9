"""`gptgen serve` under hostile clients, as a real subprocess on loopback: slowloris connections and clients that
drop mid-body are cut off after the timeouts with one log line each, while other clients are served at once;
bodies that used to answer 500 or 429 answer 400."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 2.0  # --header-timeout and --body-timeout of the server under test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, timeout: float = 30):
    request = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import gptgen

    root = tmp_path_factory.mktemp("hostile")
    text = "\n".join(f"hello there number {i} and more words" for i in range(50))
    tok = gptgen.Tokenizer.train("bpe", [text], 80)
    gptgen.LanguageModel.from_preset("gpt2", tok, n_layer=1, n_embd=16, n_head=2, n_positions=64).save(root / "m")
    port = _free_port()
    log_path = root / "server.log"
    log = open(log_path, "w")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "gptgen", "serve", "--model", str(root / "m"), "--port", str(port),
                             "--max-batch", "4", "--max-queue", "16", "--header-timeout", str(TIMEOUT),
                             "--body-timeout", str(TIMEOUT)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    break
        except (OSError, urllib.error.HTTPError):
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)
    yield url, port, log_path
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


def test_bodies_that_used_to_answer_500_or_429_answer_400(server):
    url, _, log_path = server
    assert _post(url, json.dumps({"prompt": "hello", "max_tokens": 2}).encode())[0] == 200
    status, body = _post(url, b'{"prompt": "hello \\ud800 there", "max_tokens": 2}')
    assert status == 400 and "surrogate" in body["error"]["message"]
    status, body = _post(url, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = _post(url, json.dumps({"prompt": ["hello"] * 1000, "max_tokens": 2}).encode())
    assert status == 400 and "can ever hold" in body["error"]["message"]
    assert "Traceback" not in log_path.read_text()


def test_slowloris_and_dropped_clients_are_cut_off_while_others_are_served(server):
    url, port, log_path = server
    before = len(_lines(log_path))
    slow = []
    for i in range(200):  # headers that never end
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + str(i).encode())
        slow.append(s)
    stalled = []
    for i in range(100):  # a body that stops, then the client goes away (half of them) or stays silent
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": \"hel")
        if i % 2:
            s.close()
        else:
            stalled.append(s)
    good = []
    opened = time.monotonic()
    while time.monotonic() - opened < TIMEOUT + 1:  # other clients, while the bad ones hold connections
        start = time.perf_counter()
        status, _ = _post(url, json.dumps({"prompt": "hello", "max_tokens": 2}).encode(), timeout=5)
        good.append(time.perf_counter() - start)
        assert status == 200
    assert max(good) < 1.0, good
    time.sleep(1.0)
    for s in slow + stalled:  # every bad connection was closed by the server after the timeout
        s.settimeout(3)
        try:
            assert s.recv(1024) == b""
        except ConnectionResetError:
            pass
        s.close()
    lines = _lines(log_path)[before:]
    assert not [l for l in lines if "Traceback" in l or "Exception" in l]
    bad_lines = [l for l in lines if "127.0.0.1" in l and "POST /v1/completions HTTP/1.1\" 200" not in l]
    assert len(bad_lines) <= 300, bad_lines[:5]
    assert sum("no complete request headers" in l for l in lines) == 200
    assert sum("no complete request body" in l for l in lines) == 50  # the silent ones
    assert sum("went away" in l for l in lines) == 50  # the ones that closed mid-body
    assert len(lines) <= 300 + 2 * len(good)


def test_a_keep_alive_client_is_not_cut_off_between_or_during_its_requests(server):
    import http.client

    _, port, log_path = server
    before = len(_lines(log_path))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for pause in (0.0, 0.5 * TIMEOUT, 0.9 * TIMEOUT):
        time.sleep(pause)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "hello", "max_tokens": 3}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["choices"]
    conn.close()
    assert not [l for l in _lines(log_path)[before:] if "closed the connection" in l]
