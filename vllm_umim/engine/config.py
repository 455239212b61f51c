"""UMIM engine options: where they live in vLLM's config, and which vLLM setups are refused.

All options sit in one place, ``additional_config["umim"]`` (so they reach the EngineCore and
every worker and are part of vLLM's config hash)::

    LLM(model, additional_config={"umim": {"rules": "rules.bin"}})
    vllm serve MODEL --umim-rules rules.bin

Keys: ``rules`` (path, required: a rules file, or an operating-point folder with its merge settings,
``vllm_umim.engine.operating_point``), ``module`` (merge module path; default: the module named in or
beside the rules file), ``mode`` ("dynamic": prompt and decode merging, pseudocode 4, the default;
"prompt": prompt-only merging, pseudocode 3), ``window`` (raw recent window W, default 0: the
newest W tokens stay unmerged, ``vllm_umim.policies.raw_window``), ``min_confidence`` (decode
merges only of spans sampled with at least this probability, default 0 = off,
``vllm_umim.policies.confidence_gate``), ``max_window`` (the largest window a request may ask for;
default ``window``, at most ``MAX_WINDOW`` = 128: decode rollbacks reach ``max_span - 1 + max_window``
positions back, and that many of a running request's newest positions stay out of the prefix cache), ``table_budget_mib``
(memory for the precomputed surrogate table, default 1024 MiB; a rule set whose table would be
larger runs the merge module inside every step instead, see ``vllm_umim.engine.embedding``).
``fingerprint`` and ``files`` are set by UMIM itself at start-up: a content hash of rules and
module, so vLLM's compile cache (keyed by the config) never serves a graph compiled for other files,
and the sha256 of each file the API process checked, which the EngineCore and every worker verify
when they load them (``vllm_umim.engine.assets.load_checked_files``).

Per request, ``SamplingParams(extra_args={"umim": VALUE})`` (``vllm_xargs`` on the OpenAI server):
``False`` serves that request unmerged; ``True`` uses the engine's settings; ``"prompt"`` or
``"dynamic"`` picks the mode; a dict ``{"mode": ..., "window": ..., "min_confidence": ...}``
overrides any of them (the OpenAI server's ``vllm_xargs`` takes flat values: there, use
``umim_window`` and ``umim_min_confidence`` beside ``umim``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vllm_umim.engine.operating_point import resolve_operating_point
from vllm_umim.errors import UmimError
from vllm_umim.policies.settings import MAX_WINDOW, MODES, MergeSettings

CONFIG_KEY = "umim"
DEFAULT_MODULE_NAMES = ("module.safetensors", "merge_module.safetensors")
OPTIONS = ("rules", "module", "mode", "window", "min_confidence", "max_window", "table_budget_mib", "fingerprint", "files")
DEFAULT_TABLE_BUDGET_MIB = 1024.0
FLAT_REQUEST_KEYS = {"umim_window": "window", "umim_min_confidence": "min_confidence"}  # vllm_xargs spelling


@dataclass(frozen=True)
class UmimConfig:
    rules: str
    module: str | None = None
    merge: MergeSettings = MergeSettings()
    max_window: int = 0
    table_budget_mib: float = DEFAULT_TABLE_BUDGET_MIB
    files: tuple[tuple[str, str | None], ...] = ()  # (key, sha256) the API process recorded; () before that

    @property
    def mode(self) -> str:
        return self.merge.mode

    @property
    def dynamic(self) -> bool:
        return self.merge.dynamic

    def request_settings(self, choice) -> MergeSettings | None:
        """The settings a request's ``extra_args["umim"]`` value asks for (None: unmerged).

        Raises ``UmimError`` naming the problem for a value that is not one of: a bool, a mode,
        or a dict of merge options (a window above ``max_window`` included).
        """
        if choice is False or (choice == 0 and not isinstance(choice, (str, dict))):  # JSON false may arrive as 0
            return None
        if choice is True or (choice == 1 and not isinstance(choice, (str, dict))):
            return self.merge
        if isinstance(choice, str) and choice in MODES:
            return self.merge.with_options({"mode": choice})
        if not isinstance(choice, dict):
            raise UmimError(f"extra_args['{CONFIG_KEY}'] must be true, false, 'prompt', 'dynamic' or a dict of "
                            f"{', '.join(MergeSettings.FIELDS)}; got {choice!r}")
        try:
            settings = self.merge.with_options(choice)
        except ValueError as e:
            raise UmimError(f"extra_args['{CONFIG_KEY}']: {e}") from None
        if settings.window > self.max_window:
            raise UmimError(f"extra_args['{CONFIG_KEY}']: window {settings.window} is above this engine's max_window "
                            f"{self.max_window} (start it with max_window / --umim-max-window)")
        return settings

    @classmethod
    def from_dict(cls, options: dict) -> "UmimConfig":
        if not isinstance(options, dict):
            raise UmimError(f"additional_config['{CONFIG_KEY}'] must be a dict, got {type(options).__name__}")
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise UmimError(f"unknown UMIM option(s) {sorted(unknown)}; expected {', '.join(OPTIONS)}")
        if not options.get("rules"):
            raise UmimError("UMIM needs a rules file: additional_config={'umim': {'rules': 'rules.bin'}}")
        options = resolve_operating_point(options)
        try:
            merge = MergeSettings().with_options({k: options[k] for k in MergeSettings.FIELDS if k in options})
        except ValueError as e:
            raise UmimError(f"UMIM option: {e}") from None
        max_window = options.get("max_window", merge.window)
        if isinstance(max_window, bool) or not isinstance(max_window, int) or not merge.window <= max_window <= MAX_WINDOW:
            raise UmimError(f"UMIM max_window must be an integer from window ({merge.window}) to {MAX_WINDOW}, got {max_window!r}")
        budget = options.get("table_budget_mib", DEFAULT_TABLE_BUDGET_MIB)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
            raise UmimError(f"UMIM table_budget_mib must be a number >= 0 (MiB), got {budget!r}")
        files = options.get("files") or {}
        if not isinstance(files, dict):
            raise UmimError(f"UMIM files must be a dict of sha256 (set at start-up), got {files!r}")
        return cls(rules=str(options["rules"]), module=options.get("module") or None, merge=merge, max_window=max_window,
                   table_budget_mib=float(budget), files=tuple(sorted(files.items())))

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "UmimConfig | None":
        options = (vllm_config.additional_config or {}).get(CONFIG_KEY)
        return None if options is None else cls.from_dict(options)

    def module_path(self) -> Path | None:
        """The merge module: the configured path, else one beside the rules file, else None."""
        if self.module:
            return Path(self.module)
        for name in DEFAULT_MODULE_NAMES:
            candidate = Path(self.rules).with_name(name)
            if candidate.is_file():
                return candidate
        return None


def files_used(options: dict) -> dict:
    """The exact rules and module files an engine with these UMIM options loads, by sha256, and the
    module's refinement size: what measurements record so a figure stays tied to its files even if
    a file at the same path is replaced later."""
    from vllm_umim.files import file_sha256
    from vllm_umim.module.file_format import MEAN_POOLING, read_metadata

    config = UmimConfig.from_dict(options)
    module = config.module_path()
    used = {"rules_sha256": file_sha256(config.rules), "module_sha256": "mean", "module_refined_rules": 0}
    if module is not None and str(module) != MEAN_POOLING:
        used["module_sha256"] = file_sha256(module)
        used["module_refined_rules"] = read_metadata(module)["config"].get("refined_rules", 0)
    return used


def virtual_base(vllm_config) -> int:
    """The first virtual id: the model's vocabulary size. A merged span of rule r is the id
    ``virtual_base + r`` in the scheduler's sequences and the runner's token rows."""
    return vllm_config.model_config.get_vocab_size()


V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
COMPOSABLE_SPECULATION = ("ngram",)  # vLLM's CPU-side n-gram drafter: see docs/design.md, "With n-gram speculation"
SPECULATION_REFUSAL = (
    "only n-gram speculation, method 'ngram', composes with merging: eagle, eagle3, medusa, mtp, draft_model, "
    "ngram_gpu, suffix and the other drafters keep their own state of the sequence, which a merge rollback "
    "would not reach"
)
KV_CONNECTOR_REFUSAL = (
    "a KV connector (--kv-transfer-config / kv_transfer_config, or --kv-offloading-size): UMIM reports each "
    "request's merge figures in kv_transfer_params, which a connector owns"
)


def prefer_v1_model_runner() -> None:
    """UMIM extends vLLM's V1 model runner. Where the user left the choice to vLLM (its GPU default
    is V2), choose V1; the variable is inherited by the engine and worker processes."""
    os.environ.setdefault(V2_RUNNER_ENV, "0")


def check_vllm_config(vllm_config) -> None:
    """Refuse, with one clear message, vLLM setups where a rollback cannot be honoured."""
    problems = []
    speculative = vllm_config.speculative_config
    method = getattr(speculative, "method", None)
    if speculative is not None and method not in COMPOSABLE_SPECULATION:
        problems.append(f"speculative decoding by {method!r} ({SPECULATION_REFUSAL})")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism (later stages would not see the merged inputs)")
    if vllm_config.scheduler_config.async_scheduling:
        problems.append("async scheduling (a merge decided after sampling would arrive one step late)")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        problems.append(KV_CONNECTOR_REFUSAL)
    if getattr(vllm_config, "use_v2_model_runner", False):
        problems.append(f"Model Runner V2 (UMIM extends the V1 runner): set {V2_RUNNER_ENV}=0")
    model_config = vllm_config.model_config
    if model_config.is_hybrid or getattr(model_config, "is_attention_free", False):
        problems.append("hybrid or recurrent models (their state cannot roll back)")
    if getattr(model_config, "runner_type", "generate") != "generate":
        problems.append(f"runner type {model_config.runner_type!r} (UMIM merges generation)")
    if problems:
        raise UmimError("UMIM cannot run with " + "; ".join(problems))
