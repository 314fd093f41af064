"""The built-in model families, one package each; importing a package registers its family
(sgdiff/pipeline/registry.py imports them all)."""
