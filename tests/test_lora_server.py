"""`sgdiff serve --lora-path A --lora-path B`: the adapters load once (fused anew from a copy of the base weights at
each switch; unfused as asked), and each request picks its own (`lora`, `loras`): its image is `sgdiff generate
--lora-path`'s (fused, fp32, 2/255), whatever ran before it;
requests with different adapters never share a batch; GET /v1/loras lists them; an unknown name is a 400
naming the loaded ones; `generate --server --lora-path NAME[:SCALE]` asks for the server's adapters by name."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.config import BatchingConfig, LoraConfig, RuntimeConfig
from sgdiff.errors import UserError
from sgdiff.io.image import read_png_parameters
from sgdiff.pipeline.components import quiet_libraries
from sgdiff.testing.lora_files import diffusers_file, flux_style_and_detail, linear_names
from sgdiff.testing.server import served_in_thread

runner = CliRunner()
MAX_PIXEL_DIFF = 2  # of 255
REQUEST = {"prompt": "a red cube", "size": "48x32", "num_inference_steps": 3, "guidance_scale": 4.0, "seed": 7}
FLAGS = ["--prompt", "a red cube", "--height", "32", "--width", "48", "--steps", "3", "--guidance-scale", "4.0",
         "--seed", "7", "-q"]  # fmt: skip


@pytest.fixture(scope="module")
def adapters(tiny_flux_dev, tmp_path_factory):
    return flux_style_and_detail(tiny_flux_dev / "transformer", tmp_path_factory.mktemp("lora-server"))


@pytest.fixture(scope="module")
def server(tiny_flux_dev, adapters, tmp_path_factory):
    """`sgdiff serve --lora-path style:1.5 --lora-path detail:0.5 --max-batch-size 4` as run_server makes it
    (auto: fused, switched per request)."""
    from sgdiff.engine.service import Engine

    lora = LoraConfig(((str(adapters["style"]), 1.5), (str(adapters["detail"]), 0.5))).resolved(True, in_place=True)
    runtime = RuntimeConfig(device="cpu", dtype="fp32", lora=lora)
    engine = Engine(str(tiny_flux_dev), runtime=runtime, batching=BatchingConfig(4, 300.0))
    with served_in_thread(engine, tmp_path_factory.mktemp("state"), str(tiny_flux_dev)) as url:
        yield url


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int64)


def ask(url: str, **fields) -> tuple[np.ndarray, dict]:
    """A request's image and the answer's sgdiff extras; the PNG's metadata in extras["metadata"]."""
    answer = httpx.post(f"{url}/v1/images/generations", json={**REQUEST, **fields}, timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    png = base64.b64decode(body["data"][0]["b64_json"])
    return decode(png), {**body["sgdiff"], "metadata": Image.open(io.BytesIO(png)).text}


_local: dict = {}


def generated(model, tmp_path_factory, *lora_flags: str) -> np.ndarray:
    """`sgdiff generate` (fused adapters, this process) for the request, by its --lora-path flags (cached)."""
    if lora_flags not in _local:
        out = tmp_path_factory.mktemp("local")
        args = ["generate", "--model-path", str(model), "--device", "cpu", "--dtype", "fp32", "--output-path", str(out),
                *FLAGS, *lora_flags]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        _local[lora_flags] = np.asarray(Image.open(result.stdout.split()[0]).convert("RGB")).astype(np.int64)
    return _local[lora_flags]


def test_the_adapters_are_listed(server, adapters):
    answer = httpx.get(f"{server}/v1/loras").json()
    listed = [(a["name"], a["source"], a["scale"], a["rank"], a["mode"]) for a in answer["data"]]
    assert listed == [("style", str(adapters["style"]), 1.5, 4, "fused"),
                      ("detail", str(adapters["detail"]), 0.5, 4, "fused")]  # fmt: skip
    assert answer["data"][0]["layers"] > answer["data"][1]["layers"] > 0


def test_each_request_gets_what_generate_makes_with_its_adapters(server, adapters, tiny_flux_dev, tmp_path_factory):
    """In a row, each with other adapters than the one before: every image is the one `generate` makes with
    those adapters fused, and the base model's without any."""
    style, detail = str(adapters["style"]), str(adapters["detail"])
    cases = [  # (the request's fields, generate's --lora-path flags, what the metadata records)
        ({"lora": "style"}, ("--lora-path", f"{style}:1.5"), [("style", 1.5)]),
        ({"loras": [{"name": "detail", "scale": -1.2}]}, ("--lora-path", f"{detail}:-1.2"), [("detail", -1.2)]),
        ({}, (), []),
        ({"loras": [{"name": "style", "scale": 1.0}, {"name": "detail"}]},
         ("--lora-path", style, "--lora-path", f"{detail}:0.5"), [("style", 1.0), ("detail", 0.5)]),
        ({"lora": "style"}, ("--lora-path", f"{style}:1.5"), [("style", 1.5)]),
    ]  # fmt: skip
    images = []
    for fields, flags, used in cases:
        image, extras = ask(server, **fields)
        assert np.abs(image - generated(tiny_flux_dev, tmp_path_factory, *flags)).max() <= MAX_PIXEL_DIFF, fields
        sources = {"style": style, "detail": detail}
        assert extras["loras"] == [{"name": n, "source": sources[n], "scale": s} for n, s in used]
        assert '"loras": [{"name"' in extras["metadata"]["sgdiff"] or not used  # (the PNG records them too)
        images.append(image)
    for i, j in [(0, 1), (0, 2), (1, 2), (0, 3)]:  # each set of adapters makes its own image
        assert np.abs(images[i] - images[j]).max() > 5 * MAX_PIXEL_DIFF


def test_requests_with_other_adapters_never_share_a_batch(server):
    """Four requests at once, two adapters: those of one adapter may run as one batch (of at most 2: never with
    the others), each with its own image."""
    wanted = [{"lora": "style"}, {"lora": "detail"}, {"lora": "style", "seed": 8}, {"lora": "detail", "seed": 8}]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda fields: ask(server, **fields), wanted))
    sizes = [extras["batch_size"] for _, extras in answers]
    assert max(sizes) == 2 and set(sizes) <= {1, 2}, sizes  # (1: a request that came after its twin's batch left)
    for fields, (image, _) in zip(wanted, answers, strict=True):
        alone, _ = ask(server, **fields)
        assert np.abs(image - alone).max() <= 1


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"lora": "nope"}, "lora", "`lora`: there is no LoRA adapter named 'nope': the loaded ones are style, detail"),
        ({"loras": [{"name": "style"}, {"name": "nope", "scale": 1}]}, "loras", "no LoRA adapter named 'nope'"),
        ({"lora": "style", "loras": []}, "loras", "give `lora` (one adapter) or `loras` (a list), not both"),
        ({"loras": "style"}, "loras", '`loras` must be a list of objects {"name": ..., "scale": ...}'),
        ({"loras": [{"name": "style", "weight": 1}]}, "loras", "got the item {'name': 'style', 'weight': 1}"),
        ({"loras": [{"name": "style", "scale": "high"}]}, "loras", "the scale of 'style' must be a finite number"),
        ({"loras": [{"name": "style"}, {"name": "style"}]}, "loras", "`loras` names 'style' twice"),
        ({"lora": 3}, "lora", "`lora` must be the name of a LoRA adapter (GET /v1/loras lists them), got 3"),
    ],
)
def test_bad_adapter_choices_are_refused_with_the_field(server, fields, param, message):
    answer = httpx.post(f"{server}/v1/images/generations", json={**REQUEST, **fields}, timeout=60)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_generate_with_a_server_asks_for_its_adapters_by_name(server, adapters, tiny_flux_dev, tmp_path):
    """`--lora-path style:1.5` with --server is the server's adapter named style: the pixels, metadata and file
    name are a local run's with the file; a name the server lacks and --lora-mode (the server's) are refused."""
    remote = runner.invoke(app, ["generate", "--server", server, "--lora-path", "style:1.5", "--output-path",
                                 str(tmp_path / "remote"), *FLAGS])  # fmt: skip
    local = runner.invoke(app, ["generate", "--model-path", str(tiny_flux_dev), "--device", "cpu", "--dtype", "fp32",
                                "--lora-path", f"{adapters['style']}:1.5", "--output-path", str(tmp_path / "local"),
                                *FLAGS])  # fmt: skip
    assert remote.exit_code == 0 and local.exit_code == 0, remote.output + local.output
    [there], [here] = remote.stdout.split(), local.stdout.split()
    assert np.abs(decode(open(there, "rb").read()) - decode(open(here, "rb").read())).max() <= MAX_PIXEL_DIFF
    # the adapters are in the default file name: local and remote name alike, a run without them writes its own
    base = runner.invoke(app, ["generate", "--model-path", str(tiny_flux_dev), "--device", "cpu", "--dtype", "fp32",
                               "--output-path", str(tmp_path / "local"), *FLAGS])  # fmt: skip
    assert base.exit_code == 0, base.output
    assert Path(there).name == Path(here).name != Path(base.stdout.split()[0]).name and Path(here).exists()
    assert (
        read_png_parameters(there)["loras"]
        == read_png_parameters(here)["loras"]
        == [{"name": "style", "source": str(adapters["style"]), "scale": 1.5}]
    )
    unknown = runner.invoke(app, ["generate", "--server", server, "--lora-path", "nope", *FLAGS])
    assert unknown.exit_code == 2 and unknown.stderr == (
        "error: the server refused: --lora-path: there is no LoRA adapter named 'nope': the loaded ones are style, "
        "detail\n"
    )
    mode = runner.invoke(app, ["generate", "--server", server, "--lora-path", "style", "--lora-mode", "fused", *FLAGS])
    assert mode.exit_code == 2 and mode.stderr.startswith("error: --lora-mode sets how a model runs here")


