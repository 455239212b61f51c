"""examples/openai_client.py against the session's ``vllm serve --umim-rules`` (smoke size)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import MAX_WINDOW

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "openai_client.py"


def test_openai_client_example(umim_server):
    done = subprocess.run([sys.executable, str(EXAMPLE), "--base-url", umim_server.url + "/v1", "--max-tokens", "8",
                           "--window", str(MAX_WINDOW)], capture_output=True, text=True, timeout=300, env=os.environ)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "opted out: usage.umim: None" in done.stdout
    assert done.stdout.count("'tokens_merged_away'") == 3  # completion, windowed, streamed chat
