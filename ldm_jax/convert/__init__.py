"""Checkpoint converters between ldm_jax parameters and public PyTorch formats.

Every converter maps tensors through an explicit key table (`common.Rule`) and
fails with one `UserError` that lists every missing, unused or mis-shaped tensor;
there is no heuristic renaming. Reading safetensors needs no torch; legacy `.pt`
files need torch, imported only when such a file is read.
"""
