"""Evaluating a merge module (paper §4, App. C, F).

``alignment`` (Top-1, Top-k, Top-p overlap, MRR) · ``perplexity`` (pseudocode 5 two-stage PPL) ·
``qa`` (App. F.2 multiple choice) · ``token_reduction`` (TR) · ``suite`` (one pass over held-out
windows for several modules) · ``eval_run`` (``vllm-umim eval``) · ``fidelity``, ``fidelity_prompts``,
``fidelity_run`` (``vllm-umim fidelity``: greedy continuations through the vLLM engine, merged vs
unmerged, beside stock bf16 vs fp32) · ``rule_harm`` (``vllm-umim score-rules``) · ``harness``,
``paired``, ``lm_eval_tasks`` (``vllm-umim lm-eval``: task accuracy with lm-evaluation-harness through
the engine, paired against stock) · ``ceiling`` (``vllm-umim ceiling``: what one frozen input position
can carry) · ``generate`` (``vllm-umim generate``).
"""
