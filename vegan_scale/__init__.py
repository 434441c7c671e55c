"""vegan_scale: penalized optimal-transport generative models (WAE-MMD, WAE-GAN, AAE, VAE, SWAE) at scale."""

__version__ = "0.1.0"
