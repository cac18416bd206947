"""bench/peers.py: which llama-server the benchmarks run beside our figures, and its lifecycle -- against fake
binaries (a script that serves /health, one that dies at start-up), so nothing here needs llama.cpp."""

from __future__ import annotations

import os
import stat
import sys
import textwrap

import pytest
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import peers  # noqa: E402

pytestmark = pytest.mark.timeout(120)

# a stand-in llama-server: answers GET /health with 200 on the --port it is given, logs a line first
SERVES = textwrap.dedent("""\
    #!{python}
    import http.server, sys
    port = int(sys.argv[sys.argv.index("--port") + 1])
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    print("fake llama-server up with", sys.argv[1:], flush=True)
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")
DIES = "#!/bin/sh\necho 'error: model file not found'\nexit 3\n"


def _script(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def no_peer(monkeypatch, tmp_path):
    """PATH without a llama-server and an empty peers cache."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setenv("SGL_JAX_PEERS", str(tmp_path / "peers"))
    return tmp_path


def test_found_as_given_then_on_path_then_the_cached_build(no_peer, monkeypatch):
    tmp = no_peer
    assert peers.find_llama_server() is None
    built = _script(tmp / "peers" / f"llama.cpp-{peers.LLAMA_CPP_PYTHON}" / "build" / "bin" / "llama-server", DIES)
    assert built == peers.built_binary()
    assert peers.find_llama_server() == built
    on_path = _script(tmp / "bin" / "llama-server", DIES)
    monkeypatch.setenv("PATH", str(tmp / "bin"))
    assert peers.find_llama_server() == on_path
    given = _script(tmp / "elsewhere" / "my-llama", DIES)
    assert peers.find_llama_server(given) == given


def test_a_given_path_that_is_not_an_executable_is_an_error_naming_it(no_peer):
    plain = no_peer / "llama-server.txt"
    plain.write_text("not a program")
    for bad in (str(plain), str(no_peer / "missing")):
        with pytest.raises(ValueError, match="is not an executable file") as e:
            peers.find_llama_server(bad)
        assert bad in str(e.value)


def test_the_server_is_ready_inside_the_block_and_gone_after(no_peer):
    binary = _script(no_peer / "bin" / "llama-server", SERVES)
    with peers.LlamaServer(binary, "model.gguf", ["-np", 16, "-t", 2]) as srv:
        assert requests.get(srv.url + "/health", timeout=5).status_code == 200
        assert srv.cmd[1:3] == ["-m", "model.gguf"] and srv.cmd[-4:] == ["-np", "16", "-t", "2"]
        assert "fake llama-server up" in srv.tail()
        proc = srv.proc
    assert proc.poll() is not None and not os.path.exists(srv.log.name)
    with pytest.raises(requests.RequestException):
        requests.get(srv.url + "/health", timeout=2)


def test_stopped_and_started_again_on_the_same_port_and_closed_without_its_log(no_peer):
    """A peer's cache flushed (bench/programs' LlamaTarget.flush): stop() ends the process, start() brings a new one
    up at the same url, writing on in the same log; close() ends it and removes the log."""
    binary = _script(no_peer / "bin" / "llama-server", SERVES)
    srv = peers.LlamaServer(binary, "model.gguf").start()
    first = srv.proc
    srv.stop()
    assert first.poll() is not None
    srv.start()
    assert srv.proc is not first and requests.get(srv.url + "/health", timeout=5).status_code == 200
    assert srv.tail().count("fake llama-server up") == 2
    srv.close()
    assert srv.proc.poll() is not None and not os.path.exists(srv.log.name)


def test_a_server_that_dies_at_start_up_is_an_error_with_its_output(no_peer):
    binary = _script(no_peer / "bin" / "llama-server", DIES)
    srv = peers.LlamaServer(binary, "model.gguf")
    with pytest.raises(RuntimeError, match="exited with 3 during start-up") as e:
        with srv:
            pass
    assert "model file not found" in str(e.value)
    assert not os.path.exists(srv.log.name)


def test_without_a_binary_the_programs_bench_says_the_peer_was_skipped(no_peer):
    from bench.programs import runner

    text, run = runner.run_peer(peers.find_llama_server(), ["mmlu"], "unused", config="unused", overrides={},
                                full=False, n=1, latency_programs=0, seed=0, threads=None)
    assert run is None and text == peers.SKIPPED and "build_llama_server.sh" in text


def test_a_peer_that_does_not_start_leaves_the_programs_bench_a_line_saying_why(no_peer, monkeypatch):
    from bench.programs import runner

    monkeypatch.setattr(runner, "_gguf", lambda config, overrides: "model.gguf")
    binary = _script(no_peer / "bin" / "llama-server", DIES)
    text, run = runner.run_peer(binary, ["mmlu"], "unused", config="unused", overrides={}, full=False, n=1,
                                latency_programs=0, seed=0, threads=None)
    assert run is None and text.startswith("peer failed to start:") and "model file not found" in text
