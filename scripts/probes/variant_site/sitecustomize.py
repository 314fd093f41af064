"""Probe only (scripts/probes/load_variants.py): patch sgdiff's load configuration in every process of
a run, by SGDIFF_PROBE_VARIANT ("+"-joined names), as each module is imported. Imports nothing heavy."""

import importlib.abc
import importlib.util
import os
import sys

VARIANT = set(filter(None, os.environ.get("SGDIFF_PROBE_VARIANT", "").split("+")))


def warm_up(module):
    """`sgdiff generate` as it was before run FG: the kernels warm up at a default request while loading."""
    load = module.ModelRunner.load

    def load_warming_up(self, skip=frozenset(), warm_up=None, **rest):
        return load(self, skip, warm_up if warm_up is not None else self.default_request(), **rest)

    module.ModelRunner.load = load_warming_up


def lanes_8x32(module):
    module.READERS, module.CHUNK_BYTES = 8, 32 * 2**20


def text_in_request(module):
    """As before encode-ahead: the prompts are encoded in the request, after the load."""
    module.ENCODED_WHILE_LOADING = 0


def switch_1ms(module):
    """The GIL handed between threads every 1 ms instead of 5 (the readers wait less behind Python work)."""
    sys.setswitchinterval(0.001)


PATCHES = {
    "sgdiff.engine.runner": [warm_up] if "warm_up" in VARIANT else [],
    "sgdiff.models.fast_load": [patch for patch in (lanes_8x32, switch_1ms) if patch.__name__ in VARIANT],
    "sgdiff.cli.batch": [text_in_request] if "text_in_request" in VARIANT else [],
}


class PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if not PATCHES.get(name):
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for patch in PATCHES[name]:
                patch(module)

        spec.loader.exec_module = exec_module
        return spec


unknown = VARIANT - {"warm_up", "lanes_8x32", "text_in_request", "switch_1ms"}
if unknown:
    raise SystemExit(f"unknown probe variant(s) {sorted(unknown)}")
sys.meta_path.insert(0, PatchAfterImport())
