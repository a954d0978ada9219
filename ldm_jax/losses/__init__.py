"""Losses of the autoencoder stage (LDM's "L1 + LPIPS + PatchGAN"): the LPIPS
perceptual distance (`lpips`) and the PatchGAN discriminator with its GAN losses
(`gan`)."""
