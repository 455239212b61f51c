"""SurrogateEmbedding: the model's token embedding, extended to virtual ids (paper §3.2, §3.4).

Installed in place of the model's ``embed_tokens`` after loading. Ids below ``virtual_base`` are
embedded as usual; an id ``virtual_base + r`` is the surrogate of rule r: the merge module applied
to the static embeddings of the rule's tokens.

The wrapper runs inside the model's compiled region (vLLM's defaults: torch.compile on CPU, CUDA
graphs on GPU), so its forward has no host sync, no data-dependent branch and no data-dependent
shape: every position gets both a plain embedding and a surrogate, and ``torch.where`` picks one.
Where the surrogate comes from is one of two sources:

* ``SurrogateTable`` (default): a surrogate depends only on its rule (§3.2: the module sees static
  embeddings, never context), so every rule's surrogate is computed once at load, in fp32, into a
  ``[R, d]`` table in the model's dtype; a step costs one gather. Memory: R x d x dtype bytes
  (SmolLM2-135M, 48k rules: 55 MB in bf16), bounded by ``table_budget_mib``.
* ``SurrogateOnTheFly`` (rule sets whose table would exceed the budget): the merge module runs on
  the rule tokens of every position of the step (plain positions compute a surrogate that is thrown
  away); about 3d² x 4 multiply-adds per position, a few % of a decoder layer stack.

The merge module lives in the space of the decoder's *input* embeddings: what HF's
``get_input_embeddings()`` returns and ``inputs_embeds`` takes, where training and the reference
runtime work. Some models scale ``embed_tokens``' output before the first layer (Gemma: by
sqrt(hidden_size); vLLM applies that ``normalizer`` in ``embed_input_ids`` *after* the module
wrapped here, HF inside its embedding module). :func:`input_scale` measures that factor s once at
load, and the wrapper works in ``embed_tokens``' space: the module sees ``s * e(x)`` and a
surrogate is stored as ``module(...) / s``, so after the model's own scaling it is exactly what
training and the reference fed the decoder. For Llama-shaped models s = 1 and nothing changes.
"""

from __future__ import annotations

import torch
from torch import nn

TABLE_CHUNK = 4096  # rules per merge-module call while building the table


def rule_token_embeddings(embedding: nn.Module, rule_table: torch.Tensor, rule_ids: torch.Tensor, scale: float = 1.0):
    """[S, 4, d] static input embeddings (``embedding`` times ``scale``) of the rules' tokens (pad
    rows embed token 0), [S] lengths and [S, 4] the tokens themselves (-1 padded)."""
    spans = rule_table[rule_ids]
    embeds = embedding(spans.clamp(min=0))
    return (embeds * scale if scale != 1.0 else embeds), (spans >= 0).sum(dim=1), spans


def input_scale(model: nn.Module, embedding: nn.Module) -> float:
    """The factor between ``embedding``'s output and the decoder's input (``embed_input_ids``):
    1 for Llama, sqrt(hidden_size) for Gemma. Raises NotImplementedError if the model does more
    to its token embeddings than multiply them by a constant."""
    embed_input_ids = getattr(model, "embed_input_ids", None)
    if embed_input_ids is None:
        return 1.0
    probe = torch.arange(min(256, embedding.weight.shape[0]), device=embedding.weight.device)
    with torch.inference_mode():
        plain = embedding(probe).float()
        scaled = embed_input_ids(probe).float()
    if torch.equal(plain, scaled):
        return 1.0
    scale = float((scaled * plain).sum() / (plain * plain).sum())
    tolerance = 1e-2 * scaled.abs().max().item()  # bf16 rounding of the scaled product
    if not (scale > 0 and (scaled - plain * scale).abs().max().item() <= tolerance):
        raise NotImplementedError(
            f"UMIM wraps embed_tokens; {type(model).__name__}.embed_input_ids is not embed_tokens times a constant"
        )
    return scale


