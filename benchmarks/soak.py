"""Soak run of the real server: README's ``vllm serve`` under mixed load, with clients that abort
mid-stream and malformed requests, for a fixed time; the resident memory of the API server and of
the EngineCore process sampled throughout.

The server starts as README's serving command starts it (vLLM's defaults: torch.compile, bf16), with
an operating point that merges while decoding (``--rules``, default ``artifacts/smollm2-135m/max``)
and ``--umim-max-window`` so requests may ask for their own raw windows. ``--clients`` coroutines
send, back to back, a random mix of:

* ``merged``: streaming completions with the server's policy or a per-request one (several
  ``umim_window`` / ``umim_min_confidence`` values, so the engine's policy cache turns over);
* ``opt-out``: streaming completions with ``vllm_xargs: {"umim": false}``;
* ``chat``: chat completions, streaming or not, some with a per-request policy;
* ``abort``: streaming completions the client drops after a few chunks;
* ``malformed``: a negative or huge window, an unknown setting, a value of the wrong type, an unknown
  mode, a negative ``max_tokens``, broken JSON: each must be answered with a 4xx.

Every ``--sample-s`` seconds: the RSS of the API server (the ``vllm serve`` process), of the
EngineCore (its child process of that name) and of the Worker under it (the model runner, which
holds the KV cache), the load average, ``vllm:kv_cache_usage_perc`` and the
``vllm_umim:*`` counters. At the end the load stops, KV usage must return to 0, and a greedy probe
must equal the same probe sent before the load started; then the server is stopped (SIGINT).

Verdict (:func:`verdict`, a pure function of the samples and counts): the first ``--warmup-minutes``
are warm-up; each of the three processes' RSS growth is (median of the last ``--window-minutes`` of samples −
median of the ``--window-minutes`` right after warm-up) / the latter. The run passes iff all
growths are ≤ ``--max-growth``, no 5xx, no connection error or timeout, no error event inside a
stream, every well-formed request answered 200 and every malformed one 4xx, no UMIM request fault,
KV drained and the probe equal::

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 \\
        python -m benchmarks.soak --minutes 32 --json benchmarks/results/soak.json

``tests/benchmarks/test_soak.py`` checks the verdict on synthetic samples.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOOD_KINDS = ("merged", "opt-out", "chat", "abort")
KIND_WEIGHTS = {"merged": 4, "opt-out": 2, "chat": 2, "abort": 2, "malformed": 2}
POLICIES = [{}, {"umim_window": 4}, {"umim_window": 16}, {"umim_window": 32}, {"umim_min_confidence": 0.3},
            {"umim_min_confidence": 0.6}, {"umim_min_confidence": 0.9}, {"umim_window": 8, "umim_min_confidence": 0.5},
            {"umim": "prompt"}, {"umim": "prompt", "umim_window": 12}]
MAX_WINDOW = 32
PROCESSES = ("api", "engine", "worker")  # whose RSS is sampled (see server_processes)
ABORT_AFTER_CHUNKS = (1, 3, 8)
REQUEST_TIMEOUT_S = 300
UMIM_COUNTERS = ("vllm_umim:merged_requests_total", "vllm_umim:prefill_merges_total", "vllm_umim:decode_merges_total",
                 "vllm_umim:raw_tokens_total", "vllm_umim:tokens_merged_away_total")
STOCK_MALFORMED = ("negative-max-tokens", "broken-json")
MAX_SERIES = 400  # RSS samples kept in the JSON (evenly thinned above this)


# ---------------------------------------------------------------- the verdict (pure)

def _median_between(samples: list[dict], key: str, start: float, end: float, closed_right: bool = False):
    """Median and count of ``key`` over samples with ``start <= t < end`` (``start < t <= end`` if closed_right)."""
    inside = (lambda t: start < t <= end) if closed_right else (lambda t: start <= t < end)
    values = [s[key] for s in samples if inside(s["t"]) and s.get(key) is not None]
    return (statistics.median(values) if values else None), len(values)


def rss_growth(samples: list[dict], key: str, warmup_s: float, window_s: float) -> dict:
    """Growth of ``samples[*][key]`` (bytes): median of the last ``window_s`` against the median of
    the ``window_s`` right after ``warmup_s``. ``growth`` is None when a window is empty or the two
    overlap (a run too short for the verdict)."""
    end = max((s["t"] for s in samples), default=0.0)
    base, n_base = _median_between(samples, key, warmup_s, warmup_s + window_s)
    last, n_last = _median_between(samples, key, end - window_s, end, closed_right=True)
    overlap = end - window_s < warmup_s + window_s
    growth = None if base is None or last is None or overlap or base <= 0 else (last - base) / base
    return {"baseline_bytes": base, "baseline_samples": n_base, "baseline_window_s": [warmup_s, warmup_s + window_s],
            "final_bytes": last, "final_samples": n_last, "final_window_s": [end - window_s, end], "growth": growth}


def verdict(samples: list[dict], counts: dict, *, kv_drained: bool, probe_equal: bool, faults: float = 0,
            warmup_s: float = 300, window_s: float = 300, max_growth: float = 0.02) -> dict:
    """Pass or fail of a soak run, with the figures it rests on.

    ``samples``: ``{"t": seconds since the load began, "<process>_rss": bytes, ...}``; every process
    with an ``_rss`` key in the first sample is judged (without samples: api and engine, unmeasurable).
    ``counts``: ``{kind: {outcome: n}}``, outcome an HTTP status as a string or ``"connect_error"``,
    ``"timeout"``, ``"stream_error"``, ``"error:<type>"``; kinds are ``GOOD_KINDS`` (must get 200) and
    ``"malformed"`` (must get a 4xx)."""
    names = [key.removesuffix("_rss") for key in (samples[0] if samples else {"api_rss": 0, "engine_rss": 0}) if key.endswith("_rss")]
    growth = {name: rss_growth(samples, f"{name}_rss", warmup_s, window_s) for name in names}
    server_errors = connection_errors = stream_errors = unexpected = 0
    for kind, outcomes in counts.items():
        for outcome, n in outcomes.items():
            if outcome.isdigit():
                status = int(outcome)
                server_errors += n if status >= 500 else 0
                expected = 400 <= status < 500 if kind == "malformed" else status == 200
                unexpected += 0 if expected or status >= 500 else n
            elif outcome == "stream_error":
                stream_errors += n
            else:
                connection_errors += n
    failures = []
    for name, g in growth.items():
        if g["growth"] is None:
            failures.append(f"{name} RSS growth not measurable (run shorter than warm-up + two windows, or no samples)")
        elif g["growth"] > max_growth:
            failures.append(f"{name} RSS grew {g['growth']:.2%} > {max_growth:.0%}")
    for label, n in (("5xx responses", server_errors), ("connection errors/timeouts", connection_errors),
                     ("error events inside streams", stream_errors), ("unexpected statuses", unexpected),
                     ("UMIM request faults", faults)):
        if n:
            failures.append(f"{n:g} {label}")
    if not kv_drained:
        failures.append("KV cache not drained after the load stopped")
    if not probe_equal:
        failures.append("greedy probe after the run differs from the one before it")
    return {"pass": not failures, "failures": failures, "warmup_s": warmup_s, "window_s": window_s,
            "max_growth": max_growth, "rss": growth, "server_errors_5xx": server_errors,
            "connection_errors": connection_errors, "stream_errors": stream_errors,
            "unexpected_statuses": unexpected, "umim_request_faults": faults,
            "kv_drained": kv_drained, "probe_equal": probe_equal}


def thin(series: list, limit: int = MAX_SERIES) -> list:
    """At most ``limit`` evenly spaced items of ``series``, first and last kept."""
    if len(series) <= limit:
        return list(series)
    step = (len(series) - 1) / (limit - 1)
    return [series[round(i * step)] for i in range(limit)]


# ---------------------------------------------------------------- the load

def prompts_from_corpus(n: int = 200, seed: int = 0) -> list[str]:
    """Openings of held-out Wikipedia articles, 200-1500 characters, cut at a word boundary."""
    from vllm_umim.data.corpus import fetch_corpus, read_documents

    rng = random.Random(seed)
    documents = [d for d in read_documents(fetch_corpus("wiki") / "heldout.txt") if len(d) >= 300][: n * 2]
    prompts = []
    for document in rng.sample(documents, min(n, len(documents))):
        cut = document[: rng.randint(200, 1500)]
        prompts.append(cut.rsplit(" ", 1)[0] if " " in cut else cut)
    return prompts


def malformed_requests(model: str, prompt: str) -> list[tuple[str, str, bytes | dict]]:
    """(name, path, body) of requests a server must refuse with a 4xx."""
    base = {"model": model, "prompt": prompt, "max_tokens": 8}
    bad_xargs = {"negative-window": {"umim_window": -1}, "huge-window": {"umim_window": 10**9},
                 "window-above-max": {"umim_window": MAX_WINDOW + 1}, "unknown-setting": {"umim_speed": 2},
                 "wrong-type": {"umim_min_confidence": "high"}, "unknown-mode": {"umim": "always"},
                 "confidence-above-1": {"umim_min_confidence": 1.5}}
    requests = [(name, "/v1/completions", {**base, "vllm_xargs": xargs}) for name, xargs in bad_xargs.items()]
    requests.append(("negative-max-tokens", "/v1/completions", {**base, "max_tokens": -5}))
    requests.append(("chat-bad-window", "/v1/chat/completions",
                     {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
                      "vllm_xargs": {"umim_window": -3}}))
    requests.append(("broken-json", "/v1/completions", b'{"model": "' + model.encode() + b'", "prompt": "abc", '))
    return requests


class Load:
    """The clients' shared state: request counts by kind and outcome, and a stop flag."""

    def __init__(self, server, prompts: list[str], seed: int, stock: bool = False):
        self.server, self.prompts, self.rng, self.stock = server, prompts, random.Random(seed), stock
        self.counts: dict[str, dict[str, int]] = {}
        self.malformed_names: dict[str, dict[str, int]] = {}
        self.stop = False
        self.examples: dict[str, str] = {}  # first response text of each unexpected outcome

    def count(self, kind: str, outcome: str, detail: str = "") -> None:
        self.counts.setdefault(kind, {}).setdefault(outcome, 0)
        self.counts[kind][outcome] += 1
        bad = (outcome != "200" and kind != "malformed") or (kind == "malformed" and not outcome.startswith("4"))
        if bad and f"{kind}:{outcome}" not in self.examples:
            self.examples[f"{kind}:{outcome}"] = detail[:500]

    async def client(self, client) -> None:
        kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
        while not self.stop:
            kind = self.rng.choices(kinds, weights)[0]
            try:
                await self.one(client, kind)
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none ends the run
                import httpx

                if isinstance(exc, httpx.TimeoutException):
                    self.count(kind, "timeout", repr(exc))
                elif isinstance(exc, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)):
                    self.count(kind, "connect_error", repr(exc))
                else:
                    self.count(kind, f"error:{type(exc).__name__}", repr(exc))

    async def one(self, client, kind: str) -> None:
        rng, model = self.rng, self.server.model
        prompt = rng.choice(self.prompts)
        if kind == "malformed":
            cases = malformed_requests(model, prompt)
            if self.stock:  # without UMIM the umim keys are ignored: only vLLM's own bad input
                cases = [case for case in cases if case[0] in STOCK_MALFORMED]
            name, path, body = rng.choice(cases)
            if isinstance(body, bytes):
                response = await client.post(self.server.url + path, content=body,
                                             headers={"content-type": "application/json"})
            else:
                response = await client.post(self.server.url + path, json=body)
            self.count(kind, str(response.status_code), f"{name}: {response.text}")
            self.malformed_names.setdefault(name, {}).setdefault(str(response.status_code), 0)
            self.malformed_names[name][str(response.status_code)] += 1
            return
        sampling = {"temperature": 0} if rng.random() < 0.5 else {"temperature": 0.8, "top_p": 0.95, "seed": rng.randrange(1 << 30)}
        body = {"model": model, "max_tokens": rng.randint(8, 64), **sampling}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": "Continue this text: " + prompt}]
            policy = rng.choice(POLICIES)
            if policy:
                body["vllm_xargs"] = policy
            if rng.random() < 0.5:
                response = await client.post(self.server.url + "/v1/chat/completions", json=body)
                self.count(kind, str(response.status_code), response.text)
                return
            await self.stream(client, "/v1/chat/completions", body, kind, abort_after=None)
            return
        body["prompt"] = prompt
        if kind == "opt-out":
            body["vllm_xargs"] = {"umim": False}
        elif kind == "merged":
            policy = rng.choice(POLICIES)
            if policy:
                body["vllm_xargs"] = policy
        abort_after = rng.choice(ABORT_AFTER_CHUNKS) if kind == "abort" else None
        await self.stream(client, "/v1/completions", body, kind, abort_after)

    async def stream(self, client, path: str, body: dict, kind: str, abort_after: int | None) -> None:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        chunks = 0
        async with client.stream("POST", self.server.url + path, json=body) as response:
            if response.status_code != 200:
                self.count(kind, str(response.status_code), (await response.aread()).decode(errors="replace"))
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    self.count(kind, "stream_error", line)
                    return
                chunks += len(event.get("choices") or [])
                if abort_after is not None and chunks >= abort_after:
                    break  # leaving the block drops the connection mid-stream
        self.count(kind, "200")


