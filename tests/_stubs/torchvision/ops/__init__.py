"""TEST-ONLY torchvision.ops stand-in (see tests/_stubs/torchvision/__init__.py)."""
