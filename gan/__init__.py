"""GAN models, data, losses, metrics and the training loop. Runs without Ray."""
