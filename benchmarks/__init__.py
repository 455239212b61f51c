"""The repository's benchmarks and the generator of ``docs/results.md`` (run from the checkout root
as ``python -m benchmarks.<name>``; see ``benchmarks/README.md``). The throughput harness itself is
installed with the package: ``vllm_umim.bench`` (``vllm-umim bench``)."""
