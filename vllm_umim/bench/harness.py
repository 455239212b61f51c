"""Throughput of vllm_umim next to stock vLLM, like ``vllm bench throughput``, on natural text.

    vllm-umim bench [vLLM engine args] [--scenario prefill-heavy decode-heavy decode-long no-merge]

(the command line is ``vllm_umim.cli.bench``; this module takes a :class:`BenchConfig` and the
engine arguments as a dict).

The engine arguments are vLLM's own (``EngineArgs.add_cli_args``, ``--umim-*`` included); both
engines get the same ones, the stock one without ``--umim-*``. Each engine runs in its own process
(``vllm_umim.bench.worker``); both stay up for a scenario and serve it alternately, the first
engine swapping every repetition (stock-umim, umim-stock, ...), so drifting machine load hits both
alike. Requests: ``ignore_eos``, fixed output length, all added at once, as in ``vllm bench
throughput``. Throughput counts raw tokens delivered (prompt + output as the user sent and got
them), never merged positions.

Writes ``<output-dir>/throughput.json``, ``throughput.png`` (throughput ratio and KV saved vs token
reduction) and ``throughput.md`` (the table).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_umim.bench.summary import profile_summary, summarize, write_outputs
from vllm_umim.bench.workloads import DEFAULT_SCENARIOS, SCENARIOS, kv_block_size, natural_documents, natural_prompts, never_matching_rules, scenario
from vllm_umim.errors import UmimError

SHIPPED_RULES = Path(__file__).resolve().parents[2] / "artifacts" / "smollm2-135m" / "rules.bin"  # in a checkout
DEFAULT_OUTPUT_DIR = Path("bench-results")


def default_rules() -> str:
    """The shipped SmolLM2-135M rules of a checkout (editable install); elsewhere --umim-rules is needed."""
    if not SHIPPED_RULES.is_file():
        raise UmimError(f"no --umim-rules given and no shipped rules at {SHIPPED_RULES} (a repository checkout has them); "
                        "pass --umim-rules RULES_OR_POINT_FOLDER")
    return str(SHIPPED_RULES)


@dataclasses.dataclass
class BenchConfig:
    """What to run beside the engine arguments (each field is a ``vllm-umim bench`` flag)."""

    scenario: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_SCENARIOS),
                                            metadata={"help": "scenarios to run", "nargs": "+", "choices": list(SCENARIOS)})
    repetitions: int = dataclasses.field(default=3, metadata={"help": "alternating repetitions per scenario"})
    num_prompts: int | None = dataclasses.field(default=None, metadata={"help": "override every scenario's request count"})
    input_len: int | None = dataclasses.field(default=None, metadata={"help": "override every scenario's prompt length (raw tokens)"})
    output_len: int | None = dataclasses.field(default=None, metadata={"help": "override every scenario's output length"})
    kv_blocks: int | None = dataclasses.field(default=None, metadata={"help": "override the KV-bound scenarios' num_gpu_blocks_override"})
    temperature: float = dataclasses.field(default=0.0, metadata={"help": "0: greedy; vLLM's bench uses 1.0"})
    profile: bool = dataclasses.field(default=False, metadata={"help": "also profile one UMIM run per scenario (cProfile, in-process engine)"})
    output_dir: Path = dataclasses.field(default=DEFAULT_OUTPUT_DIR, metadata={"help": "where the results go"})
    rows: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "compare these engines with stock instead (vllm_umim.bench.rows): stock or an operating point "
                "(faithful, balanced, max, umim = --umim-rules, or a path), each optionally +fp8 and/or +ngram",
        "nargs": "+", "metavar": "ROW"})
    split: bool = dataclasses.field(default=True, metadata={"help": "with --rows: time a prefill-only run after each run"})
    kv_space_gib: int = dataclasses.field(default=1, metadata={"help": "with --rows: VLLM_CPU_KVCACHE_SPACE of each engine"})


class EngineProcess:
    """``vllm_umim.bench.worker`` for one engine: start it, send runs, read their measurements."""

    def __init__(self, label: str, engine_kwargs: dict, log_dir: Path, env: dict | None = None):
        self.label = label
        read_fd, write_fd = os.pipe()
        self.log = open(log_dir / f"{label}.log", "ab")
        spec = json.dumps({"label": label, "engine_kwargs": engine_kwargs})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm_umim.bench.worker", spec, str(write_fd)],
            stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
            env={**os.environ, **(env or {})}, text=True,
        )
        os.close(write_fd)
        self.results = os.fdopen(read_fd)
        self.log_path = log_dir / f"{label}.log"

    def receive(self) -> dict:
        line = self.results.readline()
        if not line:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"{self.label} engine exited (log {self.log_path}):\n{tail}")
        return json.loads(line)

    def run(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"quit": True}) + "\n")
                self.process.stdin.close()
                self.process.wait(60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()


def prepare_scenario(spec, engine_kwargs: dict, tokenizer, documents, work_dir: Path):
    """Prompts file and the two engines' arguments for one scenario."""
    from vllm_umim.engine.assets import load_engine_rules
    from vllm_umim.rules import save_rules

    prompts = natural_prompts(tokenizer, documents, spec.num_prompts, spec.input_len)
    prompts_path = work_dir / f"{spec.name}.prompts.json"
    prompts_path.write_text(json.dumps(prompts))
    umim = dict(engine_kwargs["additional_config"]["umim"])
    stock_kwargs = dict(engine_kwargs)
    stock_kwargs["additional_config"] = {k: v for k, v in engine_kwargs["additional_config"].items() if k != "umim"}
    if spec.never_matching_rules:
        from vllm_umim.engine.config import UmimConfig

        module = UmimConfig.from_dict(umim).module_path()  # the real rules' module, wherever the fake rules go
        umim.setdefault("module", str(module) if module else "mean")
        rules_path = work_dir / "never-matching-rules.bin"
        save_rules(never_matching_rules(load_engine_rules(umim["rules"]), tokenizer, prompts), rules_path)
        umim["rules"] = str(rules_path)
    umim_kwargs = {**engine_kwargs, "additional_config": {**engine_kwargs["additional_config"], "umim": umim}}
    if spec.kv_blocks is not None:  # KV-bound: exactly kv_blocks blocks; one request must still fit
        max_model_len, block_size = spec.input_len + spec.output_len, kv_block_size()
        if spec.kv_blocks * block_size < max_model_len:
            raise UmimError(f"--kv-blocks {spec.kv_blocks} x {block_size} tokens cannot hold one request of {max_model_len} tokens")
        for kwargs in (stock_kwargs, umim_kwargs):
            kwargs.update(num_gpu_blocks_override=spec.kv_blocks, block_size=block_size, max_model_len=max_model_len)
    return prompts_path, stock_kwargs, umim_kwargs


