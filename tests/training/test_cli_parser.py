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
