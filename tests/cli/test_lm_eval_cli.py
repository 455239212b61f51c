"""``vllm-umim lm-eval`` argument handling."""

import pytest

from vllm_umim.cli import lm_eval as cli
from vllm_umim.cli.main import build_parser
from vllm_umim.errors import UmimError

POINT = "artifacts/smollm2-135m/balanced"


def _parse(argv):
    return build_parser().parse_args(["lm-eval", "--model", "m", "--output-dir", "out", *argv])


def test_systems_tasks_and_limits():
    args = _parse(["--point", POINT, "--umim", 'w8={"rules": "r.bin", "mode": "prompt", "window": 8}', "--tasks", "arc_easy,gsm8k",
                   "--limit", "200", "--task-limit", "gsm8k=100"])
    assert args.func is cli.run
    config = cli.build_config(args)
    assert [s.name for s in config.systems] == ["stock-fp32", "stock-bf16", "balanced", "w8"]
    assert [s.dtype for s in config.systems] == ["float32", "bfloat16", "float32", "float32"]
    assert config.systems[2].umim == {"rules": POINT} and config.systems[3].umim["window"] == 8
    assert config.tasks == ("arc_easy", "gsm8k") and config.task_limit("arc_easy") == 200 and config.task_limit("gsm8k") == 100
    assert config.enforce_eager and [s.name for s in cli.build_config(_parse(["--no-bf16"])).systems] == ["stock-fp32"]
    assert config.engine_args == {} and config.kl_top_k == 0
    config = cli.build_config(_parse(["--gpu-memory-utilization", "0.3", "--kl-top-k", "20"]))
    assert config.engine_args == {"gpu_memory_utilization": 0.3} and config.kl_top_k == 20


def test_a_system_on_another_model_keeps_its_name_and_pairs_against_stock(tmp_path):
    from vllm_umim.evaluation import harness

    reader = str(tmp_path)
    config = cli.build_config(_parse(["--no-bf16", "--point", POINT, "--system-model", f"balanced={reader}",
                                      "--system-model", f"reader-raw={reader}"]))
    assert [(s.name, s.model, s.umim) for s in config.systems] == [
        ("stock-fp32", None, None), ("balanced", reader, {"rules": POINT}), ("reader-raw", reader, None)]
    # item files of systems on the run's model keep the spec they had before the field existed
    assert "model" not in harness._spec(config, config.systems[0], "arc_easy")["system"]
    assert harness._spec(config, config.systems[1], "arc_easy")["system"]["model"] == reader


@pytest.mark.parametrize("argv, message", [
    (["--point", "no/such/folder"], "no such folder"),
    (["--system-model", "x=no/such/model"], "no such model folder"),
    (["--umim", "w8"], "NAME=VALUE"),
    (["--umim", "w8={rules"], "not JSON"),
    (["--umim", 'w8={"window": 8}'], "needs a JSON object"),
    (["--task-limit", "gsm8k=many"], "TASK=INTEGER"),
])
def test_bad_arguments_are_one_clear_error(argv, message):
    with pytest.raises(UmimError, match=message):
        cli.build_config(_parse(argv))
