"""Operating-point folders (vllm_umim.engine.operating_point): a folder in place of a rules file
brings its rules, module and merge settings; explicit options win; a bad folder is one clear error."""

from __future__ import annotations

import json
import shutil

import pytest
from vllm.engine.arg_utils import EngineArgs

from tests.engine.conftest import ARTIFACTS, RULES
from vllm_umim.engine.config import UmimConfig
from vllm_umim.engine.operating_point import resolve_operating_point
from vllm_umim.engine.patches import apply_patches
from vllm_umim.errors import UmimError

SHIPPED = {  # folder: the merge settings it was measured with (README "Operating points")
    "faithful": {"mode": "prompt", "window": 48},
    "balanced": {"mode": "prompt", "window": 16},
    "max": {"mode": "dynamic"},
}


def point(tmp_path, settings=None, text=None):
    folder = tmp_path / "point"
    folder.mkdir()
    shutil.copy(RULES, folder / "rules.bin")
    if settings is not None:
        (folder / "merge.json").write_text(json.dumps(settings))
    if text is not None:
        (folder / "merge.json").write_text(text)
    return folder


def test_folder_gives_its_rules_module_and_settings(tmp_path):
    folder = point(tmp_path, {"mode": "prompt", "window": 8, "max_window": 12})
    shutil.copy(ARTIFACTS / "module.safetensors", folder / "module.safetensors")
    config = UmimConfig.from_dict({"rules": str(folder)})
    assert config.rules == str(folder / "rules.bin")
    assert config.module_path() == folder / "module.safetensors"
    assert (config.mode, config.merge.window, config.max_window) == ("prompt", 8, 12)


def test_explicit_options_win_over_the_folder(tmp_path):
    folder = point(tmp_path, {"mode": "prompt", "window": 8})
    config = UmimConfig.from_dict({"rules": str(folder), "mode": "dynamic", "window": 0, "module": "mean"})
    assert (config.mode, config.merge.window, config.max_window, config.module) == ("dynamic", 0, 0, "mean")


def test_folder_without_settings_uses_the_engine_defaults(tmp_path):
    config = UmimConfig.from_dict({"rules": str(point(tmp_path))})
    assert (config.mode, config.merge.window) == ("dynamic", 0)


def test_a_rules_file_is_left_alone():
    options = {"rules": str(RULES), "mode": "prompt"}
    assert resolve_operating_point(options) is options


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not a readable JSON file"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"mode": "prompt", "windw": 4}', r"unknown key\(s\) \['windw'\]"),
        ('{"mode": "fast"}', "mode must be one of"),
        ('{"window": -1}', "window must be an integer from 0 to 128"),
        ('{"window": 100000}', "window must be an integer from 0 to 128, got 100000"),
        ('{"max_window": 129}', "max_window must be an integer from 0 to 128, got 129"),
        ('{"max_window": "8"}', "max_window must be an integer from 0 to 128"),
        ('{"min_confidence": 2}', r"min_confidence must be a number in \[0, 1\]"),
    ],
)
def test_bad_settings_file_is_one_error_naming_it(tmp_path, text, message):
    folder = point(tmp_path, text=text)
    with pytest.raises(UmimError, match=message) as error:
        UmimConfig.from_dict({"rules": str(folder)})
    assert str(folder / "merge.json") in str(error.value)


def test_folder_without_rules_is_one_error(tmp_path):
    with pytest.raises(UmimError, match="operating-point folder needs rules.bin"):
        UmimConfig.from_dict({"rules": str(tmp_path)})


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_points_load_in_an_engine_config(model_dir, name):
    """Each shipped folder passes vLLM's config step (rules and module checked against the model)
    and spells out its settings in additional_config, which every engine process then reads."""
    apply_patches()
    folder = ARTIFACTS / name
    config = EngineArgs(model=model_dir, dtype="float32", enforce_eager=True,
                        additional_config={"umim": {"rules": str(folder)}}).create_engine_config()
    options = config.additional_config["umim"]
    assert options["rules"] == str(folder / "rules.bin")
    assert {k: options[k] for k in SHIPPED[name]} == SHIPPED[name]
    assert UmimConfig.from_dict(options).module_path() == folder / "module.safetensors"