def test_fused_adapters_are_every_requests_and_cannot_be_changed(tiny_flux_dev, adapters, tmp_path_factory):
    """Fused adapters where requests do not switch (Engine.from_pretrained's `loras`, as `generate`; a server's
    whose transformer is offloaded): every request runs them; one asking for others is refused."""
    from sgdiff.engine.service import Engine

    style = str(adapters["style"])
    with Engine.from_pretrained(str(tiny_flux_dev), device="cpu", dtype="fp32", loras=[(style, 1.5)],
                                lora_mode="fused") as engine:  # fmt: skip
        params = engine.request("a red cube", height=32, width=48, num_inference_steps=3, guidance_scale=4.0, seed=7)
        assert params.loras == engine.request("a cube", loras=[("style", None)]).loras == (("style", 1.5),)
        for other in ([], [("style", 0.5)]):
            with pytest.raises(UserError, match=r"fused into the weights \(style:1.5\) and no request can change"):
                engine.request("a cube", loras=other)
        image = np.asarray(engine.submit(params).result().images[0]).astype(np.int64)
    assert np.abs(image - generated(tiny_flux_dev, tmp_path_factory, "--lora-path", f"{style}:1.5")).max() <= 1


def test_the_python_engine_switches_fused_adapters_when_asked(tiny_flux_dev, adapters, tmp_path_factory):
    """Engine.from_pretrained(lora_switching=True): each request picks its adapters, as on a server (fused anew at
    each switch): `generate`'s image with those adapters."""
    from sgdiff.engine.service import Engine

    style, detail = str(adapters["style"]), str(adapters["detail"])
    with Engine.from_pretrained(str(tiny_flux_dev), device="cpu", dtype="fp32", lora_switching=True,
                                loras=[(style, 1.5), (detail, 0.5)]) as engine:  # fmt: skip
        assert (engine.lora_mode, engine.lora_switching) == ("fused", True)
        for wanted, flags in [([("detail", -1.2)], ("--lora-path", f"{detail}:-1.2")), ([], ()),
                              ([("style", None)], ("--lora-path", f"{style}:1.5"))]:  # fmt: skip
            params = engine.request("a red cube", height=32, width=48, num_inference_steps=3, guidance_scale=4.0,
                                    seed=7, loras=wanted)  # fmt: skip
            image = np.asarray(engine.submit(params).result().images[0]).astype(np.int64)
            assert np.abs(image - generated(tiny_flux_dev, tmp_path_factory, *flags)).max() <= MAX_PIXEL_DIFF, wanted


