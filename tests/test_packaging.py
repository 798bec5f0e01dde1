"""The distribution maps every component folder into the `baton` namespace."""

import importlib
import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed_and_imports():
    setuptools = _pyproject()["tool"]["setuptools"]
    package_dir = setuptools["package-dir"]
    listed = set(setuptools["packages"])
    found = set(package_dir)  # each mapped folder is a package (operator/ has no __init__.py)
    for top_name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([top_name, *rel.parts]))
    assert found == listed, f"pyproject packages differ: missing {found - listed}, extra {listed - found}"
    for name in sorted(listed):
        module = importlib.import_module(name)
        assert pathlib.Path(list(module.__path__)[0]).is_relative_to(ROOT)


def test_nothing_shadows_the_standard_library(tmp_path):
    """`python -m` puts the working directory first on sys.path before the standard library
    is imported; from the repository root the folder operator/ must not replace `operator`.
    A bare virtual environment, so no site .pth file imports `operator` early by luck."""
    assert not (ROOT / "operator" / "__init__.py").exists()  # a namespace portion only
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "v")], check=True)
    out = subprocess.run(
        [str(tmp_path / "v" / "bin" / "python"), "-m", "json.tool", "--help"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "baton.cli", "operator", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text().splitlines()
    i = readme.index("<!-- test-command -->")
    assert readme[i + 1].startswith("```") and "pytest" in readme[i + 2]
    # In a fresh venv the project's torch range alone would pull the newest (CUDA) build.
    assert readme[i + 2].startswith("pip install torch==2.13.0 && ")
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()


def test_cli_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "baton.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("up", "serve-prefill", "serve-decode", "serve-colocated", "serve-router", "operator"):
        assert name in out


def test_serve_worker_is_an_alias_of_serve_colocated():
    """`serve-worker` was the colocated command's first name; manifests may still use it."""
    out = subprocess.run([sys.executable, "-m", "baton.cli", "serve-worker", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "usage: baton serve-colocated" in out.stdout and "Run a Baton colocated worker" in out.stdout


def test_a_built_wheel_installs_and_imports_every_subpackage(tmp_path):
    """A normal (non-editable) install works too: the mapped folders land inside baton/.

    The wheel goes into a new virtual environment without its dependencies; those (torch,
    grpc, ...) are taken from the environment running this test, wherever pip put them (a
    fresh venv, or the system interpreter). Its directories are appended as plain path
    entries, so their .pth files (an editable install of baton) do not run and the wheel's
    baton is the one imported."""
    # Build from a clean copy: setuptools reuses an in-tree build/ left by earlier builds.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT, src, symlinks=True,
        ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".whl*", ".*cache", "bench"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("baton-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    venv_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    deps = dict.fromkeys([*site.getsitepackages(), *(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))])
    (pathlib.Path(venv_site) / "_test_dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    names = _pyproject()["tool"]["setuptools"]["packages"]
    code = (
        "import importlib, baton, pathlib\n"
        f"mods = [importlib.import_module(n) for n in {names!r}]\n"
        "import sys\nassert all(list(m.__path__)[0].startswith(sys.prefix) for m in mods), [m.__path__ for m in mods]\n"
        "assert (pathlib.Path(baton.__file__).parent / 'protos' / 'common.proto').exists()\n"
        "print('ok')\n"
    )
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "baton/operator/main.py" in names and "baton/operator/__init__.py" not in names
