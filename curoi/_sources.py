"""Where the kernel sources live, and what identifies one version of them.

The `.cu` files are the single source of both backends. In a source checkout
and an editable install they sit in ``cuda_src/`` beside the package; a wheel
carries them inside the package as ``curoi/cuda_src/``.
"""

import functools
import hashlib
from pathlib import Path

#: The kernel families: one ``.cu`` file each (``fixed_point`` holds what
#: every family's deterministic backward shares).
FAMILIES = ("roi_pool", "roi_align", "roi_align_max", "ps_roi_pool", "ps_roi_align",
            "roi_align_rotated", "roi_spp", "prroi_pool", "crop_and_resize",
            "multiscale_roi_align", "fixed_point")
#: The families that are not an operator of their own, but kernels that the
#: others' launches share.
SHARED_FAMILIES = ("fixed_point",)

COMMON_HEADER = "curoi_common.cuh"


@functools.lru_cache(maxsize=None)
def kernel_dir() -> Path:
    here = Path(__file__).resolve().parent
    candidates = (here / "cuda_src", here.parent / "cuda_src")
    for candidate in candidates:
        if (candidate / COMMON_HEADER).is_file():
            return candidate
    raise RuntimeError(
        "curoi cannot find its kernel sources; looked in "
        + ", ".join(str(c) for c in candidates)
        + ". The installation is incomplete: reinstall curoi."
    )


def source_path(family: str) -> Path:
    return kernel_dir() / f"{family}.cu"


def read_source(family: str) -> str:
    return source_path(family).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def sources_digest() -> str:
    """A hash of every kernel source file, headers included."""
    digest = hashlib.sha256()
    for path in sorted(kernel_dir().iterdir()):
        if path.suffix in (".cu", ".cuh"):
            digest.update(path.name.encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()
