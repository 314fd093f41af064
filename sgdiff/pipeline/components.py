"""Load the library-provided parts of a diffusers checkpoint (safetensors only)."""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sgdiff.errors import UserError
from sgdiff.models.fast_load import LoadingStopped, shared_reader
from sgdiff.models.loading import check_shapes, load_state_dict, read_json, safetensors_files, stored_tensors
from sgdiff.pipeline.base import PipelineEvents

LIBRARIES = ("transformers", "diffusers")  # whose logging and progress bars sgdiff silences
_silenced: dict[str, list] = {}  # library -> [holders, its verbosity before, its bars on before]
_silence_lock = threading.Lock()
_importing = threading.RLock()  # parts loading side by side import the libraries one at a time (library_imports)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence transformers'/diffusers' progress bars and advice while sgdiff draws its own progress:
    those already imported (silencing one would import it, ~1 s for transformers; code that imports
    one enters this after its import). Threads and nested uses share one silence: the first to enter
    takes the caller's settings, the last to leave puts them back. A library another thread is importing
    is waited for (library_imports): the half-made module would not import its logging."""
    with _importing, _silence_lock:
        names = [name for name in LIBRARIES if imported(name)]
        for name in names:
            if name not in _silenced:
                lib = library_logging(name)
                _silenced[name] = [0, lib.get_verbosity(), lib.is_progress_bar_enabled()]
                lib.set_verbosity_error()
                lib.disable_progress_bar()
            _silenced[name][0] += 1
    try:
        yield
    finally:
        with _importing, _silence_lock:
            for name in names:
                _silenced[name][0] -= 1
                if _silenced[name][0] == 0:
                    _, verbosity, bars = _silenced.pop(name)
                    lib = library_logging(name)
                    lib.set_verbosity(verbosity)
                    if bars:  # as the caller had it
                        lib.enable_progress_bar()


def imported(name: str) -> bool:
    """Whether library `name` is imported, whole: a thread importing it (not through library_imports: a
    part's own import of its module, the main thread) puts it in sys.modules while its package still runs,
    and importing its logging then would run the half-made package's imports a second time, in this thread
    ("cannot import name ... from partially initialized module")."""
    module = sys.modules.get(name)
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def library_logging(name: str):
    return importlib.import_module(f"{name}.utils.logging")


def require_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: the checkpoint has no {folder.name}/ folder")
    return folder


@contextmanager
def library_imports() -> Iterator[None]:
    """Imports of transformers' and diffusers' classes by parts loading side by side (load_side_by_side), one
    thread at a time: two threads inside the libraries' lazy imports at once (a VAE's diffusers importing
    transformers' PreTrainedModel while a text encoder's transformers imports its modeling code) can each hold
    a module the other needs, and Python then hands one a module half made ("cannot import name
    'PreTrainedModel'"; seen with torch._dynamo imported before, as in every worker of several processes).
    Imports mostly hold the GIL anyway: one at a time, they cost the loading little."""
    with _importing:
        yield


def load_tokenizer(folder: Path):
    """A `tokenizer/` folder's tokenizer as AutoTokenizer makes it: from sgdiff's cache of it when this
    folder's was built before (pipeline/tokenizers.py: no transformers import), else built by
    transformers and, when it is a fast tokenizer, kept in that cache for the next process."""
    from sgdiff.pipeline.tokenizers import cached_tokenizer_path, is_fast, keep, read_cached

    kept_at = cached_tokenizer_path(require_folder(folder))
    cached = read_cached(kept_at)
    if cached is not None:
        return cached
    tokenizer = build_tokenizer(folder)
    if is_fast(tokenizer):
        keep(kept_at, tokenizer)
    return tokenizer


def build_tokenizer(folder: Path):
    """The tokenizer as transformers builds it. For a plain folder (no config.json, no remote code) the
    class its tokenizer_config.json names ("Fast" dropped, as transformers 5 does) is imported alone:
    AutoTokenizer itself imports transformers' model registry, its generation code and with it
    torch._dynamo (about 1 s). Any other folder goes through AutoTokenizer."""
    config_path = require_folder(folder) / "tokenizer_config.json"
    raw = read_json(config_path) if config_path.is_file() else {}
    name = raw.get("tokenizer_class")
    plain = isinstance(name, str) and "auto_map" not in raw and not (folder / "config.json").exists()
    with _importing:  # two threads inside transformers' lazy imports at once pull in its model registry
        import transformers

        # (plain: name is a str)
        tokenizer_class: Any = getattr(transformers, name.removesuffix("Fast"), None) if plain else None  # type: ignore[union-attr]
        if not (isinstance(tokenizer_class, type) and tokenizer_class.__module__.startswith("transformers.models.")):
            from transformers import AutoTokenizer

            tokenizer_class = AutoTokenizer
    with quiet_libraries():
        return tokenizer_class.from_pretrained(folder)


def load_library_model(
    cls, folder: Path, dtype: torch.dtype, device: torch.device, without: tuple[str, ...] = ()
) -> torch.nn.Module:
    """A transformers or diffusers model (text encoder, VAE) from its folder, its weights read by sgdiff's
    reader straight onto `device`; through the library's own loader where the checkpoint's names differ
    from the model's in a way the library does more than rename. Pickle-only weights are refused. `without`:
    submodules never run (a VAE's encoder where nothing is encoded; Qwen2.5-VL's vision tower and language
    head where only text is encoded), dotted names as the model (not the file) names them, left out and
    unread: an empty module in their place (the library may still walk them, e.g. to count their layers)."""
    safetensors_files(require_folder(folder))
    with quiet_libraries():
        model = read_library_model(cls, folder, dtype, device, without)
        if model is None:
            model = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True).to(device)
            leave_out(model, without)
    return model.eval().requires_grad_(False)


def leave_out(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """An empty module in place of each named submodule (dotted names)."""
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, torch.nn.Module())


def library_renaming(model: torch.nn.Module) -> Callable[[str], str] | None:
    """How the library renames a checkpoint's tensors as its from_pretrained reads them (transformers 5
    reads Qwen2.5-VL's `model.layers.*` as `model.language_model.layers.*` and `visual.*` as
    `model.visual.*`): the renaming of a stored name, or None where it does more than rename (joins or
    splits tensors). No renaming for diffusers models, or where transformers has no such mapping."""
    if hasattr(model, "load_config"):  # diffusers ModelMixin
        return lambda name: name
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion mappings loads names as stored
        return lambda name: name
    transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]  # (a transformers model here)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    if len(renamings) < len(transforms):
        return None
    return lambda name: rename_source_key(name, renamings, [])[0]


_building = threading.Lock()  # one construction at a time patches nn.Module.register_parameter


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules this thread builds inside get their parameters on the meta device (neither allocated nor
    initialised); their buffers are made as usual, so the ones no checkpoint holds (position ids, ...)
    are right. Other threads (a part given its weights meanwhile) register parameters as usual."""
    builder = threading.get_ident()

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta" and threading.get_ident() == builder:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    with _building:
        register = torch.nn.Module.register_parameter  # read under the lock: the original, never a patch
        torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]  # a patch, on purpose
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def read_library_model(
    cls, folder: Path, dtype: torch.dtype, device: torch.device, without: tuple[str, ...] = ()
) -> torch.nn.Module | None:
    """`cls` built from its config with its parameters on meta, then given the checkpoint's tensors as
    read (load_state_dict(assign=True)): floating ones in `dtype` except the modules the library keeps in
    float32, as its from_pretrained does (and under the names it reads them as). None where the names do
    not match. `without`: submodules replaced by empty ones, their tensors left unread."""
    with parameters_on_meta():
        if hasattr(cls, "load_config"):  # diffusers ModelMixin
            model = cls.from_config(cls.load_config(folder))
        else:  # transformers PreTrainedModel
            model = cls(cls.config_class.from_pretrained(folder))
    renamed = library_renaming(model)
    if renamed is None:
        return None
    leave_out(model, without)
    stored = {renamed(name): where for name, where in stored_tensors(folder).items()}
    check_shapes(model, stored)  # before a byte is read: the file and tensor named
    used = lambda name: not any(f"{renamed(name)}.".startswith(f"{part}.") for part in without)  # noqa: E731
    state = load_state_dict(folder, dtype, device, kept_in_fp32(model, dtype), used)
    state = {renamed(name): tensor for name, tensor in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        return None
    for target, source in (getattr(model, "_tied_weights_keys", None) or {}).items():
        if {target, source} & set(missing) == {target}:  # a tied copy the checkpoint leaves out
            prefix, _, leaf = target.rpartition(".")
            setattr(model.get_submodule(prefix), leaf, model.get_parameter(source))
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    return model.to(device)


def kept_in_fp32(model: torch.nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """The module names whose weights the library's from_pretrained leaves in float32 at `dtype`:
    diffusers' `_keep_in_fp32_modules` always; transformers' at float16 only (T5's `wo`), and its
    `_keep_in_fp32_modules_strict` at float16 and bfloat16."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if hasattr(model, "_keep_in_fp32_modules_strict"):  # transformers
        strict = set(model._keep_in_fp32_modules_strict or ())  # type: ignore[arg-type]  # (transformers' list)
        keep = {torch.float16: keep | strict, torch.bfloat16: strict}.get(dtype, set())
    return tuple(sorted(keep))


# A part computed from loaded parts while the others still load: (the parts it needs, how)
Follower = tuple[tuple[str, ...], Callable[[dict[str, Any]], Any]]


def load_side_by_side(
    events: PipelineEvents,
    device: torch.device,
    loaders: dict[str, Callable[[], Any] | None],
    followers: dict[str, Follower] | None = None,
) -> dict[str, Any]:
    """Every part's loader on its own thread, timed as 'load <name>' (None: a part not loaded): while one
    part's file is read, another is built, cast or tokenised; the files share one reader. A follower
    starts once the parts it needs are loaded, on the others' time (e.g. the prompts encoded while the
    transformer still loads), and is timed and returned as a part too. When a part fails, or the user
    interrupts, the others give up at their next chunk; the first failure is raised once every loader
    has stopped."""
    followers = followers or {}
    with quiet_libraries(), shared_reader(device) as reader:
        pool = ThreadPoolExecutor(len(loaders) + len(followers))
        futures = {
            name: pool.submit(timed_load, events, name, load) for name, load in loaders.items() if load is not None
        }
        for name, (needs, follow) in followers.items():
            futures[name] = pool.submit(follow_parts, events, name, {n: futures[n] for n in needs}, follow)
        try:
            if wait(futures.values(), return_when=FIRST_EXCEPTION).not_done:
                reader.stop.set()  # a part failed: the others stop reading
        except BaseException:  # Ctrl-C while the parts load
            reader.stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    # (a part cancelled before its thread took it has no exception to ask for: asking would raise)
    failures = [e for f in futures.values() if not f.cancelled() and (e := f.exception()) is not None]
    if failures:
        raise next((e for e in failures if not isinstance(e, LoadingStopped)), failures[0])
    return {name: futures[name].result() if name in futures else None for name in [*loaders, *followers]}


def follow_parts(
    events: PipelineEvents, name: str, needs: dict[str, Future], follow: Callable[[dict[str, Any]], Any]
) -> Any:
    """A follower: waits for the parts it needs (a failed one fails it too), then runs timed."""
    parts = {need: future.result() for need, future in needs.items()}
    return timed_load(events, name, lambda: follow(parts))


def timed_load(events: PipelineEvents, name: str, load: Callable[[], Any]) -> Any:
    """Run `load()`, reporting it as the stage 'load <name>' (the CLI shows one line per part)."""
    events.stage_started(f"load {name}")
    start = time.perf_counter()
    part = load()
    events.stage_finished(f"load {name}", time.perf_counter() - start)
    return part


def loaded_modules(parts: Any) -> dict[str, torch.nn.Module]:
    """The fields of a components dataclass that hold a loaded model, by name (ComposedPipeline keeps the
    names as `loaded`, the models as `modules`)."""
    from dataclasses import fields

    return {f.name: model for f in fields(parts) if isinstance(model := getattr(parts, f.name), torch.nn.Module)}
