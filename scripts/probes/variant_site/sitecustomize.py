"""Probe only (scripts/probes/load_variants.py): patch sgdiff's load configuration in every process of
a run, by SGDIFF_PROBE_VARIANT ("+"-joined names), as each module is imported. Imports nothing heavy."""

import importlib.abc
import importlib.util
import os
import sys

VARIANT = set(filter(None, os.environ.get("SGDIFF_PROBE_VARIANT", "").split("+")))


def no_warm_up(module):
    module.warms_up = lambda device, speed: False


def lanes_8x32(module):
    module.READERS, module.CHUNK_BYTES = 8, 32 * 2**20


PATCHES = {
    "sgdiff.engine.runner": [no_warm_up] if "no_warm_up" in VARIANT else [],
    "sgdiff.models.fast_load": [lanes_8x32] if "lanes_8x32" in VARIANT else [],
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


unknown = VARIANT - {"no_warm_up", "lanes_8x32"}
if unknown:
    raise SystemExit(f"unknown probe variant(s) {sorted(unknown)}")
sys.meta_path.insert(0, PatchAfterImport())
