"""The checkout's top-level folders never shadow a package the stack imports (gateway/syspath.py): not in the
test process, and not in `python -m blendgate.gateway` run from the checkout. transformers 5.25 made Hugging
Face's `kernels` a dependency, and a bare `kernels` from the checkout broke every model import."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from blendgate.gateway.syspath import drop_working_directory

CHECKOUT = Path(__file__).resolve().parents[3]
TOP_LEVEL_PACKAGES = sorted(p.parent.name for p in CHECKOUT.glob("*/__init__.py"))


def _in_checkout_folder(origin: str | None) -> bool:
    """Whether a module found at `origin` is one of the checkout's top-level packages (not a module of the
    virtual environment, which may live in the checkout too, nor a bench/ script the bench tests import)."""
    return origin is not None and Path(origin).resolve() in {CHECKOUT / name / "__init__.py" for name in
                                                             TOP_LEVEL_PACKAGES}


def test_the_checkout_has_the_packages_this_guards():
    assert "kernels" in TOP_LEVEL_PACKAGES and "gateway" in TOP_LEVEL_PACKAGES


def test_no_top_level_folder_is_importable_under_its_bare_name_in_the_tests():
    for name in TOP_LEVEL_PACKAGES:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        assert not _in_checkout_folder(origin), f"{name} resolves to {origin}"


def test_drop_working_directory_removes_both_spellings_and_keeps_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = ["/elsewhere/tests", "", str(tmp_path), str(tmp_path / "sub"), "/site-packages"]
    drop_working_directory(path)
    assert path == ["/elsewhere/tests", str(tmp_path / "sub"), "/site-packages"]


def test_python_m_from_the_checkout_leaves_the_checkout_off_the_path():
    """What `python -m blendgate.gateway --help` run in the checkout sees on sys.path after the entry point
    ran: `python -c` starts with "" first, as `-m` starts with the working directory."""
    script = (
        "import runpy, sys\n"
        "sys.argv = ['blendgate', '--help']\n"
        "try:\n"
        "    runpy.run_module('blendgate.gateway', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "import importlib.util\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print('KERNELS', spec.origin if spec else None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=CHECKOUT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout
    origin = done.stdout.rsplit("KERNELS ", 1)[1].strip()
    assert not _in_checkout_folder(None if origin == "None" else origin), origin


def _write_kernels_origin(path: str) -> None:
    """In a process forked from the tests' forkserver: where the `kernels` it imported came from."""
    module = sys.modules.get("kernels")
    Path(path).write_text(str(getattr(module, "__file__", None)))


def test_gateways_forked_for_the_tests_import_the_stacks_kernels(tmp_path):
    """The forkserver (tests/gateway_launcher.py) imports transformers before the gateways fork from it, and
    starts from a directory where the checkout is not importable."""
    import gateway_launcher

    out = tmp_path / "origin"
    process = gateway_launcher._forkserver().Process(target=_write_kernels_origin, args=(str(out),))
    process.start()
    process.join(120)
    assert process.exitcode == 0
    origin = out.read_text()
    assert not _in_checkout_folder(None if origin == "None" else origin), origin
