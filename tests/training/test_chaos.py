"""SIGKILL ``vllm-umim mine``, ``teacher-cache`` and ``train`` at random moments: no kill leaves a
file that loads with content other than the uninterrupted run's, and the rerun (``train --resume``)
ends with the uninterrupted run's results (``benchmarks/chaos_provenance.py``; its command-line run
does many more kills)."""

from __future__ import annotations

import pytest

from benchmarks.chaos_provenance import chaos, make_setup


@pytest.mark.slow  # about ten CLI processes, each loading SmolLM2's tokenizer
def test_killed_runs_never_load_a_broken_file_and_resume_to_the_same_result(tmp_path, model_dir):
    counts = chaos(make_setup(tmp_path, model_dir), seeds=[0], kills_per_seed=1, log=lambda line: None)
    assert counts.corrupt == []
    assert counts.total_kills >= 2
    assert counts.loads > counts.total_kills  # every kill left files that were checked
    assert counts.results_equal == {"mine": [True], "teacher-cache": [True], "train": [True]}
