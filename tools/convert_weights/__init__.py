"""Import the released Kangaroo PyTorch checkpoint into our NNX state (and export it back)."""
