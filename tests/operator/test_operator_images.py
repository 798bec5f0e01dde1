"""The Dockerfiles install Baton the way CI does (no container engine runs here, so the
files are checked as text against pyproject.toml and the CI script)."""

from __future__ import annotations

import pathlib
import re
import shlex
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

from baton import __version__
from baton.operator import config
from baton.operator.builders.common import RUN_AS

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Core dependencies the control image leaves out: the engine's, never imported by the
# router or the operator (xgrammar itself depends on torch).
ENGINE_ONLY = {"torch", "safetensors", "xgrammar"}


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / name).read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def pip_installs(name: str) -> list[list[str]]:
    """Arguments of every `pip install` in RUN instructions, in order."""
    runs = [rest for keyword, rest in instructions(name) if keyword == "RUN"]
    installs = []
    for run in runs:
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


def core_requirements() -> dict[str, Requirement]:
    return {Requirement(text).name: Requirement(text) for text in PYPROJECT["project"]["dependencies"]}


def test_base_images_are_pinned():
    """The base is a build argument (scripts/build-images.sh may pass a local one) whose
    default is a pinned image."""
    for name in ("Dockerfile", "Dockerfile.control"):
        steps = instructions(name)
        assert [rest for keyword, rest in steps if keyword == "FROM"] == ["${BASE_IMAGE}"]
        (default,) = [rest.split("=", 1)[1] for keyword, rest in steps
                      if keyword == "ARG" and rest.startswith("BASE_IMAGE=")]
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", default), default


def test_worker_image_installs_pinned_torch_then_the_project_with_ucx():
    """As CI: `pip install torch==X` first, then the project, whose torch range X satisfies."""
    installs = pip_installs("Dockerfile")
    assert len(installs) == 2
    default_torch = re.search(r"TORCH_VERSION=([\d.]+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert any(word == "torch==${TORCH_VERSION}" for word in installs[0])
    assert core_requirements()["torch"].specifier.contains(Version(default_torch))
    assert installs[1] == [".[ucx]"]  # not editable, with the ucx extra
    assert "ucx" in PYPROJECT["project"]["optional-dependencies"]
    ci = (ROOT / ".ci" / "run").read_text()
    ci_torch = re.search(r"torch==([\d.]+)", ci).group(1)
    assert core_requirements()["torch"].specifier.contains(Version(ci_torch))


def test_control_image_installs_every_requirement_but_the_engines_and_no_torch():
    installs = pip_installs("Dockerfile.control")
    assert installs[-1] == ["--no-deps", "."]
    listed = {Requirement(text).name: Requirement(text) for text in installs[0]}
    expected = {name: req for name, req in core_requirements().items() if name not in ENGINE_ONLY}
    assert {name: str(req) for name, req in listed.items()} == {
        name: str(req) for name, req in expected.items()}, (
        "Dockerfile.control's requirement list drifted from pyproject.toml's dependencies")
    assert not any("torch" in word for install in installs for word in install)


def test_images_copy_every_package_folder():
    folders = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    for name in ("Dockerfile", "Dockerfile.control"):
        copied = {rest.split()[0] for keyword, rest in instructions(name) if keyword == "COPY"}
        assert folders <= copied, f"{name} misses {folders - copied}"


def test_images_run_baton_as_the_pods_user():
    for name in ("Dockerfile", "Dockerfile.control"):
        steps = instructions(name)
        assert ("USER", f"{RUN_AS}:{RUN_AS}") in steps
        assert ("ENTRYPOINT", '["baton"]') in steps


def test_default_image_names_follow_the_package_version():
    assert config.DEFAULT_WORKER_IMAGE.endswith(f"/baton:{__version__}")
    assert config.DEFAULT_CONTROL_IMAGE.endswith(f"/baton-control:{__version__}")
    assert PYPROJECT["project"]["version"] == __version__
    for name, image in (("Dockerfile", config.DEFAULT_WORKER_IMAGE),
                        ("Dockerfile.control", config.DEFAULT_CONTROL_IMAGE)):
        assert f"-t {image} " in (ROOT / name).read_text()
