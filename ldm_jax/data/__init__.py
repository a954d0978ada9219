"""Data: sources (built-in MNIST, image folders, TFDS) and the Grain pipeline."""
