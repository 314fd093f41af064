"""--revision picks a branch, tag or commit of a Hub repo id, and every written file and perf dump records
the commit that was loaded: here from a fake HF cache (offline) holding two commits of one repo."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.engine.service import Engine
from sgdiff.io.image import read_png_parameters
from sgdiff.models.resolve import demo_model_dir

runner = CliRunner()
REPO = "owner/name"
MAIN, TAGGED = "1" * 40, "abcdef0123456789abcdef0123456789abcdef01"
SMALL = ["--steps", "1", "--height", "32", "--width", "32", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A HF cache (HF_HUB_CACHE) as huggingface_hub lays it out: refs/main and the tag v1 point at two
    snapshots, each a copy of the embedded image model."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    for ref, commit in (("main", MAIN), ("v1", TAGGED)):
        (repo / "refs" / ref).write_text(commit)
        shutil.copytree(demo_model_dir("sgdiff/demo-image"), repo / "snapshots" / commit)
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    """This process, and those it starts, see only the fake cache and never the network."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))  # (read when huggingface_hub is imported)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def generate(*args: str):
    return runner.invoke(app, ["generate", *SMALL, *args])


def test_written_files_and_the_perf_dump_record_the_commit_loaded(offline_hub, tmp_path):
    perf = tmp_path / "perf.json"
    result = generate("--model-path", REPO, "--revision", "v1", "--prompt", "a red circle",
                      "--output-path", str(tmp_path), "--perf-dump-path", str(perf))  # fmt: skip
    assert result.exit_code == 0, result.output
    [path] = result.stdout.split()
    params = read_png_parameters(path)
    assert (params["model"], params["model_revision"], params["model_commit"]) == (REPO, "v1", TAGGED)
    dump = json.loads(perf.read_text())
    assert dump["schema_version"] == 4
    assert (dump["model"], dump["model_revision"], dump["model_commit"]) == (REPO, "v1", TAGGED)


@pytest.mark.parametrize(("revision", "commit"), [(None, MAIN), ("main", MAIN), ("v1", TAGGED), (TAGGED, TAGGED)])
def test_a_revision_picks_its_snapshot(offline_hub, revision, commit):
    engine = Engine(REPO, revision=revision)  # resolved and checked; nothing loads
    assert engine.model_commit == commit and engine.revision == revision
    assert engine.runner.model_dir == offline_hub / "models--owner--name" / "snapshots" / commit
    assert engine.config.revision == commit  # worker processes load that very commit


def test_a_folder_records_a_commit_only_when_it_is_a_snapshot(offline_hub):
    snapshot = offline_hub / "models--owner--name" / "snapshots" / TAGGED
    assert Engine(str(snapshot)).model_commit == TAGGED
    assert Engine(str(snapshot)).config.revision is None  # a folder: workers load the folder
    assert Engine("sgdiff/demo-image").model_commit is None


@pytest.mark.parametrize(
    ("model", "revision", "message"),
    [
        ("sgdiff/demo-image", "main", "--revision picks a version of a Hub repo; sgdiff/demo-image is an embedded "
         "demo model: leave --revision out"),
        (None, "main", "sgdiff/demo-image is an embedded demo model"),
        ("SNAPSHOT", "main", "is a local folder: leave --revision out, or give the repo id (owner/name) instead"),
        (REPO, "v2", f"{REPO} at revision v2 is not in the local HF cache (other revisions are) and the Hub cannot "
         "be reached (offline?): download that revision first, or give one that is cached as --revision"),
        (REPO, "2" * 40, f"{REPO} at revision {'2' * 40} is not in the local HF cache (other revisions are)"),
        ("someone/else", "v1", "someone/else at revision v1 is not in the local HF cache and the Hub cannot be "
         "reached (offline?): download it first or pass a local folder"),
        (REPO, " ", "--revision is empty: give a branch, tag or commit hash, or leave it out"),
        (REPO, "main..v1", "--revision 'main..v1' is not a branch, tag or commit hash"),
    ],
)  # fmt: skip
def test_a_revision_that_cannot_be_loaded_is_one_line(offline_hub, tmp_path, model, revision, message):
    if model == "SNAPSHOT":
        model = str(offline_hub / "models--owner--name" / "snapshots" / MAIN)
    model_args = ["--model-path", model] if model else []
    result = generate(*model_args, "--revision", revision, "--prompt", "p", "--output-path", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_serve_refuses_a_revision_of_a_folder_before_loading(tmp_path):
    result = runner.invoke(app, ["serve", "--revision", "main", "--port", "0", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "error: --revision picks a version of a Hub repo; sgdiff/demo-image is an embedded" in result.stderr


def test_a_server_records_the_commit_it_serves(offline_hub, tmp_path):
    from fastapi.testclient import TestClient

    from sgdiff.server.app import create_app
    from sgdiff.server.core import ServerCore, ServerLimits

    engine = Engine(REPO, revision="v1")
    core = ServerCore(engine, tmp_path / "state", ServerLimits(), REPO)
    try:
        assert (core.about["model_revision"], core.about["model_commit"]) == ("v1", TAGGED)
        card = TestClient(create_app(core, None)).get("/v1/models").json()["data"][0]
        assert (card["id"], card["revision"], card["commit"]) == (REPO, "v1", TAGGED)
    finally:
        core.close()
        engine.close()
