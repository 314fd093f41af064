"""`sgdiff bench`: sgdiff against diffusers on the same random weights, same inputs, same GPU."""
