"""Run the workloads on one backend and measure them: throughput, latency, cache hit rates, quality.

A workload's run:
 1. `load` its arguments, `build` its program against the target's frontend (ours, or upstream's `sglang`).
 2. Flush the runtime's cache, read its counters, start recording requests (recording.py), and run the whole
    batch with `run_batch(temperature=0)`: programs/s = programs / wall time.
 3. Stop recording; the achieved hit rate is the counters' delta (cached prompt tokens / prompt tokens, as the
    engine or the server's /server_info reports them), the optimal one is computed from the recorded ids.
 4. Score the states (accuracy where the workload has gold, JSON validity), count failed programs.
 5. Flush again and run the first few programs one at a time: mean single-program latency, beside its compute
    floor: the uncached prompt tokens those programs sent at the prefill rate plus the decode steps the engine
    ran for them at the batch-1 step cost, both probed on the target right before each program
    (`measure_floor`; the row price of the second figure, lat/rows, once at the run's start). Asked for more
    latency programs than the throughput batch holds, the workload's loader gives them.

Targets: `engine` (an in-process Engine on the preset, through `EngineBackend`), `http` (our RuntimeEndpoint to
our server, started here on the preset or given with --url) and `upstream` (upstream's frontend, sglang 0.5.10,
to the same server). `--ablations` repeats the run with a fresh engine or server per setting: radix cache off,
schedule policy dfs-weight and fcfs, and jump-forward off (JSON workloads only); `--ablations radix,fcfs`
picks some. The peer (`LlamaTarget`, `--peer auto`, the default on the command line): llama.cpp's llama-server
on the same GGUF, driven by our frontend's OpenAI backend, when bench/peers.py finds a `llama-server` binary
(`--llama-server`, PATH, or the build of bench/build_llama_server.sh); otherwise the table says it was skipped.
Host code: no jax import here (the engine imports it when built).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench import peers
from bench.programs import common, module
from bench.programs.recording import (Recorder, optimal_hits, record_engine, record_runtime_endpoint,
                                      record_upstream)

DEFAULT_CONFIG = os.path.join(common.ROOT, "configs", "smollm2-135m.yaml")
# --full prompts (ReAct with 6 examples, long chat answers) pass the CPU preset's 2048-token context
FULL_OVERRIDES = {"max_context_len": 8192, "page_width_buckets": [32, 128, 512]}
# (label, engine config changes, the workloads it applies to: None = all)
ABLATIONS = [("baseline", {}, None),
             ("radix off", {"disable_radix_cache": True}, None),
             ("dfs-weight", {"schedule_policy": "dfs-weight"}, None),
             ("fcfs", {"schedule_policy": "fcfs"}, None),
             ("jump-fwd off", {"disable_jump_forward": True}, ("json",))]
FIELDS = ("workload", "programs", "threads", "requests", "batch_s", "programs_per_s", "latency_s",
          "latency_programs", "prompt_tokens", "cached_tokens", "hit_rate", "optimal_prompt_tokens",
          "optimal_hit_rate", "optimal_page_hit_rate", "accuracy", "json_valid", "errors", "first_error",
          "floor_s", "latency_over_floor", "floor_rows_s", "latency_over_floor_rows", "floor_prefill_tok_s",
          "floor_step_s")


# ------------------------------------------------------------------------------------------- targets
class EngineTarget:
    """The in-process engine: built from `config` + `overrides`, or an `engine` handed in (not shut down)."""

    kind = "engine"

    def __init__(self, config: str | None, overrides: dict, engine=None):
        import sgl_jax.program as sgl

        self.lang, self.owns = sgl, engine is None
        if engine is None:
            from sgl_jax.config import load_config
            from sgl_jax.engine import Engine

            engine = Engine(load_config(config, overrides or None).engine)
        engine.wait_compiled()
        self.engine, self.backend = engine, sgl.EngineBackend(engine)
        self.rec = Recorder()
        self._undo = record_engine(engine, self.rec)

    def counters(self) -> tuple[int, int]:
        return self.step_counters()[:2]

    def step_counters(self) -> tuple[int, int, int, int]:
        """(prompt tokens, cached prompt tokens, decode steps, decode rows over those steps) so far."""
        st = self.engine.stats()
        return st["prompt_tokens"], st["cached_tokens"], st["num_decode_steps"], st["num_decode_rows"]

    def busy_seconds(self) -> float:
        """The engine's seconds in steps so far (each step's packing, compiled step and host work)."""
        return self.engine.stats()["busy_seconds"]

    def max_context(self) -> int:
        return self.engine.max_context_len

    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def page_size(self) -> int:
        return self.engine.config.cache.page_size

    def generate_ids(self, ids: list[int] | list[list[int]], max_new_tokens: int) -> None:
        """Greedy, ignore_eos; a list of prompts is submitted as one batch (decoded in the same steps)."""
        self.engine.generate(input_ids=ids, sampling_params={"max_new_tokens": max_new_tokens, "temperature": 0,
                                                             "ignore_eos": True})

    def flush(self) -> None:
        _retry(self.engine.flush_cache, "engine.flush_cache")

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self.engine.tokenizer.encode(t) for t in texts]

    def close(self) -> None:
        self._undo()
        if self.owns:
            self.engine.shutdown()


class HttpTarget:
    """Our server (started here from `config` + `overrides`, or at `url`), through our frontend's
    RuntimeEndpoint or (upstream=True) upstream's."""

    def __init__(self, config: str | None, overrides: dict, url: str | None = None, upstream: bool = False):
        import requests

        self.http, self.upstream, self.server = requests.Session(), upstream, None
        self.kind = "upstream" if upstream else "http"
        if url is None:
            self.server = LocalServer(config, overrides)
            url = self.server.url
        self.url = url.rstrip("/")
        try:
            _wait_ready(self.http, self.url, self.server)
        except BaseException:
            if self.server is not None:
                self.server.stop()
            raise
        if upstream:
            import sglang as lang
        else:
            import sgl_jax.program as lang
        self.lang, self.backend = lang, lang.RuntimeEndpoint(self.url)
        self.rec = Recorder()
        self._undo = record_upstream(self.rec) if upstream else record_runtime_endpoint(self.backend, self.rec)

    def _info(self) -> dict:
        return self.http.get(self.url + "/server_info", timeout=60).json()

    def counters(self) -> tuple[int, int]:
        return self.step_counters()[:2]

    def step_counters(self) -> tuple[int, int, int, int]:
        info = self._info()
        return info["prompt_tokens"], info["cached_tokens"], info["num_decode_steps"], info["num_decode_rows"]

    def busy_seconds(self) -> float:
        return self._info()["busy_seconds"]

    def max_context(self) -> int:
        return self._info()["max_context_len"]

    def vocab_size(self) -> int:
        return self._info()["vocab_size"]

    def page_size(self) -> int:
        return self._info()["cache"]["page_size"]

    def generate_ids(self, ids: list[int] | list[list[int]], max_new_tokens: int) -> None:
        """Greedy, ignore_eos; a list of prompts is one batched request (decoded in the same steps)."""
        r = self.http.post(self.url + "/generate", timeout=600, json={
            "input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0,
                                                  "ignore_eos": True}})
        r.raise_for_status()

    def flush(self) -> None:
        _retry(lambda: self.http.post(self.url + "/flush_cache", timeout=60).status_code == 200, "/flush_cache")

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        out = []
        for i in range(0, len(texts), 64):  # the server's own tokenization of what it was sent
            r = self.http.post(self.url + "/tokenize", json={"text": texts[i:i + 64]}, timeout=600)
            r.raise_for_status()
            out.extend(r.json()["tokens"])
        return out

    def close(self) -> None:
        self._undo()
        if self.server is not None:
            self.server.stop()


