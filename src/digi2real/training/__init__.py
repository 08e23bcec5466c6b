"""Face-recognition training: backbones (IResNet) and, later, margin heads and the training loop."""
