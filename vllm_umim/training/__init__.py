"""Distillation training of a merge module (paper §3.3, App. C, E.2).

Windows, segmentation and the App. C masks live in ``vllm_umim.module.batches`` (evaluation uses
them too). ``teacher_cache`` (the frozen
teacher's top-k logits, computed once) · ``loss`` (sequential computation distillation) ·
``trainer`` (AdamW, schedule, early stopping, checkpoints, DDP) · ``cli`` (``vllm-umim train``).
"""
