"""The ``--umim-*`` flags of ``vllm serve`` (and every CLI built on ``EngineArgs.add_cli_args``).

vLLM's ``EngineArgs.from_cli_args`` copies only its own dataclass fields, so the flags are carried
into ``additional_config["umim"]`` here, where the engine reads all UMIM options (see
``vllm_umim.engine.config``). Files are checked right away, so a bad or mismatched file stops
start-up with one line instead of a traceback from inside engine start-up.
"""

from __future__ import annotations

from vllm_umim.engine.config import CONFIG_KEY, DEFAULT_TABLE_BUDGET_MIB, UmimConfig
from vllm_umim.policies.settings import MODES
from vllm_umim.errors import UmimError

FLAGS = {
    "umim_rules": "rules", "umim_module": "module", "umim_mode": "mode", "umim_window": "window",
    "umim_min_confidence": "min_confidence", "umim_max_window": "max_window", "umim_table_budget_mib": "table_budget_mib",
}


def add_umim_arguments(parser) -> None:
    """Add the "UMIM" argument group (idempotent: parsers may be built more than once)."""
    if any(action.dest == "umim_rules" for action in parser._actions):
        return
    group = parser.add_argument_group("UMIM", "UMIM token merging (vllm_umim); off unless --umim-rules is given")
    group.add_argument("--umim-rules", default=None, help="merge rules file (rules.bin), or an operating-point folder "
                       "(rules.bin, module.safetensors, merge.json: e.g. artifacts/smollm2-135m/balanced); turns UMIM on")
    group.add_argument(
        "--umim-module",
        default=None,
        help="merge module file (default: module.safetensors beside the rules); 'mean' = untrained baseline",
    )
    group.add_argument("--umim-mode", default=None, choices=MODES, help="dynamic (prompt and decode merging, default) or prompt")
    group.add_argument("--umim-window", default=None, type=int,
                       help="raw recent window: the newest W tokens are never merged (default 0)")
    group.add_argument("--umim-min-confidence", default=None, type=float,
                       help="merge a generated span only if each of its tokens was sampled with at least this "
                       "probability (default 0: off)")
    group.add_argument("--umim-max-window", default=None, type=int,
                       help="largest window a request may ask for with vllm_xargs umim_window (default: --umim-window)")
    group.add_argument(
        "--umim-table-budget-mib",
        default=None,
        type=float,
        help=f"memory for the precomputed surrogate table (default {DEFAULT_TABLE_BUDGET_MIB:g}); larger rule sets "
        "run the merge module in every step instead",
    )


def umim_options(args) -> dict | None:
    """The ``--umim-*`` values as ``additional_config["umim"]`` options, or None when UMIM is off."""
    values = {key: getattr(args, flag, None) for flag, key in FLAGS.items()}
    if values["rules"] is None:
        if any(value is not None for value in values.values()):
            raise UmimError("the --umim-* flags need --umim-rules")
        return None
    return {key: value for key, value in values.items() if value is not None}


def apply_umim_options(engine_args, args) -> bool:
    """Carry the flags into ``engine_args.additional_config`` and check the files now; True if
    UMIM is on.

    A ``vllm serve`` user sees one line, ``vllm serve: error: <what is wrong>``, and exit status 1.
    """
    from vllm_umim.engine.assets import validate_umim_files

    try:
        options = umim_options(args)
        if options is None:
            return False
        additional = dict(engine_args.additional_config or {})
        if CONFIG_KEY in additional and additional[CONFIG_KEY] != options:
            raise UmimError(f"UMIM options given twice: --umim-* flags and --additional-config '{CONFIG_KEY}'")
        additional[CONFIG_KEY] = options
        engine_args.additional_config = additional
        validate_umim_files(engine_args, UmimConfig.from_dict(options))
    except UmimError as exc:
        raise SystemExit(f"vllm serve: error: {exc}") from None
    return True
