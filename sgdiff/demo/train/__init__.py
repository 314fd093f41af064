"""Training of the demo models (scripts/train_demo.py): the VAE first, then the transformer and its
text encoders on the VAE's latents with the flow-matching objective."""
