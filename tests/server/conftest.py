"""A real ``vllm serve --umim-rules`` on 127.0.0.1 (one per session, ~40 s to start). The offline
engines and held-out prompts the server tests compare with are the engine tests' own, from
``tests/conftest.py`` (one of each per session)."""

from __future__ import annotations

import pytest

from tests.conftest import until_last_use
from tests.engine.conftest import ENGINE_ARGS, RULES, module_for_tests

SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}


MAX_WINDOW = 8  # per-request raw windows the test server accepts (--umim-max-window)


def server_args(**umim) -> list[str]:
    """``vllm serve`` flags equal to the offline engines' ENGINE_ARGS, plus the given ``--umim-*``."""
    args = ["--dtype", ENGINE_ARGS["dtype"], "--enforce-eager", "--max-model-len", str(ENGINE_ARGS["max_model_len"])]
    args += ["--seed", str(ENGINE_ARGS["seed"])]
    for key, value in umim.items():
        args += [f"--umim-{key}", str(value)]
    return args


@pytest.fixture(scope="session")
def umim_server(request, model_dir):
    """Stopped after the last test that uses it, before the servers of later tests start."""
    from vllm_umim.server.launch import VllmServer

    server = VllmServer(model_dir, server_args(rules=RULES, module=module_for_tests(), **{"max-window": MAX_WINDOW}), env=SERVER_ENV)
    yield from until_last_use(request, server.start(), server.stop)