def test_adapters_stay_unfused_where_the_weights_move_or_are_copied():
    """What a server (and lora_switching) makes of `auto`: fused where the transformer's weights stay in place,
    unfused under CPU offload or sequence parallelism; CFG parallel keeps whole weights on each rank."""
    from sgdiff.config import OffloadConfig, ParallelConfig, switching_loras

    lora = LoraConfig((("style.safetensors", 1.0),))
    cases = [(OffloadConfig(), ParallelConfig(), "fused"), (OffloadConfig("components"), ParallelConfig(), "unfused"),
             (OffloadConfig("layers"), ParallelConfig(), "unfused"), (OffloadConfig(), ParallelConfig(2), "unfused"),
             (OffloadConfig(), ParallelConfig(2, ring_degree=2), "unfused"),
             (OffloadConfig(), ParallelConfig(2, enable_cfg_parallel=True), "fused")]  # fmt: skip
    for offload, parallel, mode in cases:
        resolved = switching_loras(RuntimeConfig(offload=offload, lora=lora), parallel).lora
        assert (resolved.mode, resolved.switching) == (mode, True), (offload, parallel)


def test_two_processes_switch_unfused_adapters_per_request(tiny_flux_dev, adapters, tmp_path_factory):
    """What `sgdiff serve --num-gpus 2` runs by default (unfused, Ulysses-2: each rank adds the adapters' updates of
    its heads' q/k/v rows and its share of the modulation): each request gets `generate`'s image with its adapters
    fused, one process."""
    from sgdiff.engine.service import Engine

    style, detail = str(adapters["style"]), str(adapters["detail"])
    with Engine.from_pretrained(str(tiny_flux_dev), device="cpu", dtype="fp32", num_gpus=2, lora_mode="unfused",
                                loras=[(style, 1.5), (detail, 0.5)]) as engine:  # fmt: skip
        for wanted, flags in [([("style", None)], ("--lora-path", f"{style}:1.5")),
                              ([("detail", -1.2)], ("--lora-path", f"{detail}:-1.2"))]:  # fmt: skip
            params = engine.request("a red cube", height=32, width=48, num_inference_steps=3, guidance_scale=4.0,
                                    seed=7, loras=wanted)  # fmt: skip
            image = np.asarray(engine.submit(params).result().images[0]).astype(np.int64)
            assert np.abs(image - generated(tiny_flux_dev, tmp_path_factory, *flags)).max() <= MAX_PIXEL_DIFF, wanted