class SurrogateTable(nn.Module):
    """Every rule's surrogate, computed once (fp32 module, result in ``dtype``)."""

    def __init__(self, embedding: nn.Module, merge_module: nn.Module, rule_table: torch.Tensor, dtype: torch.dtype,
                 scale: float = 1.0):
        super().__init__()
        module_dtype = next(merge_module.parameters()).dtype
        rows = []
        with torch.inference_mode():
            for start in range(0, len(rule_table), TABLE_CHUNK):
                rule_ids = torch.arange(start, min(start + TABLE_CHUNK, len(rule_table)), device=rule_table.device)
                embeds, lengths, tokens = rule_token_embeddings(embedding, rule_table, rule_ids, scale)
                surrogates = merge_module(embeds.to(module_dtype), lengths, tokens)
                rows.append((surrogates / scale if scale != 1.0 else surrogates).to(dtype))
        table = torch.cat(rows) if rows else torch.zeros(0, embedding.weight.shape[-1], dtype=dtype)
        self.register_buffer("table", table.clone(), persistent=False)

    @staticmethod
    def nbytes(num_rules: int, hidden_size: int, dtype: torch.dtype) -> int:
        return num_rules * hidden_size * torch.empty(0, dtype=dtype).element_size()

    def forward(self, embedding: nn.Module, rule_ids: torch.Tensor) -> torch.Tensor:
        return self.table[rule_ids]


class SurrogateOnTheFly(nn.Module):
    """The merge module applied to the rule tokens of every position of the step. A refined
    module's per-rule entries are looked up once at load (``refine_index`` [R]), not per step."""

    def __init__(self, merge_module: nn.Module, rule_table: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.merge_module = merge_module
        self.scale = scale  # fixed at load: the branches below are not data-dependent
        self.register_buffer("rule_table", rule_table.long(), persistent=False)  # [R, 4], -1 padded
        self.refinement = merge_module.refinement
        if self.refinement is not None:
            self.register_buffer("refine_index", self.refinement.lookup(self.rule_table), persistent=False)

    def forward(self, embedding: nn.Module, rule_ids: torch.Tensor) -> torch.Tensor:
        embeds, lengths, _ = rule_token_embeddings(embedding, self.rule_table, rule_ids, self.scale)
        module_dtype = next(self.merge_module.parameters()).dtype
        surrogates = self.merge_module.pool(embeds.to(module_dtype), lengths)
        if self.refinement is not None:
            surrogates = self.refinement(surrogates, self.refine_index[rule_ids])
        return surrogates / self.scale if self.scale != 1.0 else surrogates


class SurrogateEmbedding(nn.Module):
    """Plain ids → the model's embedding; ``virtual_base + r`` → surrogate of rule r."""

    def __init__(self, embedding: nn.Module, surrogates: nn.Module, virtual_base: int, num_rules: int):
        super().__init__()
        self.embedding = embedding
        self.surrogates = surrogates
        self.virtual_base = virtual_base
        self.num_rules = num_rules

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_virtual = input_ids >= self.virtual_base
        plain = self.embedding(input_ids.masked_fill(is_virtual, 0))
        if self.num_rules == 0:  # fixed at load: not a data-dependent branch
            return plain
        rule_ids = (input_ids - self.virtual_base).clamp(0, self.num_rules - 1)
        surrogate = self.surrogates(self.embedding, rule_ids).to(plain.dtype)
        return torch.where(is_virtual.unsqueeze(-1), surrogate, plain)


def build_surrogates(embedding: nn.Module, merge_module: nn.Module, rule_table: torch.Tensor, table_budget_mib: float,
                     scale: float = 1.0):
    """The surrogate source for these rules: a precomputed table within the budget, else on the fly.
    ``scale``: see :func:`input_scale` (surrogates are returned in ``embedding``'s space)."""
    weight = embedding.weight
    merge_module = merge_module.to(device=weight.device, dtype=torch.float32).eval()
    rule_table = rule_table.to(weight.device).long()
    if SurrogateTable.nbytes(len(rule_table), weight.shape[-1], weight.dtype) <= table_budget_mib * 2**20:
        return SurrogateTable(embedding, merge_module, rule_table, weight.dtype, scale)
    return SurrogateOnTheFly(merge_module, rule_table, scale)


def install_surrogate_embedding(
    model: nn.Module, merge_module: nn.Module, rule_table: torch.Tensor, virtual_base: int, table_budget_mib: float
) -> SurrogateEmbedding:
    """Wrap the decoder's ``embed_tokens`` (tied LM heads keep the original weight object); a
    model that scales its token embeddings (Gemma) gets surrogates pre-divided by that scale."""
    decoder = getattr(model, "model", None)
    embedding = getattr(decoder, "embed_tokens", None)
    if embedding is None:
        raise NotImplementedError(
            f"UMIM wraps the decoder's embed_tokens; {type(model).__name__} has no model.embed_tokens"
        )
    scale = input_scale(model, embedding)
    surrogates = build_surrogates(embedding, merge_module, rule_table, table_budget_mib, scale)
    wrapper = SurrogateEmbedding(embedding, surrogates, virtual_base, len(rule_table))
    wrapper.input_scale = scale
    decoder.embed_tokens = wrapper
    return wrapper
