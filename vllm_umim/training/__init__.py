"""Distillation training of a merge module (paper §3.3, App. C, E.2).

Windows, segmentation and the App. C masks live in ``vllm_umim.module.batches`` (evaluation uses
them too). ``teacher_cache`` (the frozen teacher's top-k logits, computed once) · ``loss``
(sequential computation distillation) · ``teacher_shards`` (one shard, the function the local and the Ray path share) · ``ray_teacher``
(shards on a Ray cluster) · ``trainer`` (AdamW, schedule, early stopping, checkpoints, DDP) ·
``train_run`` (a whole run from a corpus: ``vllm-umim train`` and ``vllm-umim teacher-cache``).
"""
