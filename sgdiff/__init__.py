"""sgdiff: fast image and video generation with diffusion transformers.

from sgdiff import Engine
engine = Engine.from_pretrained("black-forest-labs/FLUX.1-schnell")
engine("a red cube").images[0].save("cube.png")
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`sgdiff.Engine` imports torch only when asked for (`sgdiff --help` stays fast)."""
    if name == "Engine":
        from sgdiff.engine.service import Engine

        return Engine
    raise AttributeError(f"module 'sgdiff' has no attribute {name!r}")


__all__ = ["Engine", "__version__"]