def run_scenario(spec, prompts_path, stock_kwargs, umim_kwargs, config: BenchConfig, work_dir: Path) -> dict:
    """Both engines up; ``repetitions`` rounds, alternating which goes first."""
    command = dict(prompts=str(prompts_path), output_len=spec.output_len, temperature=config.temperature)
    engines = {"stock": EngineProcess(f"{spec.name}-stock", stock_kwargs, work_dir),
               "umim": EngineProcess(f"{spec.name}-umim", umim_kwargs, work_dir)}
    runs = {"stock": [], "umim": []}
    startup_s = {}
    try:
        for label, engine in engines.items():
            startup_s[label] = engine.receive()["startup_s"]  # ready (the two start side by side)
        for label, engine in engines.items():  # warm-up: one short run each, not measured
            engine.run(**{**command, "output_len": min(4, spec.output_len)})
        for repetition in range(config.repetitions):
            order = ("stock", "umim") if repetition % 2 == 0 else ("umim", "stock")
            for label in order:
                result = engines[label].run(**command)
                result.update(repetition=repetition, position=order.index(label))
                runs[label].append(result)
                print(f"  {spec.name} rep {repetition} {label:5s}: {result['tokens_per_s']:8.1f} tok/s "
                      f"{result['requests_per_s']:6.2f} req/s, peak KV {result['peak_kv_blocks']} blocks, "
                      f"{result['preemptions']} preemptions", flush=True)
    finally:
        for engine in engines.values():
            engine.close()
    profile = None
    if config.profile:
        profile = profile_scenario(spec, command, umim_kwargs, work_dir)
    return {"scenario": dataclasses.asdict(spec), "runs": runs, "startup_s": startup_s, "profile": profile}


