"""README's serving command, exactly as written there (vLLM's defaults: bf16, torch.compile, no
``--enforce-eager``), starts and merges."""

import shlex
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import SERVER_ENV
from vllm_umim.engine.config import UmimConfig

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COMMAND_START = "vllm serve ~/.cache/vllm_umim/models/smollm2-135m --umim-rules "
# longer than the balanced point's 16-token raw window, so some of it merges
LONG_PROMPT = ("The history of the United States of America began with the arrival of the first people in the "
               "Americas thousands of years ago. In the early 17th century, European settlers founded colonies "
               "along the Atlantic coast, and the United States of America began")


def readme_serve_command() -> list[str]:
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines() if line.strip().startswith(COMMAND_START)]
    assert lines, f"README has no line starting with {COMMAND_START!r}"
    return shlex.split(lines[0].split("#")[0])


def test_readme_serve_command_starts_in_vllm_defaults_and_merges(model_dir):
    from vllm_umim.server.launch import VllmServer

    argv = readme_serve_command()
    assert argv[:2] == ["vllm", "serve"] and "--enforce-eager" not in argv and "--dtype" not in argv
    model = str(Path(argv[2]).expanduser())
    assert Path(model).resolve() == Path(model_dir).resolve()
    with VllmServer(model, argv[3:], env=SERVER_ENV, start_timeout=900, cwd=str(ROOT)) as server:
        body = {"model": model, "prompt": LONG_PROMPT, "max_tokens": 32,
                "temperature": 0, "ignore_eos": True}
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        print(f"\nREADME's vllm serve started in {server.startup_s:.0f} s; usage {usage}")
        log = server.log_path.read_text(errors="replace")
    settings = UmimConfig.from_dict({"rules": str(ROOT / argv[argv.index("--umim-rules") + 1])}).merge
    assert usage["umim"]["prefill_merges"] > 0
    assert (usage["umim"]["decode_merges"] > 0) == settings.dynamic  # the operating point's own mode
    assert "bfloat16" in log and "enforce_eager=False" in log  # really vLLM's defaults