class LlamaTarget:
    """The peer: llama.cpp's `llama-server` on the same GGUF, driven by our frontend's OpenAI backend (completion
    API, `/v1`), `slots` parallel slots with prompt caching on. The achieved hit rate comes from the `timings`
    llama-server returns with each completion (`cache_n` tokens reused of `cache_n + prompt_n`); what it was sent
    is recorded as text and tokenized by its own `/tokenize`. It has no decode-step counter, so no floor is
    printed for it, and no echoed prompt logprobs, so `select` workloads fail on it (counted as errors)."""

    kind = "llama"

    def __init__(self, binary: str, gguf: str, slots: int = 16, ctx_per_slot: int = 2048, threads: int = 2):
        import requests

        import sgl_jax.program as lang

        self.ctx = ctx_per_slot
        self.server = peers.LlamaServer(binary, gguf, ["-np", slots, "-cb", "-t", threads, "-c", slots * ctx_per_slot])
        try:
            self.server.start()
        except BaseException:
            self.server.close()
            raise
        self.url = self.server.url
        self.http = requests.Session()
        self.lang = lang
        self.backend = lang.OpenAI(os.path.basename(gguf), base_url=self.url + "/v1", is_chat_model=False,
                                   tokenizer=gguf, supports_regex=False)
        self.rec = Recorder()
        self.prompt_n = self.cache_n = self.decoded = 0
        self._undo = self._wrap()

    def _wrap(self):
        orig, rec = self.backend._post, self.rec

        def _post(path, body, stream=False):
            prompts = body.get("prompt") if path == "/completions" and not stream else None
            if prompts is None:
                return orig(path, body, stream)
            items = prompts if isinstance(prompts, list) else [prompts]
            slots = [rec.arrive(p) for p in items for _ in range(body.get("n", 1) or 1)]
            obj = orig(path, body, stream)
            for slot, c in zip(slots, sorted(obj.get("choices", []), key=lambda c: c.get("index", 0))):
                rec.finish(slot, c.get("text") or "")
            t = obj.get("timings") or {}
            self.prompt_n += int(t.get("prompt_n", 0))
            self.cache_n += int(t.get("cache_n", 0))
            self.decoded += int(t.get("predicted_n", 0))
            return obj

        self.backend._post = _post
        return lambda: self.backend.__dict__.pop("_post", None)

    def counters(self) -> tuple[int, int]:
        return self.step_counters()[:2]

    def step_counters(self) -> tuple[int, int, int, int]:
        """(prompt tokens, cached prompt tokens, tokens decoded, tokens decoded): llama-server counts no steps, so
        each decoded token stands for a step of one row."""
        return self.prompt_n + self.cache_n, self.cache_n, self.decoded, self.decoded

    def max_context(self) -> int:
        return self.ctx

    def vocab_size(self) -> int:
        return self.backend._tokenizer.vocab_size

    def page_size(self) -> int:
        return 1

    def generate_ids(self, ids: list[int], max_new_tokens: int) -> None:
        r = self.http.post(self.url + "/completion", timeout=600, json={
            "prompt": ids, "n_predict": max_new_tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": True})
        r.raise_for_status()

    def flush(self) -> None:
        """A restart: llama-server keeps prompts in its slots and in a host-memory prompt cache (`--cache-ram`),
        and only the slots can be erased over HTTP. (About a second on this machine: the GGUF is mmapped.)"""
        self.server.stop()
        self.server.start()

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        out = []
        for t in texts:
            r = self.http.post(self.url + "/tokenize", json={"content": t}, timeout=600)
            r.raise_for_status()
            out.append(r.json()["tokens"])
        return out

    def close(self) -> None:
        self._undo()
        self.server.close()


def _retry(fn, what: str, tries: int = 50) -> None:
    for _ in range(tries):
        if fn():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} kept refusing (requests still running?)")


def server_args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        text = ("true" if v else "false") if isinstance(v, bool) else (
            ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
        out += ["--set", f"{k}={text}"]
    return out


class LocalServer:
    """`python -m sgl_jax.serve` on a free loopback port, its output in a temporary log file."""

    def __init__(self, config: str | None, overrides: dict):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench_programs_server_", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "sgl_jax.serve", "--port", str(port)] + (["--config", config] if config else [])
        self.proc = subprocess.Popen(cmd + server_args(overrides), cwd=common.ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def tail(self) -> str:
        with open(self.log.name) as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.log.name)


def _wait_ready(http, url: str, server: LocalServer | None, timeout: float = 1800) -> None:
    """/health answers 200 and the background compilation is done (timings then measure serving only)."""
    import requests

    t0 = time.time()
    while time.time() - t0 < timeout:
        if server is not None and server.proc.poll() is not None:
            raise RuntimeError(f"the server exited during start-up:\n{server.tail()}")
        try:
            if http.get(url + "/health", timeout=5).status_code == 200 and \
                    http.get(url + "/server_info", timeout=30).json().get("background_compile_done", True):
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} was not ready after {timeout:.0f} s")


def make_target(kind: str, config: str | None, overrides: dict, url: str | None = None, engine=None):
    if kind == "engine":
        return EngineTarget(config, overrides, engine)
    if kind in ("http", "upstream"):
        return HttpTarget(config, overrides, url, upstream=kind == "upstream")
    raise ValueError(f"backend must be engine, http or upstream, got {kind!r}")


# ------------------------------------------------------------------------------------------- one workload
def _quality(mod, states, items) -> dict:
    errors = [st.error() for st in states]
    failed = [e for e in errors if e is not None]
    out = {"accuracy": None, "json_valid": None, "errors": len(failed),
           "first_error": f"{type(failed[0]).__name__}: {failed[0]}"[:300] if failed else None}
    metric = getattr(mod, "METRIC", None)
    if metric:
        vals = []
        for st, args, err in zip(states, items, errors):
            try:
                vals.append(0.0 if err is not None else float(mod.score(st, args)))
            except Exception:  # noqa: BLE001 -- an unreadable state scores 0 (its error is counted above)
                vals.append(0.0)
        out[metric] = sum(vals) / len(vals) if vals else None
    return out


def measure_floor(target, prefill_tokens: int = 512, decode_tokens: int = 48, tries: int = 3,
                  rows: int = 8, row_context: int = 512, flush: bool = True, seed: int = 1234) -> dict:
    """The machine's rates on this target, measured now: prefill tokens/s (a fresh `prefill_tokens`-token
    prompt, one output token), the batch-1 decode step (the extra wall time of `decode_tokens` more output
    tokens over a short prompt, per token) and what each decode row past the first adds to a step (the same with
    `rows` prompts of `row_context` tokens decoded together: a row's weights-shared compute and its own keys and
    values; `rows` <= 1: not measured, `row_step_s` None). Best of `tries` each, from a flushed cache: a floor,
    not a mean. `flush=False` leaves the cache as it is (a probe between a workload's programs: its random
    prompts, from `seed`, match nothing there)."""
    import random

    prefill_tokens = min(prefill_tokens, target.max_context() // 2)
    row_context = min(row_context, target.max_context() // 2)
    rng = random.Random(seed)
    vocab = target.vocab_size()
    fresh = lambda n: [rng.randrange(vocab // 8, vocab) for _ in range(n)]  # noqa: E731 -- random ids: no hit

    def decode_step(ids) -> float:  # the prompt(s) computed and cached; cached, once more; decode_tokens more
        target.generate_ids(ids, 1)
        t0 = time.perf_counter()
        target.generate_ids(ids, 1)
        t1 = time.perf_counter()
        target.generate_ids(ids, 1 + decode_tokens)  # the same cached request: the extra is decode steps
        t2 = time.perf_counter()
        return ((t2 - t1) - (t1 - t0)) / decode_tokens

    prefill, step, wide = [], [], []
    for _ in range(tries):
        if flush:
            target.flush()
        t0 = time.perf_counter()
        target.generate_ids(fresh(prefill_tokens), 1)
        prefill.append(time.perf_counter() - t0)
        step.append(decode_step(fresh(32)))
        if rows > 1:
            wide.append(decode_step([fresh(row_context) for _ in range(rows)]))
    if flush:
        target.flush()
    step_s = max(min(step), 1e-4)
    return {"prefill_tok_s": prefill_tokens / min(prefill), "decode_step_s": step_s,
            "row_step_s": max(min(wide) - step_s, 0.0) / (rows - 1) if wide else None, "rows_measured": rows,
            "row_context": row_context}


def floor_seconds(floor: dict, before: tuple, after: tuple) -> tuple[float, float]:
    """A program's compute floor from the target's step counters (prompt, cached, decode steps, decode rows)
    around it: the prompt tokens it had to compute at the prefill rate plus its decode steps at the batch-1 step
    cost; and the same with each step priced by its rows (the batch-1 cost plus `row_step_s` for every row past
    the first), the compute of the steps as they ran. Rows are the tokens a step computed as decode rows or run
    blocks; a prompt token laid out that way (a fork's short suffix) is priced at the prefill rate too. The second
    is an estimate, not a bound: its row price is measured on rows with keys and values of their own, where a
    fork's rows share their prefix's pages (tree of thought has read 0.97 of it)."""
    (p0, c0, d0, r0), (p1, c1, d1, r1) = before, after
    one = ((p1 - p0) - (c1 - c0)) / floor["prefill_tok_s"] + (d1 - d0) * floor["decode_step_s"]
    return one, one + max((r1 - r0) - (d1 - d0), 0) * floor.get("row_step_s", 0.0)


def _latency(target, prog, batch: list[dict], floor: dict | None = None) -> dict:
    """Programs one at a time from a flushed cache: the mean wall time of one program, and with `floor`
    (measure_floor's at the run's start) its compute floor: the prompt tokens it had to compute (not cached) at
    the prefill rate, plus the decode steps the engine ran for it at the batch-1 step cost (and, second, at the
    cost of their rows: `floor_seconds`, with the run's row price). The prefill rate and the batch-1 step that
    price a program are probed right before it (one try, the cache kept): this host's speed drifts by up to 1.4x
    within minutes (bench/notes.md), and rates taken once, even at the workload's start, priced programs run in
    another phase of it (lat/floor 1.35-1.69 on the judge in three runs)."""
    out = {"latency_s": None, "latency_programs": 0, "floor_s": None, "latency_over_floor": None,
           "floor_rows_s": None, "latency_over_floor_rows": None, "floor_prefill_tok_s": None,
           "floor_step_s": None}
    if not batch:
        return out
    target.flush()
    times, floors, probes = [], [], []
    for i, args in enumerate(batch):
        if floor:
            here = measure_floor(target, tries=1, rows=1, flush=False, seed=1234 + i)
            probes.append(here)
            priced = {**floor, "prefill_tok_s": here["prefill_tok_s"], "decode_step_s": here["decode_step_s"]}
        before = target.step_counters() if floor else None
        t0 = time.perf_counter()
        prog.run(backend=target.backend, temperature=0, **args).sync()  # upstream's run() returns before the end
        times.append(time.perf_counter() - t0)
        if floor:
            floors.append(floor_seconds(priced, before, target.step_counters()))
    out.update(latency_s=statistics.mean(times), latency_programs=len(times))
    if probes:
        out.update(floor_prefill_tok_s=statistics.mean(p["prefill_tok_s"] for p in probes),
                   floor_step_s=statistics.mean(p["decode_step_s"] for p in probes))
    if floors:
        one, by_rows = statistics.mean(f[0] for f in floors), statistics.mean(f[1] for f in floors)
        out.update(floor_s=one, latency_over_floor=out["latency_s"] / one, floor_rows_s=by_rows,
                   latency_over_floor_rows=out["latency_s"] / by_rows)
    return out


def batch_threads(size: dict, threads: int | None):
    """run_batch's num_threads for a workload: the one asked for, else its size's own (1 for generative agents,
    which replays a log in order), else "auto"."""
    return threads or size.get("threads") or "auto"


def latency_batch(mod, load_kw: dict, batch: list[dict], programs: int, data_dir: str, seed: int = 0,
                  full: bool = False) -> list[dict]:
    """The programs latency runs one at a time: the throughput batch's first `programs`, or, asked for more than
    it holds (tree of thought, ReAct and the judge have 2-4 at the CPU sizes, too few for a mean on this host),
    the workload's loader asked for that many."""
    if programs <= len(batch):
        return batch[:max(programs, 0)]
    return [common.program_args(a) for a in mod.load(data_dir, programs, seed, full, **load_kw)]


def run_workload(target, name: str, data_dir: str, *, full: bool = False, n: int | None = None,
                 latency_programs: int = 8, seed: int = 0, threads: int | None = None,
                 floor: dict | None = None) -> dict:
    """One workload on one target: the row of FIELDS (see the module docstring for the steps)."""
    mod, load_kw = module(name)
    sz = mod.SIZES["full" if full else "cpu"]
    items = mod.load(data_dir, sz["n"] if n is None else n, seed, full, **load_kw)
    prog = mod.build(target.lang, full)
    batch = [common.program_args(a) for a in items]
    nthreads = batch_threads(sz, threads)
    rec = target.rec
    target.flush()
    p0, c0 = target.counters()
    rec.start()
    try:
        t0 = time.perf_counter()
        states = prog.run_batch(batch, backend=target.backend, temperature=0, num_threads=nthreads)
        for st in states:
            st.sync()
        wall = time.perf_counter() - t0
    finally:
        rec.stop()
    p1, c1 = target.counters()
    sent = rec.resolve(target.tokenize)
    hits, total = optimal_hits(sent)
    page_hits, _ = optimal_hits(sent, target.page_size())
    row = {"workload": name, "programs": len(items), "threads": nthreads, "requests": len(rec.prompts),
           "batch_s": wall, "programs_per_s": len(items) / wall if wall > 0 else None,
           "prompt_tokens": p1 - p0, "cached_tokens": c1 - c0,
           "hit_rate": (c1 - c0) / (p1 - p0) if p1 > p0 else 0.0,
           "optimal_prompt_tokens": total, "optimal_hit_rate": hits / total if total else 0.0,
           "optimal_page_hit_rate": page_hits / total if total else 0.0}
    row.update(_quality(mod, states, items))
    lat = latency_batch(mod, load_kw, batch, latency_programs, data_dir, seed, full)
    row.update(_latency(target, prog, lat, floor))
    return {k: row.get(k) for k in FIELDS}


# ------------------------------------------------------------------------------------------- suites
ABLATION_KEYS = {"radix": "radix off", "dfs": "dfs-weight", "fcfs": "fcfs", "jf": "jump-fwd off"}


def _settings(ablations) -> list:
    """The baseline, then the ablations asked for: False/'' none, True/'all' every one, or a comma list of keys."""
    if ablations in (False, None, ""):
        return ABLATIONS[:1]
    if ablations is True or ablations == "all":
        return ABLATIONS
    keys = [k.strip() for k in str(ablations).split(",") if k.strip()]
    bad = [k for k in keys if k not in ABLATION_KEYS]
    if bad:
        raise ValueError(f"unknown ablation(s) {bad}; choose from {sorted(ABLATION_KEYS)}")
    return ABLATIONS[:1] + [a for a in ABLATIONS[1:] if a[0] in {ABLATION_KEYS[k] for k in keys}]


def _gguf(config: str | None, overrides: dict) -> str:
    from sgl_jax.config import load_config
    from sgl_jax.models.hub import resolve_model

    return resolve_model(load_config(config, overrides or None).engine.model)


def run_peer(binary: str | None, workloads, data_dir: str, *, config, overrides, full, n, latency_programs, seed,
             threads) -> tuple[str, dict | None]:
    """llama-server on the same GGUF through the OpenAI backend: (the peer line, its run or None if skipped or it
    did not start)."""
    if binary is None:
        return peers.SKIPPED, None
    print("[llama-server] starting the peer ...", file=sys.stderr, flush=True)
    try:
        target = LlamaTarget(binary, _gguf(config, overrides))
    except (RuntimeError, TimeoutError) as e:  # our runs stand; the peer line says why it has none
        return "peer failed to start: " + " ".join(str(e).split())[-300:], None
    rows = []
    try:
        for w in workloads:
            print(f"[llama-server] {w} ...", file=sys.stderr, flush=True)
            rows.append(run_workload(target, w, data_dir, full=full, n=n, latency_programs=latency_programs,
                                     seed=seed, threads=threads, floor=None))
    finally:
        target.close()
    return f"peer run: {binary} (16 slots, completion API), same GGUF, same machine, in this invocation", {
        "label": "llama-server", "settings": {"binary": binary}, "rows": rows, "floor": None}


def run(backend: str = "engine", workloads=("mmlu",), data_dir: str = common.DEFAULT_DATA, *, full: bool = False,
        n: int | None = None, latency_programs: int = 8, seed: int = 0, threads: int | None = None,
        config: str | None = DEFAULT_CONFIG, overrides: dict | None = None, url: str | None = None,
        ablations: bool | str = False, engine=None, json_path: str | None = None, out=sys.stdout,
        peer: bool | str = False, llama_server: str | None = None) -> dict:
    """Every workload on the backend, once per setting (just the baseline without `ablations`); prints the
    tables, writes `json_path`, returns the result. `engine` (an Engine) serves the baseline in place of one
    built from `config`; with `url`, the server there serves it (no ablations then)."""
    if ablations and (url or engine is not None):
        raise ValueError("--ablations restarts the engine or server per setting: not with --url or a given engine")
    base = {**(FULL_OVERRIDES if full else {}), **(overrides or {})}
    runs = []
    for label, change, only in (_settings(ablations) if peer != "only" else []):
        names = [w for w in workloads if only is None or w in only]
        if not names:
            continue
        print(f"[{label}] starting the {backend} backend ...", file=sys.stderr, flush=True)
        target = make_target(backend, config, {**base, **change}, url, engine)
        rows = []
        try:
            floor = measure_floor(target) if latency_programs else None
            if floor:
                print(f"[{label}] floor: prefill {floor['prefill_tok_s']:.0f} tok/s, batch-1 decode step "
                      f"{1e3 * floor['decode_step_s']:.1f} ms, +{1e3 * floor['row_step_s']:.2f} ms a row",
                      file=sys.stderr, flush=True)
            for w in names:
                print(f"[{label}] {w} ...", file=sys.stderr, flush=True)
                rows.append(run_workload(target, w, data_dir, full=full, n=n, latency_programs=latency_programs,
                                         seed=seed, threads=threads, floor=floor))
        finally:
            target.close()
        runs.append({"label": label, "settings": change, "rows": rows, "floor": floor})
    peer_text = "peer not asked for (--peer off)"
    if peer:
        peer_text, peer_run = run_peer(peers.find_llama_server(llama_server), workloads, data_dir,
                                       config=config, overrides=base, full=full, n=n,
                                       latency_programs=latency_programs, seed=seed, threads=threads)
        if peer_run is not None:
            runs.append(peer_run)
    result = {"backend": backend, "scale": "full" if full else "cpu", "config": config, "overrides": base,
              "url": url, "seed": seed, "data": os.path.abspath(data_dir), "runs": runs, "peer": peer_text,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(format_tables(result), file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def run_rounds(backends: list[str], rounds: int, workloads=("mmlu",), *, json_path: str | None = None,
               out=sys.stdout, peer: bool | str = False, **kw) -> dict:
    """Every backend in turn, `rounds` times over (engine, http, engine, http, ...), each on a fresh engine or
    server: on a host whose speed drifts for minutes at a time, alternating in one invocation is what makes two
    frontends' figures comparable. Each run prints its tables; then one side-by-side table (programs/s and
    single-program latency per round, and their medians). The peer, if asked for, runs once, after round 1."""
    results = []
    for i in range(rounds):
        for j, b in enumerate(backends):
            print(f"[round {i + 1}/{rounds}] {b} backend", file=sys.stderr, flush=True)
            res = run(b, workloads, out=out, peer=peer if (i, j) == (0, len(backends) - 1) else False, **kw)
            results.append({"round": i + 1, "backend": b, "result": res})
    text = format_rounds(results)
    print(text, file=out)
    combined = {"backends": list(backends), "rounds": rounds, "runs": results, "comparison": text,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(combined, f, indent=1)
    return combined


def paired_latency(backends: list[str], workloads, programs: int, **kw) -> dict:
    """Single-program latency with every backend alive at once (an in-process engine beside a local server): each
    workload's programs one at a time, each program on every backend in turn (the order rotating program by
    program), both caches flushed at the workload's start so that each backend sees the same sequence. On a host
    whose speed drifts within minutes, separate runs of a few programs each could not tell two frontends apart
    (bench/notes.md); here each program is its own comparison. Prints per workload each backend's mean and median
    and, against the first backend, the paired mean difference and in how many programs it was faster."""
    return _paired(backends, workloads, programs, throughput=False, **kw)


def paired_throughput(backends: list[str], workloads, rounds: int, **kw) -> dict:
    """Throughput with every backend alive at once: each workload's whole batch (`run_batch`, its CPU or --full
    size, or `n`) run `rounds` times on every backend in turn, the order rotating round by round, each run from a
    flushed cache. `run_rounds` runs every workload on one backend, then on the next: minutes apart, in different
    phases of this host's speed. Prints per workload each backend's seconds a batch (mean / median) and, against the
    first backend, the paired difference and in how many rounds it was faster."""
    return _paired(backends, workloads, rounds, throughput=True, **kw)


def _paired(backends: list[str], workloads, count: int, *, throughput: bool, data_dir: str = common.DEFAULT_DATA,
            full: bool = False, n: int | None = None, seed: int = 0, threads: int | None = None,
            config: str | None = DEFAULT_CONFIG, overrides: dict | None = None, json_path: str | None = None,
            out=sys.stdout, **_) -> dict:
    """paired_latency (count programs, each one a comparison) or paired_throughput (count rounds of the batch)."""
    base = {**(FULL_OVERRIDES if full else {}), **(overrides or {})}
    targets = {}
    try:
        for b in backends:
            print(f"[paired] starting the {b} backend ...", file=sys.stderr, flush=True)
            targets[b] = make_target(b, config, base)
        rows = []
        for w in workloads:
            mod, load_kw = module(w)
            sz = mod.SIZES["full" if full else "cpu"]
            items = mod.load(data_dir, (sz["n"] if n is None else n) if throughput else count, seed, full, **load_kw)
            batch = [common.program_args(a) for a in items]
            progs = {b: mod.build(t.lang, full) for b, t in targets.items()}
            times: dict = {b: [] for b in backends}
            outside: dict = {b: [] for b in backends}  # latency: a program's wall time minus its engine's steps
            for t in targets.values():
                t.flush()
            for i in range(count if throughput else len(batch)):
                for b in backends[i % len(backends):] + backends[:i % len(backends)]:
                    if throughput:
                        targets[b].flush()
                        t0 = time.perf_counter()
                        for st in progs[b].run_batch(batch, backend=targets[b].backend, temperature=0,
                                                     num_threads=batch_threads(sz, threads)):
                            st.sync()
                        times[b].append(time.perf_counter() - t0)
                        continue
                    b0 = targets[b].busy_seconds()
                    t0 = time.perf_counter()
                    progs[b].run(backend=targets[b].backend, temperature=0, **batch[i]).sync()
                    times[b].append(time.perf_counter() - t0)
                    outside[b].append(times[b][-1] - (targets[b].busy_seconds() - b0))
            rows.append(_paired_row(w, len(batch), backends, times, outside))
    finally:
        for t in targets.values():
            t.close()
    text = _paired_text(rows, backends, count, throughput)
    print(text, file=out)
    result = {"backends": backends, ("rounds" if throughput else "programs"): count, "config": config,
              "overrides": base, "rows": rows, "text": text, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _paired_row(workload: str, programs: int, backends: list[str], times: dict, outside: dict) -> dict:
    """A workload's paired figures: against the first backend, each other's mean difference and in how many runs
    the first was faster; the same for the time outside the steps where it was measured."""
    first = backends[0]
    row = {"workload": workload, "programs": programs, "runs": len(times[first]), "seconds": times}
    for b in backends[1:]:
        d = [x - y for x, y in zip(times[b], times[first])]
        if d:
            row[f"{b}_minus_{first}_mean_s"], row[f"{first}_faster_than_{b}_in"] = statistics.mean(d), sum(
                x > 0 for x in d)
    if any(outside.values()):
        row["outside_steps_seconds"] = outside
        for b in backends[1:]:
            d = [x - y for x, y in zip(outside[b], outside[first])]
            if d:
                row[f"outside_{b}_minus_{first}_mean_s"] = statistics.mean(d)
                row[f"outside_{first}_less_than_{b}_in"] = sum(x > 0 for x in d)
    return row


def _paired_text(rows: list[dict], backends: list[str], count: int, throughput: bool) -> str:
    what = (f"throughput, backends alive at once, each workload's batch on each in turn ({count} round(s), from a "
            "flushed cache each): seconds a batch, mean / median ms") if throughput else \
        (f"single-program latency, backends alive at once, each program on each in turn ({count} a workload, the "
         "first one cold): mean / median ms")
    unit = "round" if throughput else "program"
    lines = ["\n" + what]
    for row in rows:
        sec = row["seconds"]
        cells = [f"{b} {1e3 * statistics.mean(sec[b]):.1f} / {1e3 * statistics.median(sec[b]):.1f}"
                 for b in backends if sec[b]]
        extra = "".join(f"; {b} - {backends[0]} {1e3 * row[f'{b}_minus_{backends[0]}_mean_s']:+.1f} ms a {unit}, "
                        f"{backends[0]} faster in {row[f'{backends[0]}_faster_than_{b}_in']} of {row['runs']}"
                        for b in backends[1:] if row.get(f"{b}_minus_{backends[0]}_mean_s") is not None)
        lines.append(f"{row['workload']:12s} " + ", ".join(cells) + extra)
        out_s = row.get("outside_steps_seconds")
        if out_s and all(out_s[b] for b in backends):
            lines.append(f"{'':12s} outside the engine's steps (wall - step time): " + ", ".join(
                f"{b} {1e3 * statistics.mean(out_s[b]):.1f} / {1e3 * statistics.median(out_s[b]):.1f}"
                for b in backends) + "".join(
                f"; {b} - {backends[0]} {1e3 * row[f'outside_{b}_minus_{backends[0]}_mean_s']:+.1f} ms, "
                f"{backends[0]} less in {row[f'outside_{backends[0]}_less_than_{b}_in']} of {row['runs']}"
                for b in backends[1:]))
    return "\n".join(lines)


def format_rounds(results: list[dict]) -> str:
    """The baseline rows of alternating runs side by side: per workload and backend, programs/s and latency for
    each round and their medians."""
    backends = list(dict.fromkeys(r["backend"] for r in results))
    cell: dict = {}
    for r in results:
        base = next((x for x in r["result"]["runs"] if x["label"] == "baseline"), None)
        for row in base["rows"] if base else []:
            cell.setdefault((row["workload"], r["backend"]), []).append(row)
    names = list(dict.fromkeys(w for w, _ in cell))
    lines = [f"\nbackends alternated over {max(r['round'] for r in results)} round(s): programs/s per round "
             "(median) | single-program latency s (median)"]
    for w in names:
        for b in backends:
            rows = cell.get((w, b), [])
            tput = [x["programs_per_s"] for x in rows if x["programs_per_s"] is not None]
            lat = [x["latency_s"] for x in rows if x["latency_s"] is not None]
            t_txt = " / ".join(f"{v:.3f}" for v in tput) + (f" ({statistics.median(tput):.3f})" if tput else "-")
            l_txt = (" / ".join(f"{v:.3f}" for v in lat) + f" ({statistics.median(lat):.3f})") if lat else "-"
            lines.append(f"{w:12s} {b:9s} {t_txt} | {l_txt}")
    return "\n".join(lines)


def _pct(x) -> str:
    return "   -" if x is None else f"{100 * x:3.0f}%"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_tables(result: dict) -> str:
    lines = []
    for run_ in result["runs"]:
        if run_["label"] == "llama-server":
            lines.append(f"\npeer: llama-server, {result['scale']} sizes, {run_['settings']['binary']}")
        else:
            lines.append(f"\n{result['backend']} backend, {result['scale']} sizes, setting: {run_['label']} "
                         f"{run_['settings'] or ''}")
        fl = run_.get("floor")
        if fl:
            lines.append(f"measured at the run's start: prefill {fl['prefill_tok_s']:.0f} tok/s, batch-1 decode step "
                         f"{1e3 * fl['decode_step_s']:.1f} ms, each row past the first "
                         f"+{1e3 * (fl.get('row_step_s') or 0.0):.2f} ms (rows of {fl.get('row_context')} tokens); "
                         "floor = the latency programs' uncached prompt tokens at the prefill rate + their decode "
                         "steps at the batch-1 step cost, both probed right before each latency program (pf tok/s, "
                         "step ms: the probes' means) (lat/floor, the target's figure); lat/rows prices each step "
                         "by its rows instead")
        lines.append(f"{'workload':12s} {'progs':>5s} {'reqs':>5s} {'prog/s':>8s} {'latency s':>9s} {'hit':>5s} "
                     f"{'optimal':>7s} {'opt/pg':>6s} {'accuracy':>8s} {'json ok':>7s} {'errors':>6s} "
                     f"{'lat n':>5s} {'pf tok/s':>8s} {'step ms':>7s} {'floor s':>7s} {'lat/floor':>9s} "
                     f"{'lat/rows':>8s}")
        for r in run_["rows"]:
            lines.append(f"{r['workload']:12s} {r['programs']:5d} {r['requests']:5d} "
                         f"{_num(r['programs_per_s'], '8.3f')} {_num(r['latency_s'], '9.2f')} "
                         f"{_pct(r['hit_rate']):>5s} {_pct(r['optimal_hit_rate']):>7s} "
                         f"{_pct(r.get('optimal_page_hit_rate')):>6s} "
                         f"{_pct(r['accuracy']):>8s} {_pct(r['json_valid']):>7s} {r['errors']:6d} "
                         f"{r.get('latency_programs') or 0:5d} {_num(r.get('floor_prefill_tok_s'), '8.0f'):>8s} "
                         f"{_num(r.get('floor_step_s') and 1e3 * r['floor_step_s'], '7.1f'):>7s} "
                         f"{_num(r.get('floor_s'), '7.2f'):>7s} {_num(r.get('latency_over_floor'), '9.2f'):>9s} "
                         f"{_num(r.get('latency_over_floor_rows'), '8.2f'):>8s}")
            if r["first_error"]:
                lines.append(f"{'':12s} first error: {r['first_error']}")
    if len(result["runs"]) > 1:
        lines.append(format_ablations(result["runs"]))
    lines.append(result["peer"])
    lines.append("hit = cached / prompt tokens from the runtime's counters (whole pages, then part of a page by a "
                 "copy); optimal = an infinite cache in arrival order, token granularity; opt/pg = the same in whole "
                 "pages, each prompt's last token computed (what a page-granular cache could reach)")
    return "\n".join(lines)


def format_ablations(runs: list[dict]) -> str:
    labels = [r["label"] for r in runs]
    by = {(r["label"], row["workload"]): row for r in runs for row in r["rows"]}
    names = list(dict.fromkeys(row["workload"] for r in runs for row in r["rows"]))
    lines = ["\nablations, side by side: programs/s | achieved hit rate", f"{'workload':12s} " +
             " ".join(f"{x:>16s}" for x in labels)]
    for w in names:
        cells = []
        for lab in labels:
            r = by.get((lab, w))
            cells.append(f"{'':>16s}" if r is None else
                         f"{_num(r['programs_per_s'], '7.3f')} | {_pct(r['hit_rate'])}".rjust(16))
        lines.append(f"{w:12s} " + " ".join(cells))
    return "\n".join(lines)
