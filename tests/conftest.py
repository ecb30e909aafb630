import os
import sys

# Test modules import the NumPy reference as `import reference`, whatever
# pytest's import mode (--import-mode=importlib does not add this folder).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
