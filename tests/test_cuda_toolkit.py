"""speed/cuda_toolkit.py: a CUDA_HOME for AOTInductor assembled from pip's CUDA headers and the loaded driver,
on a machine without a toolkit (the GPU machine's image may be one)."""

from __future__ import annotations

from sgdiff.speed.cuda_toolkit import assemble, header_folders, loaded_driver


def test_a_cuda_home_is_assembled_from_pip_headers_and_the_loaded_driver(tmp_path):
    site = tmp_path / "site-packages"
    cu13, cuda_runtime = site / "nvidia" / "cu13" / "include", site / "nvidia" / "cuda_runtime" / "include"
    for folder in (cu13, cuda_runtime):
        folder.mkdir(parents=True)
        (folder / "cuda_runtime_api.h").write_text(f"// {folder.parent.name}\n")
    (cuda_runtime / "cuda.h").write_text("// driver API\n")
    (site / "nvidia" / "cublas" / "include").mkdir(parents=True)  # no runtime header: not a CUDA include folder
    assert header_folders([str(tmp_path / "elsewhere"), str(site)]) == [cu13, cuda_runtime]  # (sorted)

    driver = tmp_path / "lib" / "libcuda.so.570.86.15"
    driver.parent.mkdir()
    driver.write_bytes(b"\x7fELF")
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n"
        f"7f02-7f03 r-xp 00000000 08:01 2 {driver}\n"
        "7f04-7f05 rw-p 00000000 00:00 0 \n"
    )
    assert loaded_driver(maps) == driver
    assert loaded_driver(tmp_path / "no-maps") is None

    home = assemble(header_folders([str(site)]), driver, tmp_path / "cache")
    assert (home / "lib64" / "libcuda.so").resolve() == driver
    assert (home / "include" / "cuda.h").read_text() == "// driver API\n"
    assert (home / "include" / "cuda_runtime_api.h").read_text() == "// cu13\n"  # the first folder wins
    assert assemble(header_folders([str(site)]), driver, tmp_path / "cache") == home  # kept, not made again
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [home.name]  # nothing partial left
