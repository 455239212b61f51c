"""Merge module (paper §3.2, App. B) and its safetensors file format."""

from vllm_umim.module.file_format import load_module, model_identity, resolve_module, save_module
from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig

__all__ = ["MergeModule", "MergeModuleConfig", "load_module", "model_identity", "resolve_module", "save_module"]