# ---------------------------------------------------------------- processes and metrics

def server_processes(pid: int) -> dict:
    """{"api": the ``vllm serve`` process, "engine": its ``VLLM::EngineCore`` child, "worker": the
    ``VLLM::Worker`` processes under it (the model runner; a list)}; None / [] until they exist."""
    import psutil

    api = psutil.Process(pid)
    engine, workers = None, []
    for child in api.children(recursive=True):
        try:
            label = child.name() + " " + " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "EngineCore" in label:
            engine = child
        elif "VLLM::Worker" in label:
            workers.append(child)
    return {"api": api, "engine": engine, "worker": workers}


def rss(process) -> int | None:
    """Resident bytes of a process (summed over a list of them); None if absent or gone."""
    import psutil

    processes = process if isinstance(process, list) else [process]
    try:
        return sum(p.memory_info().rss for p in processes) if processes and None not in processes else None
    except psutil.Error:
        return None


def probe(server) -> dict:
    import httpx

    from tests.server.test_readme_serve import LONG_PROMPT

    body = {"model": server.model, "prompt": LONG_PROMPT, "max_tokens": 32, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    response.raise_for_status()
    data = response.json()
    return {"text": data["choices"][0]["text"], "token_ids": data["choices"][0].get("token_ids"),
            "umim": data["usage"].get("umim")}


def serve_argv(rules: str | None, max_window: int) -> list[str]:
    """README's ``vllm serve`` line with the operating point replaced by ``rules`` and
    ``--umim-max-window`` added; ``rules=None``: without the ``--umim-*`` flags (stock vLLM)."""
    from tests.server.test_readme_serve import readme_serve_command

    argv = readme_serve_command()
    at = argv.index("--umim-rules")
    if rules is None:
        return argv[:at] + argv[at + 2:]
    argv[at + 1] = rules
    return [*argv, "--umim-max-window", str(max_window)]


async def run_load(server, args, prompts) -> dict:
    import httpx

    from tests.server.test_load import kv_usage, requests_in_flight

    load = Load(server, prompts, args.seed, stock=args.stock)
    procs = server_processes(server.process.pid)
    samples, started = [], time.monotonic()
    duration = args.minutes * 60
    limits = httpx.Limits(max_connections=args.clients + 2, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        tasks = [asyncio.create_task(load.client(client)) for _ in range(args.clients)]
        next_report = 0.0
        while (t := time.monotonic() - started) < duration:
            if procs["engine"] is None or not procs["worker"] or not all(p.is_running() for p in [procs["engine"], *procs["worker"]]):
                procs = server_processes(server.process.pid)
            metrics = await asyncio.to_thread(server.metrics)
            sample = {"t": round(t, 1), **{f"{role}_rss": rss(procs[role]) for role in PROCESSES},
                      "load_1m": round(os.getloadavg()[0], 2), "kv_usage": round(kv_usage(metrics), 4),
                      "running": requests_in_flight(metrics),
                      **{name.split(":")[1].removesuffix("_total"): metrics.get(name) for name in UMIM_COUNTERS}}
            samples.append(sample)
            if t >= next_report:
                done = {k: sum(v.values()) for k, v in load.counts.items()}
                memory = " ".join(f"{role}={(sample[f'{role}_rss'] or 0) / 2**20:.1f}" for role in PROCESSES)
                print(f"[soak] t={t / 60:5.1f} min RSS MiB {memory} load={sample['load_1m']} "
                      f"kv={sample['kv_usage']} requests={done}", flush=True)
                next_report = t + 60
            await asyncio.sleep(args.sample_s)
        load.stop = True
        await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S)
        for task in tasks:
            task.cancel()
    load_s = time.monotonic() - started
    deadline, metrics = time.monotonic() + args.drain_s, server.metrics()
    while (kv_usage(metrics) > 0 or requests_in_flight(metrics) > 0) and time.monotonic() < deadline:
        time.sleep(0.5)
        metrics = server.metrics()
    drain_s = args.drain_s - max(0.0, deadline - time.monotonic())
    return {"load": load, "samples": samples, "load_s": load_s, "metrics": metrics,
            "kv_drained": kv_usage(metrics) == 0 and requests_in_flight(metrics) == 0,
            "kv_usage_after": kv_usage(metrics), "requests_in_flight_after": requests_in_flight(metrics),
            "drain_s": round(drain_s, 1), "rss_after_drain": {role: rss(procs[role]) for role in PROCESSES}}


def faults_total(metrics: dict) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("vllm_umim:request_faults_total"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30, help="time under load (default 30)")
    parser.add_argument("--clients", type=int, default=6, help="concurrent clients (default 6)")
    parser.add_argument("--rules", default="artifacts/smollm2-135m/max",
                        help="operating point (default the max point: prompt and decode merging)")
    parser.add_argument("--stock", action="store_true",
                        help="control run: the same load on README's command without the --umim-* flags (stock vLLM); "
                             "malformed requests are then only vLLM's own (negative max_tokens, broken JSON)")
    parser.add_argument("--warmup-minutes", type=float, default=5)
    parser.add_argument("--window-minutes", type=float, default=5, help="length of the two RSS windows compared")
    parser.add_argument("--max-growth", type=float, default=0.02, help="largest RSS growth allowed (default 0.02)")
    parser.add_argument("--sample-s", type=float, default=10)
    parser.add_argument("--drain-s", type=float, default=120, help="how long KV usage may take to return to 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/soak.json")
    args = parser.parse_args(argv)

    from tests.server.conftest import SERVER_ENV
    from vllm_umim.files import write_json_atomic
    from vllm_umim.server.launch import VllmServer

    env = {**SERVER_ENV, **{k: os.environ[k] for k in SERVER_ENV if k in os.environ}}
    argv_serve = serve_argv(None if args.stock else args.rules, MAX_WINDOW)
    model = str(Path(argv_serve[2]).expanduser())
    prompts = prompts_from_corpus(seed=args.seed)
    load_before = [round(x, 2) for x in os.getloadavg()]
    server = VllmServer(model, argv_serve[3:], env=env, start_timeout=900, cwd=str(REPO))
    print(f"[soak] starting: {shlex.join(server.command())} (log {server.log_path})", flush=True)
    server.start()
    try:
        print(f"[soak] server up in {server.startup_s:.0f} s", flush=True)
        probe_before = probe(server)
        result = asyncio.run(run_load(server, args, prompts))
        probe_after = probe(server)
        faults = faults_total(result["metrics"])
    finally:
        server.stop()
    stopped_cleanly = server.process.returncode in (0, -2, 130) if server.process else False
    load = result["load"]
    samples = result["samples"]
    judged = verdict(samples, load.counts, kv_drained=result["kv_drained"],
                     probe_equal=probe_before["token_ids"] == probe_after["token_ids"] and probe_before["text"] == probe_after["text"],
                     faults=faults, warmup_s=args.warmup_minutes * 60, window_s=args.window_minutes * 60,
                     max_growth=args.max_growth)
    loads = [s["load_1m"] for s in samples]
    out = {
        "command": "python -m benchmarks.soak " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "serve_command": " ".join(argv_serve),  # as README writes it (the shell expands its ~)
        "env": env,
        "settings": {"minutes": args.minutes, "clients": args.clients, "rules": None if args.stock else args.rules, "max_window": MAX_WINDOW,
                     "kind_weights": KIND_WEIGHTS, "policies": POLICIES, "sample_s": args.sample_s,
                     "warmup_minutes": args.warmup_minutes, "window_minutes": args.window_minutes,
                     "max_growth": args.max_growth, "seed": args.seed, "prompts": len(prompts),
                     "prompt_source": "held-out Wikipedia openings, 200-1500 characters"},
        "cpu_count": os.cpu_count(),
        "startup_s": round(server.startup_s, 1),
        "load_s": round(result["load_s"], 1),
        "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()],
                         "1m_during": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}},
        "requests": load.counts,
        "requests_total": sum(sum(v.values()) for v in load.counts.values()),
        "malformed_by_case": load.malformed_names,
        "unexpected_examples": load.examples,
        "umim_counters_end": {name: result["metrics"].get(name) for name in UMIM_COUNTERS},
        "umim_request_faults": faults,
        "kv": {"drained": result["kv_drained"], "usage_after": result["kv_usage_after"],
               "requests_in_flight_after": result["requests_in_flight_after"], "drain_s": result["drain_s"]},
        "probe": {"equal": judged["probe_equal"], "before": probe_before, "after": probe_after},
        "server_stopped_cleanly": stopped_cleanly, "server_returncode": server.process.returncode,
        "verdict": judged,
        "samples": thin(samples),
    }
    write_json_atomic(out, args.json)
    print(f"[soak] verdict: {'PASS' if judged['pass'] else 'FAIL'} {judged['failures']}; "
          f"RSS growth {({role: g['growth'] for role, g in judged['rss'].items()})}; "
          f"requests {load.counts}; written to {args.json}", flush=True)
    return 0 if judged["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
