"""SurrogateEmbedding: the model's token embedding, extended to virtual ids (paper §3.2, §3.4).

Installed in place of the model's ``embed_tokens`` after loading. Ids below ``virtual_base`` are
embedded as usual; an id ``virtual_base + r`` is the surrogate of rule r: the merge module applied
to the static embeddings of the rule's tokens. All surrogates of a forward pass are computed in
one batched call of the module. A step without virtual ids costs one comparison and ``any``.
"""

from __future__ import annotations

import torch
from torch import nn


class SurrogateEmbedding(nn.Module):
    def __init__(self, embedding: nn.Module, merge_module: nn.Module, rule_table: torch.Tensor, virtual_base: int):
        super().__init__()
        self.embedding = embedding
        self.merge_module = merge_module
        self.register_buffer("rule_table", rule_table.long(), persistent=False)  # [R, 4], -1 padded
        self.virtual_base = virtual_base

    def surrogates(self, rule_ids: torch.Tensor) -> torch.Tensor:
        """[S, d] surrogate embeddings of rules ``rule_ids`` (one merge-module call)."""
        spans = self.rule_table[rule_ids]
        lengths = (spans >= 0).sum(dim=1)
        token_embeds = self.embedding(spans.clamp(min=0))
        dtype = next(self.merge_module.parameters()).dtype
        return self.merge_module(token_embeds.to(dtype), lengths).to(token_embeds.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_virtual = input_ids >= self.virtual_base
        if not bool(is_virtual.any()):
            return self.embedding(input_ids)
        embeds = self.embedding(torch.where(is_virtual, 0, input_ids))
        embeds[is_virtual] = self.surrogates(input_ids[is_virtual] - self.virtual_base)
        return embeds


def install_surrogate_embedding(model: nn.Module, merge_module: nn.Module, rule_table: torch.Tensor, virtual_base: int) -> SurrogateEmbedding:
    """Wrap the decoder's ``embed_tokens`` (tied LM heads keep the original weight object)."""
    decoder = getattr(model, "model", None)
    embedding = getattr(decoder, "embed_tokens", None)
    if embedding is None:
        raise NotImplementedError(
            f"UMIM wraps the decoder's embed_tokens; {type(model).__name__} has no model.embed_tokens"
        )
    weight = embedding.weight
    merge_module = merge_module.to(device=weight.device, dtype=weight.dtype).eval()
    wrapper = SurrogateEmbedding(embedding, merge_module, rule_table.to(weight.device), virtual_base)
    decoder.embed_tokens = wrapper
    return wrapper