def test_a_form_gives_loras_as_json_text():
    from sgdiff.server.errors import ApiError
    from sgdiff.server.protocol import Body, take_loras

    body = Body({"loras": '[{"name": "style", "scale": 0.5}, "detail"]'}, from_form=True)
    assert take_loras(body) == ([("style", 0.5), ("detail", None)], "loras") and body.fields == {}
    with pytest.raises(ApiError, match="in a form, `loras` is JSON text"):
        take_loras(Body({"loras": "style:0.5"}, from_form=True))


def test_lora_modes_are_the_configs():
    from sgdiff.cli.options import LoraModeChoice
    from sgdiff.config import LORA_MODES

    assert tuple(choice.value for choice in LoraModeChoice) == LORA_MODES


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
def test_video_jobs_pick_their_adapters_too(tiny_wan, tmp_path):
    """POST /v1/videos as the openai client sends it (multipart): `lora`, or `loras` as JSON text; each MP4 is
    byte for byte the one `generate` writes with those adapters fused (the metadata too)."""
    import openai
    from diffusers import WanTransformer3DModel

    from sgdiff.engine.service import Engine

    model = tiny_wan("t2v")
    with quiet_libraries():
        reference = WanTransformer3DModel.from_pretrained(model / "transformer")
    motion = diffusers_file(tmp_path / "motion.safetensors", reference, linear_names(reference, "blocks."), 5)
    lora = LoraConfig(((str(motion), 2.0),)).resolved(True, in_place=True)
    engine = Engine(str(model), runtime=RuntimeConfig(device="cpu", dtype="fp32", lora=lora))
    fields = {"num_frames": 5, "num_inference_steps": 3, "seed": 3}
    flags = ["--height", "32", "--width", "32", "--num-frames", "5", "--steps", "3", "--seed", "3", "-q"]
    cases = [({"lora": "motion"}, [f"{motion}:2.0"]), ({"loras": json.dumps([{"name": "motion", "scale": -1}])},
             [f"{motion}:-1"]), ({}, [])]  # fmt: skip
    with served_in_thread(engine, tmp_path / "state", str(model)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        videos = []
        for extra, _ in cases:
            job = client.videos.create(model=str(model), prompt="a red ball", size="32x32",
                                       extra_body={**fields, **extra})  # fmt: skip
            while job.status in ("queued", "in_progress"):
                time.sleep(0.02)
                job = client.videos.retrieve(job.id)
            assert job.status == "completed", job.error
            videos.append(client.videos.download_content(job.id).read())
    for number, ((_, paths), video) in enumerate(zip(cases, videos, strict=True)):
        out = tmp_path / f"local-{number}"
        lora_flags = [flag for path in paths for flag in ("--lora-path", path)]
        result = runner.invoke(app, ["generate", "--model-path", str(model), "--prompt", "a red ball", "--device",
                                     "cpu", "--dtype", "fp32", "--output-path", str(out), "--output-file-name", "v",
                                     *flags, *lora_flags])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert (out / "v.mp4").read_bytes() == video
    assert len(set(videos)) == 3
