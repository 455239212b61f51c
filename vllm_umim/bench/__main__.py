"""``python -m vllm_umim.bench``: the same as ``vllm-umim bench``."""

from vllm_umim.bench.harness import main

main()
