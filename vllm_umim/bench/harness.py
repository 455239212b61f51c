"""Throughput of vllm_umim next to stock vLLM, like ``vllm bench throughput``, on natural text.

    vllm-umim bench [vLLM engine args] [--scenario prefill-heavy decode-heavy decode-long no-merge]
    python -m vllm_umim.bench ...            (the same)

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
from vllm_umim.bench.workloads import SCENARIOS, kv_block_size, natural_documents, natural_prompts, never_matching_rules, scenario
from vllm_umim.errors import UmimError

SHIPPED_RULES = Path(__file__).resolve().parents[2] / "artifacts" / "smollm2-135m" / "rules.bin"  # in a checkout
DEFAULT_OUTPUT_DIR = Path("bench-results")


def default_rules() -> str:
    """The shipped SmolLM2-135M rules of a checkout (editable install); elsewhere --umim-rules is needed."""
    if not SHIPPED_RULES.is_file():
        raise UmimError(f"no --umim-rules given and no shipped rules at {SHIPPED_RULES} (a repository checkout has them); "
                        "pass --umim-rules RULES_OR_POINT_FOLDER")
    return str(SHIPPED_RULES)


def build_parser():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    load_general_plugins()  # this package's umim_server plugin adds the --umim-* flags, as in vllm serve
    parser = FlexibleArgumentParser(prog="vllm-umim bench", description=__doc__.splitlines()[0])
    EngineArgs.add_cli_args(parser)
    if not any(action.dest == "umim_rules" for action in parser._actions):
        raise UmimError("the --umim-* flags come from the vLLM plugin 'umim_server', which VLLM_PLUGINS leaves out")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--scenario", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    bench.add_argument("--repetitions", type=int, default=3)
    bench.add_argument("--num-prompts", type=int, default=None, help="override every scenario's request count")
    bench.add_argument("--input-len", type=int, default=None, help="override every scenario's prompt length (raw tokens)")
    bench.add_argument("--output-len", type=int, default=None, help="override every scenario's output length")
    bench.add_argument("--kv-blocks", type=int, default=None, help="override the KV-bound scenarios' num_gpu_blocks_override")
    bench.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); vLLM's bench uses 1.0")
    bench.add_argument("--profile", action="store_true", help="also profile one UMIM run per scenario (cProfile, in-process engine)")
    bench.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help=f"where the results go (default {DEFAULT_OUTPUT_DIR}/)")
    # vLLM's own defaults (torch.compile, bf16 on CPU; CUDA graphs on GPU), as users run it:
    # --enforce-eager and --dtype float32 are vLLM's flags for the other setups
    parser.set_defaults(max_model_len=1024, seed=0)
    return parser


def engine_kwargs_of(args) -> dict:
    """The EngineArgs fields the command line changed from their defaults (what both engines get)."""
    from vllm.engine.arg_utils import EngineArgs

    engine_args = EngineArgs.from_cli_args(args)
    default = EngineArgs(model=engine_args.model)
    changed = {}
    for field in dataclasses.fields(EngineArgs):
        value = getattr(engine_args, field.name)
        if value != getattr(default, field.name):
            json.dumps(value)  # must travel to the worker as JSON
            changed[field.name] = value
    changed["model"] = engine_args.model
    return changed


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


def run_scenario(spec, prompts_path, stock_kwargs, umim_kwargs, args, work_dir: Path) -> dict:
    """Both engines up; ``repetitions`` rounds, alternating which goes first."""
    command = dict(prompts=str(prompts_path), output_len=spec.output_len, temperature=args.temperature)
    engines = {"stock": EngineProcess(f"{spec.name}-stock", stock_kwargs, work_dir),
               "umim": EngineProcess(f"{spec.name}-umim", umim_kwargs, work_dir)}
    runs = {"stock": [], "umim": []}
    startup_s = {}
    try:
        for label, engine in engines.items():
            startup_s[label] = engine.receive()["startup_s"]  # ready (the two start side by side)
        for label, engine in engines.items():  # warm-up: one short run each, not measured
            engine.run(**{**command, "output_len": min(4, spec.output_len)})
        for repetition in range(args.repetitions):
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
    if args.profile:
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


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    from vllm_umim.engine.config import UmimConfig
    from vllm_umim.engine.operating_point import resolve_operating_point

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is None or args.model == "Qwen/Qwen3-0.6B":
        from vllm_umim.data.model import fetch_model

        args.model = str(fetch_model("smollm2-135m"))
    if args.umim_rules is None:
        args.umim_rules = default_rules()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    engine_kwargs = engine_kwargs_of(args)
    umim = engine_kwargs["additional_config"]["umim"] = resolve_operating_point(engine_kwargs["additional_config"]["umim"])
    if UmimConfig.from_dict(umim).module_path() is None:
        umim["module"] = "mean"  # no trained module yet: the untrained baseline (reported as such)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="umim-bench-"))
    print(f"engine logs and prompts in {work_dir}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(engine_kwargs.get("tokenizer") or engine_kwargs["model"])
    documents = natural_documents()

    results = []
    for name in args.scenario:
        overrides = dict(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len)
        if SCENARIOS[name].kv_blocks is not None:  # --kv-blocks applies to the KV-capped scenarios
            overrides["kv_blocks"] = args.kv_blocks
        spec = scenario(name, **overrides)
        print(f"{spec.name}: {spec.num_prompts} prompts x {spec.input_len} tokens in, {spec.output_len} out; {spec.about}", flush=True)
        prompts_path, stock_kwargs, umim_kwargs = prepare_scenario(spec, engine_kwargs, tokenizer, documents, work_dir)
        results.append(summarize(run_scenario(spec, prompts_path, stock_kwargs, umim_kwargs, args, work_dir)))
        report = {  # rewritten after every scenario, so a long run that is stopped keeps what it measured
            "command": " ".join(["vllm-umim bench", *(argv if argv is not None else sys.argv[1:])]),
            "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "load_average_start": load_at_start,
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "cpu_count": os.cpu_count(),
            "engine_kwargs": engine_kwargs,
            "umim": engine_kwargs["additional_config"]["umim"],
            "module_eval": module_eval(engine_kwargs["additional_config"]["umim"]),
            "scenarios": results,
        }
        paths = write_outputs(report, args.output_dir)
    print(open(paths["markdown"]).read())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return report


if __name__ == "__main__":
    main()
