"""The ``--umim-*`` flags: parsed by vLLM's own parser, carried into additional_config, files checked."""

import pytest

from tests.engine.conftest import RULES
from vllm_umim.server.patches import apply_patches


def parse(*argv):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    apply_patches()
    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", "some-model", *argv])


def test_flags_are_in_a_umim_group():
    args = parse("--umim-rules", "r.bin", "--umim-module", "mean", "--umim-mode", "prompt")
    assert (args.umim_rules, args.umim_module, args.umim_mode) == ("r.bin", "mean", "prompt")
    with pytest.raises(SystemExit):
        parse("--umim-mode", "always")


def test_no_flags_leave_engine_args_alone():
    from vllm.engine.arg_utils import AsyncEngineArgs

    engine_args = AsyncEngineArgs.from_cli_args(parse())
    assert "umim" not in (engine_args.additional_config or {})


def test_flags_reach_additional_config(model_dir):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    apply_patches()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", model_dir, "--umim-rules", str(RULES), "--umim-module", "mean"])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config["umim"] == {"rules": str(RULES), "module": "mean"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--umim-rules", "/nonexistent/rules.bin"], "vllm serve: error: rules file /nonexistent/rules.bin does not exist"),
        (["--umim-module", "mean"], "vllm serve: error: the --umim-* flags need --umim-rules"),
    ],
)
def test_bad_flags_stop_with_one_line(argv, message):
    from vllm.engine.arg_utils import AsyncEngineArgs

    with pytest.raises(SystemExit) as excinfo:
        AsyncEngineArgs.from_cli_args(parse(*argv))
    assert str(excinfo.value) == message


def test_corrupt_rules_stop_with_one_line(tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    bad = tmp_path / "rules.bin"
    bad.write_bytes(RULES.read_bytes()[:-10])
    with pytest.raises(SystemExit, match=r"^vllm serve: error: .*truncated"):
        AsyncEngineArgs.from_cli_args(parse("--umim-rules", str(bad)))


def test_rules_alone_find_the_module_beside_them_or_say_what_is_missing(model_dir, tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    apply_patches()
    rules = tmp_path / "rules.bin"  # a folder without module.safetensors
    rules.write_bytes(RULES.read_bytes())
    args = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", model_dir, "--umim-rules", str(rules)])
    with pytest.raises(SystemExit, match=r"^vllm serve: error: no merge module: pass one \(--umim-module"):
        AsyncEngineArgs.from_cli_args(args)
