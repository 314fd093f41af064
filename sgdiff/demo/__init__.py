"""The embedded demo models: synthetic data made in code, and checks of what they generate."""
