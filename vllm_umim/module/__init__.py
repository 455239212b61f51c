"""Merge module (paper §3.2, App. B), its safetensors file format, and the batches that feed it.

``merge_module`` · ``file_format`` · ``batches`` (windows, segmentation, App. C masks and index
mapping: what training and evaluation both feed the module).
"""

from vllm_umim.module.file_format import load_module, model_identity, resolve_module, save_module
from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig

__all__ = ["MergeModule", "MergeModuleConfig", "load_module", "model_identity", "resolve_module", "save_module"]
