"""TEST-ONLY stand-in for torchvision (not the real package).

timm imports a handful of torchvision symbols at import time, and torchvision cannot be
installed in this environment. `tests/test_eva_parity.py` puts `tests/_stubs` on sys.path
(inside that module only) so `import timm` succeeds. Nothing here is functional beyond
what timm touches while building an `Eva` model; do not use it anywhere else.
"""

__version__ = "0.0.0+kangaroo-test-stub"
