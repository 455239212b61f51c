"""Operating points: a folder that names one point on the TR–fidelity frontier (issue 10).

A folder holds ``rules.bin``, the merge module beside it (``module.safetensors``) and, optionally,
``merge.json``: the merge settings the point was measured with, e.g. ``{"mode": "prompt",
"window": 16}`` (keys: ``mode``, ``window``, ``min_confidence``, ``max_window``; see
``vllm_umim.policies.settings``). Pass the folder where a rules file goes::

    vllm serve MODEL --umim-rules artifacts/smollm2-135m/faithful
    LLM(model, additional_config={"umim": {"rules": "artifacts/smollm2-135m/faithful"}})

The folder's settings are defaults: options given explicitly (``--umim-window 0``) win. The engine
resolves the folder once, when vLLM builds its config, so every process downstream sees a plain
options dict.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_umim.errors import UmimError
from vllm_umim.policies.settings import MAX_WINDOW, MergeSettings

RULES_NAME = "rules.bin"
SETTINGS_NAME = "merge.json"
SETTINGS_KEYS = (*MergeSettings.FIELDS, "max_window")


def read_point_settings(path: str | Path) -> dict:
    """The merge settings of ``merge.json``, checked; raises one ``UmimError`` naming the file."""
    path = Path(path)
    try:
        settings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UmimError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(settings, dict):
        raise UmimError(f"{path}: must hold a JSON object of {', '.join(SETTINGS_KEYS)}")
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    if unknown:
        raise UmimError(f"{path}: unknown key(s) {unknown}; expected {', '.join(SETTINGS_KEYS)}")
    try:
        MergeSettings().with_options({k: v for k, v in settings.items() if k in MergeSettings.FIELDS})
    except ValueError as e:
        raise UmimError(f"{path}: {e}") from None
    max_window = settings.get("max_window", 0)
    if isinstance(max_window, bool) or not isinstance(max_window, int) or not 0 <= max_window <= MAX_WINDOW:
        raise UmimError(f"{path}: max_window must be an integer from 0 to {MAX_WINDOW}, got {max_window!r}")
    return settings


def resolve_operating_point(options: dict) -> dict:
    """``options`` with a folder in ``rules`` replaced by its rules file, and the folder's merge
    settings under the options given explicitly. Options naming a rules file come back unchanged."""
    folder = Path(str(options.get("rules") or ""))
    if not options.get("rules") or not folder.is_dir():
        return options
    rules = folder / RULES_NAME
    if not rules.is_file():
        raise UmimError(f"{folder}: an operating-point folder needs {RULES_NAME} (and module.safetensors beside it)")
    settings = read_point_settings(folder / SETTINGS_NAME) if (folder / SETTINGS_NAME).is_file() else {}
    return {**settings, **options, "rules": str(rules)}
