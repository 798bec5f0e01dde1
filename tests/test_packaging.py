"""The distribution maps every component folder into the `baton` namespace."""

import importlib
import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed_and_imports():
    setuptools = _pyproject()["tool"]["setuptools"]
    package_dir = setuptools["package-dir"]
    listed = set(setuptools["packages"])
    found = set()
    for top_name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([top_name, *rel.parts]))
    assert found == listed, f"pyproject packages differ: missing {found - listed}, extra {listed - found}"
    for name in sorted(listed):
        module = importlib.import_module(name)
        assert pathlib.Path(module.__file__).is_relative_to(ROOT)


def test_nothing_shadows_the_standard_library():
    # Run from the repository root, where a folder named operator/ sits beside the code.
    out = subprocess.run(
        [sys.executable, "-c", "import operator, baton.operator; print(operator.__file__)"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    assert not out.strip().startswith(str(ROOT))


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text().splitlines()
    i = readme.index("<!-- test-command -->")
    assert readme[i + 1].startswith("```") and "pytest" in readme[i + 2]
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()


def test_cli_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "baton.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("up", "serve-prefill", "serve-decode", "serve-router", "operator"):
        assert name in out


def test_a_built_wheel_installs_and_imports_every_subpackage(tmp_path):
    """A normal (non-editable) install works too: the mapped folders land inside baton/."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("baton-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    names = _pyproject()["tool"]["setuptools"]["packages"]
    code = (
        "import importlib, baton, pathlib\n"
        f"mods = [importlib.import_module(n) for n in {names!r}]\n"
        "import sys\nassert all(m.__file__.startswith(sys.prefix) for m in mods), [m.__file__ for m in mods]\n"
        "assert (pathlib.Path(baton.__file__).parent / 'protos' / 'common.proto').exists()\n"
        "print('ok')\n"
    )
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
