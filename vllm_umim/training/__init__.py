"""Distillation training of a merge module (paper §3.3, App. C, E.2).

``batches`` (windows, segmentation, App. C masks and index mapping) · ``teacher_cache`` (the frozen
teacher's top-k logits, computed once) · ``loss`` (sequential computation distillation) ·
``trainer`` (AdamW, schedule, early stopping, checkpoints, DDP) · ``cli`` (``vllm-umim train``).
"""
