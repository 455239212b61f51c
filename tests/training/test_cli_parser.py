from vllm_umim.cli.main import build_parser


def test_train_and_eval_subcommands_parse():
    p = build_parser()
    a = p.parse_args(["train", "--model", "m", "--rules", "r", "--corpus", "c", "-o", "o.safetensors", "--max-tokens", "10", "--resume"])
    assert a.command == "train" and a.max_tokens == 10 and a.resume and a.lr == 8e-4 and a.weight_decay == 1e-3
    a = p.parse_args(["eval", "--model", "m", "--rules", "r", "--module", "x.safetensors", "--corpus", "c", "--qa", "--limit", "5"])
    assert a.command == "eval" and a.qa and a.limit == 5 and a.module == ["x.safetensors"]


def test_teacher_ray_flags_parse():
    from vllm_umim.training.cli import teacher_ray_options

    p = build_parser()
    a = p.parse_args(["train", "--model", "m", "--rules", "r", "--corpus", "c", "-o", "o.safetensors"])
    assert teacher_ray_options(a) == {"ray_workers": 0, "ray_address": None, "ray_threads": 1}
    a = p.parse_args(["train", "--model", "m", "--rules", "r", "--corpus", "c", "-o", "o.safetensors",
                      "--teacher-workers", "8", "--ray-address", "10.0.0.1:6379", "--teacher-threads", "2"])
    assert teacher_ray_options(a) == {"ray_workers": 8, "ray_address": "10.0.0.1:6379", "ray_threads": 2}


def test_refinement_and_precision_flags():
    import pytest

    from vllm_umim.training.cli import starting_module

    p = build_parser()
    a = p.parse_args(["train", "--model", "m", "--rules", "r", "--corpus", "c", "-o", "o.safetensors"])
    assert (a.init_module, a.refine_rules, a.precision) == (None, 0, "fp32")
    assert starting_module(a, None, None, None) is None  # a new module: mean pooling at step 0
    a = p.parse_args(["train", "--model", "m", "--rules", "r", "--corpus", "c", "-o", "o.safetensors",
                      "--refine-rules", "64", "--precision", "bf16"])
    assert a.refine_rules == 64 and a.precision == "bf16"
    with pytest.raises(SystemExit, match="--init-module"):
        starting_module(a, None, None, None)
