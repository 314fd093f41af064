"""Speed toggles applied to a loaded pipeline from outside the model code (apply.py is the one place)."""
