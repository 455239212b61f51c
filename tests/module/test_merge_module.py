import pytest
import torch

from vllm_umim.errors import MismatchError, ModuleFileError
from vllm_umim.module import MergeModule, MergeModuleConfig, load_module, save_module
from vllm_umim.module.file_format import resolve_module

MODEL = {"architecture": "LlamaForCausalLM", "hidden_size": 32, "vocab_size": 64, "num_hidden_layers": 2, "name": "tiny"}


def test_paper_parameter_count():
    assert MergeModule(MergeModuleConfig(64, num_heads=4)).num_parameters() == 64 + 3 * 64 * 64


def test_untrained_module_is_mean_pooling():
    module = MergeModule(MergeModuleConfig(32))
    spans = torch.randn(3, 4, 32)
    out = module(spans, torch.tensor([2, 3, 4]))
    for i, n in enumerate([2, 3, 4]):
        torch.testing.assert_close(out[i], spans[i, :n].mean(0))


@pytest.mark.parametrize("variant", ["paper", "token_processor"])
def test_padding_rows_are_ignored(variant):
    torch.manual_seed(0)
    module = MergeModule(MergeModuleConfig(32, num_heads=4, variant=variant))
    for p in module.parameters():
        p.data.normal_(0, 0.2)
    spans = torch.randn(2, 4, 32)
    lengths = torch.tensor([2, 3])
    noisy = spans.clone()
    noisy[0, 2:] = 100.0
    noisy[1, 3:] = -50.0
    torch.testing.assert_close(module(spans, lengths), module(noisy, lengths))
    torch.testing.assert_close(module(spans, lengths)[1], module(spans[1:, :3], lengths[1:])[0])


def test_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        MergeModuleConfig(30, num_heads=4)
    with pytest.raises(ValueError, match="variant"):
        MergeModuleConfig(32, variant="nope")


def test_file_round_trip_and_checks(tmp_path):
    module = MergeModule(MergeModuleConfig(32))
    module.query.data.normal_()
    path = tmp_path / "m.safetensors"
    save_module(module, path, MODEL, "tok123", "rules456", training={"tokens": 10})
    loaded, meta = load_module(path, model=MODEL, tokenizer_fingerprint="tok123")
    torch.testing.assert_close(loaded.query, module.query)
    assert meta["rules_fingerprint"] == "rules456" and meta["training"] == {"tokens": 10}
    with pytest.raises(MismatchError, match="hidden_size=32"):
        load_module(path, model={**MODEL, "hidden_size": 64, "name": "big"})
    with pytest.raises(MismatchError, match="tokenizer tok123"):
        load_module(path, tokenizer_fingerprint="other")


def test_damaged_module_files(tmp_path):
    path = tmp_path / "m.safetensors"
    save_module(MergeModule(MergeModuleConfig(32)), path, MODEL, "t", "r")
    (tmp_path / "trunc.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModuleFileError, match="not a readable safetensors"):
        load_module(tmp_path / "trunc.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ModuleFileError, match="not a UMIM merge module"):
        load_module(tmp_path / "plain.safetensors")
    with pytest.raises(ModuleFileError, match="does not exist"):
        load_module(tmp_path / "missing.safetensors")
    with pytest.raises(ModuleFileError, match="no merge module"):
        resolve_module(None, 32)


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m.safetensors"
    save_module(MergeModule(MergeModuleConfig(32)), path, MODEL, "t", "r")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    del state["query"]
    save_file(state, str(tmp_path / "partial.safetensors"), metadata=meta)
    with pytest.raises(ModuleFileError, match="missing tensors \\['query'\\]"):
        load_module(tmp_path / "partial.safetensors")
