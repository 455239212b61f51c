"""Chaos check of the training pipeline's files: SIGKILL ``vllm-umim mine``, ``teacher-cache`` and
``train`` at random moments, look at every file each kill leaves, then rerun (``train --resume``)
until the command finishes, and compare the result with an uninterrupted run.

After each kill every artifact present is loaded the way the tools load it (rules file, teacher
cache, resume checkpoint, module snapshots, final module). Each load either succeeds with exactly
the content the uninterrupted run wrote for that file (or for that checkpoint step), or is refused
with a ``UmimError``; anything else (a load that succeeds with other content, or any other
exception) counts as a corrupt load. The finished results must equal the uninterrupted run's: the
rules file byte for byte; the teacher cache's JSON byte for byte and its safetensors bit for bit in
every tensor and equal in metadata (the file bytes themselves differ between processes: safetensors
orders the header's metadata by a hash map); the trained module, the resume checkpoint, the
snapshots and ``log.jsonl`` tensor for tensor and record for record, leaving out wall-clock fields
(``train_seconds``, ``elapsed``, ``tok_per_s``) and the ``{"resumed": ...}`` records a resume adds.

Everything runs on a tiny random Llama with SmolLM2's tokenizer (one torch thread per process),
so a command takes a few seconds, most of it start-up::

    python -m benchmarks.chaos_provenance --seeds 6 --json benchmarks/results/chaos-provenance.json

``tests/training/test_chaos.py`` runs a small instance (one seed per command) in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WALL_CLOCK = ("train_seconds", "elapsed", "tok_per_s")
SEQ_LEN, K, VAL_WINDOWS = 16, 8, 8
CACHE_TOKENS = 256 * SEQ_LEN * 2 + 40 * SEQ_LEN  # three shards of 256 windows, the last one short
TRAIN_ARGS = ["--max-tokens", str(SEQ_LEN * 4 * 24), "--batch-size", "4", "--lr", "5e-3", "--eval-every", "3",
              "--checkpoint-every", "2", "--patience", "0"]


@dataclass
class Counts:
    kills: dict = field(default_factory=dict)  # command -> SIGKILLs that landed before it finished
    finished_early: int = 0  # runs that finished before their kill time (no kill)
    loads: int = 0  # artifact loads attempted after kills
    refused: int = 0  # ... refused with a UmimError (an incomplete file)
    loaded_equal: int = 0  # ... loaded with exactly the uninterrupted run's content
    corrupt: list = field(default_factory=list)  # ... anything else: must stay empty
    # sightings of .*.tmp files a kill left beside the artifacts, summed over the checks (a file left once is
    # seen again by each later check of its folder); no loader reads them, nothing removes them
    leftover_temp_files: int = 0
    results_equal: dict = field(default_factory=dict)  # command -> [bool per seed]

    @property
    def total_kills(self) -> int:
        return sum(self.kills.values())


@dataclass
class Setup:
    root: Path
    model: Path
    corpus: Path
    env: dict

    def cli(self, *args) -> list[str]:
        return [sys.executable, "-m", "vllm_umim.cli.main", *map(str, args)]


def make_setup(root: Path, model_dir: str | Path, corpus_lines: int = 400) -> Setup:
    """A tiny random Llama (hidden 32, 2 layers) with ``model_dir``'s tokenizer, and a corpus of the
    first ``corpus_lines`` documents of the wiki training text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_umim.data.corpus import fetch_corpus

    root.mkdir(parents=True, exist_ok=True)
    model = root / "tiny-model"
    if not (model / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
        LlamaForCausalLM(config).save_pretrained(model)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(model_dir) / name, model / name)
    corpus = root / "corpus.txt"
    if not corpus.exists():
        source = Path(fetch_corpus("wiki")) / "train.txt"
        with open(source, encoding="utf-8") as f:
            corpus.write_text("".join(line for _, line in zip(range(corpus_lines), f)), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return Setup(root, model, corpus, env)


# ---- commands ------------------------------------------------------------------------------------
def mine_cmd(s: Setup, out: Path) -> list[str]:
    return s.cli("mine", "--model", s.model, "--corpus", s.corpus, "--threshold", 20, "-o", out)


def cache_cmd(s: Setup, rules: Path, cache: Path) -> list[str]:
    return s.cli("teacher-cache", "--model", s.model, "--rules", rules, "--corpus", s.corpus, "--cache-dir", cache,
                 "--max-tokens", CACHE_TOKENS, "--seq-len", SEQ_LEN, "--k", K, "--val-windows", VAL_WINDOWS,
                 "--threads", 1, "--no-progress")


def train_cmd(s: Setup, rules: Path, cache: Path, run: Path) -> list[str]:
    return s.cli("train", "--model", s.model, "--rules", rules, "--corpus", s.corpus, "--cache-dir", cache,
                 "--run-dir", run, "-o", run / "module.safetensors", "--cache-tokens", CACHE_TOKENS, "--seq-len", SEQ_LEN,
                 "--k", K, "--val-windows", VAL_WINDOWS, "--threads", 1, "--no-progress", "--resume", *TRAIN_ARGS)


def run_to_end(s: Setup, cmd: list[str], timeout: float = 600) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=s.env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:5])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def run_killed(s: Setup, cmd: list[str], delay: float) -> float | None:
    """Start ``cmd`` and SIGKILL it after ``delay`` s. None if the kill landed (it was still
    running), else the seconds it took to finish."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=s.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:5])} failed ({proc.returncode}) before its kill:\n{proc.stderr.read()[-3000:]}")
    return time.perf_counter() - started


# ---- loading what a kill left --------------------------------------------------------------------
def _load(counts: Counts, what: str, load, expected=None, same=None) -> None:
    """Load one artifact: refused with a UmimError, or loaded equal to ``expected`` (``same``
    compares); anything else is recorded as corrupt."""
    from vllm_umim.errors import UmimError

    counts.loads += 1
    try:
        value = load()
    except UmimError:
        counts.refused += 1
        return
    except Exception as error:  # noqa: BLE001 - any other failure to load is what this check hunts
        counts.corrupt.append(f"{what}: {type(error).__name__}: {error}")
        return
    if expected is not None and not (same or (lambda a, b: a == b))(value, expected):
        counts.corrupt.append(f"{what}: loaded, but differs from the uninterrupted run's")
        return
    counts.loaded_equal += 1


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _temp_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob(".*.tmp")) if folder.exists() else 0


def check_rules(counts: Counts, path: Path, reference: Path) -> None:
    from vllm_umim.rules import load_rules

    if path.exists():
        ref = load_rules(reference)
        _load(counts, str(path), lambda: load_rules(path), ref,
              lambda a, b: a.fingerprint == b.fingerprint and path.read_bytes() == reference.read_bytes())
    counts.leftover_temp_files += _temp_files(path.parent)


def check_cache(counts: Counts, cache: Path, reference: Path) -> None:
    """Each file of the cache, and the cache as ``TeacherCache`` reads it."""
    from vllm_umim.training.teacher_cache import SHARD_TENSORS, TeacherCache, read_manifest, read_tensors

    for part in ("train", "val"):
        folder, ref = cache / part, reference / part
        if not folder.exists():
            continue
        if (folder / "manifest.json").exists():
            _load(counts, f"{folder}/manifest.json", lambda: read_manifest(folder / "manifest.json"),
                  read_manifest(ref / "manifest.json"))
        if (folder / "windows.safetensors").exists():
            _load(counts, f"{folder}/windows.safetensors", lambda: read_tensors(folder / "windows.safetensors", ("windows",)),
                  read_tensors(ref / "windows.safetensors", ("windows",)), _tensors_equal)
        for shard in sorted(folder.glob("shard-*.safetensors")):
            _load(counts, str(shard), lambda: read_tensors(shard, SHARD_TENSORS), read_tensors(ref / shard.name, SHARD_TENSORS),
                  _tensors_equal)
        if (folder / "manifest.json").exists():
            reference_cache = TeacherCache(ref)
            _load(counts, f"TeacherCache({folder})", lambda: TeacherCache(folder), None)
            try:  # what it holds is a prefix of the finished cache
                got = TeacherCache(folder)
                n = len(got)
                rows = int(got.row_offsets[-1])
                if not (torch.equal(got.windows, reference_cache.windows[:n]) and torch.equal(
                        got.topk_logits, reference_cache.topk_logits[:rows]) and torch.equal(got.lse, reference_cache.lse[:rows])):
                    counts.corrupt.append(f"TeacherCache({folder}): holds other targets than the uninterrupted cache")
            except Exception:  # noqa: BLE001 - refused above already
                pass
        counts.leftover_temp_files += _temp_files(folder)


def check_run(counts: Counts, run: Path, reference: Path) -> None:
    """The resume checkpoint (its module equals the uninterrupted run's snapshot of the same step),
    every module snapshot, best.safetensors and the final module."""
    from vllm_umim.module.file_format import load_module
    from vllm_umim.training.checkpoint import read_checkpoint

    if not run.exists():
        return
    ckpt = run / "ckpt-last.safetensors"
    if ckpt.exists():
        def load_ckpt():
            tensors, meta = read_checkpoint(ckpt)
            step = meta["trainer"]["step"]
            return {k.removeprefix("module/"): v for k, v in tensors.items() if k.startswith("module/")}, step

        def same_step(loaded, _):
            state, step = loaded
            return _tensors_equal(state, load_module(reference / f"module-step{step}.safetensors")[0].state_dict())

        _load(counts, str(ckpt), load_ckpt, True, same_step)
    for snapshot in sorted(run.glob("module-step*.safetensors")):
        _load(counts, str(snapshot), lambda: load_module(snapshot)[0].state_dict(),
              load_module(reference / snapshot.name)[0].state_dict(), _tensors_equal)
    for name in ("best.safetensors", "module.safetensors"):
        if (run / name).exists():
            expected = load_module(reference / name)[0].state_dict() if name == "module.safetensors" else None
            _load(counts, str(run / name), lambda: load_module(run / name)[0].state_dict(), expected, _tensors_equal)
    counts.leftover_temp_files += _temp_files(run)


# ---- comparing finished results ------------------------------------------------------------------
def _without_wall_clock(meta: dict) -> dict:
    return {k: (_without_wall_clock(v) if isinstance(v, dict) else v) for k, v in meta.items() if k not in WALL_CLOCK}


def _log(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [_without_wall_clock(r) for r in records if not r.get("resumed")]


def same_safetensors(a: Path, b: Path) -> bool:
    """Bit-equal tensors and equal metadata. (Not the file bytes: safetensors keeps the metadata in a
    hash map, so its order in the header changes from one process to the next.)"""
    from safetensors import safe_open

    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        return fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys()) and all(
            torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def same_cache(cache: Path, reference: Path) -> bool:
    """Same files; JSON byte for byte, safetensors by :func:`same_safetensors`."""
    names = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file() and not p.name.startswith("."))
    got = sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file() and not p.name.startswith("."))
    return names == got and all(
        same_safetensors(cache / n, reference / n) if n.suffix == ".safetensors"
        else (cache / n).read_bytes() == (reference / n).read_bytes() for n in names)


def same_run(run: Path, reference: Path) -> list[str]:
    """What differs between a finished (resumed) run folder and the uninterrupted one (empty: nothing)."""
    from vllm_umim.module.file_format import load_module
    from vllm_umim.training.checkpoint import read_checkpoint

    problems = []
    names = sorted(p.name for p in reference.glob("*.safetensors"))
    if sorted(p.name for p in run.glob("*.safetensors")) != names:
        problems.append(f"files differ: {sorted(p.name for p in run.glob('*.safetensors'))} vs {names}")
    for name in names:
        if not (run / name).exists():
            continue
        if name == "ckpt-last.safetensors":
            (a, ma), (b, mb) = read_checkpoint(run / name), read_checkpoint(reference / name)
            if not _tensors_equal(a, b) or _without_wall_clock(ma["trainer"]) != _without_wall_clock(mb["trainer"]):
                problems.append(name)
            continue
        (a, ma), (b, mb) = load_module(run / name), load_module(reference / name)
        if not _tensors_equal(a.state_dict(), b.state_dict()):
            problems.append(f"{name}: tensors")
        if _without_wall_clock(ma.get("training", {})) != _without_wall_clock(mb.get("training", {})) and name != "best.safetensors":
            problems.append(f"{name}: metadata")
    if _log(run / "log.jsonl") != _log(reference / "log.jsonl"):
        problems.append("log.jsonl")
    return problems


# ---- the chaos loops -----------------------------------------------------------------------------
def chaos(s: Setup, seeds: list[int], kills_per_seed: int = 3, commands=("mine", "teacher-cache", "train"),
          log=print) -> Counts:
    """Reference runs, then per command and seed: ``kills_per_seed`` kills in a row, each at a
    random moment in [0.1, 0.95] x the command's last measured uninterrupted duration and followed
    by the file checks; then one run to the end and the comparison with the reference. A run that
    finishes before its kill time updates that duration and the seed starts over from an empty
    folder (at most ``3 * kills_per_seed`` tries per seed)."""
    counts = Counts()
    ref = s.root / "reference"
    if ref.exists():
        shutil.rmtree(ref)
    ref.mkdir()
    rules = ref / "rules.bin"
    duration = {"mine": run_to_end(s, mine_cmd(s, rules))}
    duration["teacher-cache"] = run_to_end(s, cache_cmd(s, rules, ref / "cache"))
    shutil.copytree(ref / "cache", ref / "train-cache")
    duration["train"] = run_to_end(s, train_cmd(s, rules, ref / "train-cache", ref / "run"))
    log(f"reference runs (s): {json.dumps({k: round(v, 1) for k, v in duration.items()})}")
    for command in commands:
        counts.kills[command] = 0
        counts.results_equal[command] = []
        for seed in seeds:
            rng = random.Random(f"{command}-{seed}")
            work = s.root / f"{command}-{seed}"
            if command == "mine":
                cmd, check = mine_cmd(s, work / "rules.bin"), lambda: check_rules(counts, work / "rules.bin", rules)
            elif command == "teacher-cache":
                cmd, check = cache_cmd(s, rules, work / "cache"), lambda: check_cache(counts, work / "cache", ref / "cache")
            else:
                cmd = train_cmd(s, rules, work / "cache", work / "run")

                def check():
                    check_cache(counts, work / "cache", ref / "cache")
                    check_run(counts, work / "run", ref / "run")

            def fresh():
                if work.exists():
                    shutil.rmtree(work)
                work.mkdir()
                if command == "train":
                    shutil.copytree(ref / "cache", work / "cache")

            fresh()
            landed = 0
            for _ in range(3 * kills_per_seed):
                if landed == kills_per_seed:
                    break
                finished = run_killed(s, cmd, rng.uniform(0.1, 0.95) * duration[command])
                if finished is None:
                    landed += 1
                    counts.kills[command] += 1
                    check()
                else:
                    counts.finished_early += 1
                    duration[command] = finished
                    fresh()
                    landed = 0
            run_to_end(s, cmd)
            check()
            if command == "mine":
                equal = (work / "rules.bin").read_bytes() == rules.read_bytes()
            elif command == "teacher-cache":
                equal = same_cache(work / "cache", ref / "cache")
            else:
                problems = same_run(work / "run", ref / "run")
                equal = not problems and same_cache(work / "cache", ref / "cache")
                if problems:
                    log(f"  {command} seed {seed}: differs in {problems}")
            counts.results_equal[command].append(equal)
            log(f"{command} seed {seed}: {landed} kills in a row before the final run; totals: kills {counts.total_kills}, "
                f"loads {counts.loads}, refused {counts.refused}, corrupt {len(counts.corrupt)}, equal {equal}")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/umim-chaos"), help="work folder (rebuilt)")
    parser.add_argument("--seeds", type=int, default=6, help="seeds per command")
    parser.add_argument("--kills-per-seed", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the counts here")
    args = parser.parse_args(argv)
    from vllm_umim.data.model import fetch_model

    torch.set_num_threads(1)
    counts = chaos(make_setup(args.root, fetch_model("smollm2-135m")), list(range(args.seeds)), args.kills_per_seed)
    summary = {**asdict(counts), "total_kills": counts.total_kills,
               "all_results_equal": all(all(v) for v in counts.results_equal.values())}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if not counts.corrupt and summary["all_results_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
