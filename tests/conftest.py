import os
import sys

# Test modules import the NumPy reference as `import reference`, whatever
# pytest's import mode (--import-mode=importlib does not add this folder).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def seed_cache(folder):
    """Copy this process's CPU library (built once for the session) into
    ``folder``, a fresh cache for a subprocess: for tests about what is done
    with a cached library rather than about building one. A subprocess with
    the same compiler and flags looks the library up under the same name.
    Returns the copy's path."""
    import shutil
    from pathlib import Path

    from curoi import _cpu

    _cpu.library()
    built = Path(_cpu.library_path())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built, folder / built.name)
    return folder / built.name