def profile_scenario(spec, command, umim_kwargs, work_dir: Path) -> dict:
    """One UMIM run with scheduler, runner and model in one process, under cProfile."""
    engine = EngineProcess(f"{spec.name}-umim-profile", umim_kwargs, work_dir, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    try:
        engine.receive()
        engine.run(**{**command, "output_len": min(4, spec.output_len)})
        path = work_dir / f"{spec.name}-umim.prof"
        engine.run(**command, profile=str(path))
    finally:
        engine.close()
    return profile_summary(path)


def module_eval(umim_options: dict) -> dict | None:
    """Alignment metrics of the module in use, from ``eval.json`` beside it (or the rules)."""
    from vllm_umim.engine.config import UmimConfig

    module = UmimConfig.from_dict(umim_options).module_path()
    folder = (module if module and module.is_file() else Path(umim_options["rules"])).parent
    path = folder / "eval.json"
    return {"path": str(path), **json.loads(path.read_text())} if path.is_file() else None


def run(engine_kwargs: dict, config: BenchConfig, command: str) -> dict:
    """Every scenario of ``config``: stock vLLM and UMIM with ``engine_kwargs`` (the EngineArgs fields
    the user set, ``additional_config["umim"]`` included); writes and returns the report."""
    from transformers import AutoTokenizer

    from vllm_umim.engine.config import UmimConfig
    from vllm_umim.engine.operating_point import resolve_operating_point

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    umim = engine_kwargs["additional_config"]["umim"] = resolve_operating_point(engine_kwargs["additional_config"]["umim"])
    if UmimConfig.from_dict(umim).module_path() is None:
        umim["module"] = "mean"  # no trained module yet: the untrained baseline (reported as such)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="umim-bench-"))
    print(f"engine logs and prompts in {work_dir}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(engine_kwargs.get("tokenizer") or engine_kwargs["model"])
    documents = natural_documents()

    results = []
    for name in config.scenario:
        overrides = dict(num_prompts=config.num_prompts, input_len=config.input_len, output_len=config.output_len)
        if SCENARIOS[name].kv_blocks is not None:  # --kv-blocks applies to the KV-capped scenarios
            overrides["kv_blocks"] = config.kv_blocks
        spec = scenario(name, **overrides)
        print(f"{spec.name}: {spec.num_prompts} prompts x {spec.input_len} tokens in, {spec.output_len} out; {spec.about}", flush=True)
        prompts_path, stock_kwargs, umim_kwargs = prepare_scenario(spec, engine_kwargs, tokenizer, documents, work_dir)
        results.append(summarize(run_scenario(spec, prompts_path, stock_kwargs, umim_kwargs, config, work_dir)))
        report = {  # rewritten after every scenario, so a long run that is stopped keeps what it measured
            "command": command,
            "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "load_average_start": load_at_start,
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "cpu_count": os.cpu_count(),
            "engine_kwargs": engine_kwargs,
            "umim": engine_kwargs["additional_config"]["umim"],
            "module_eval": module_eval(engine_kwargs["additional_config"]["umim"]),
            "scenarios": results,
        }
        paths = write_outputs(report, config.output_dir)
    print(open(paths["markdown"]).read())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return report

