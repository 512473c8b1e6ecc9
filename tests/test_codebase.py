"""The codebase's own rules: small functions and files, a package that installs with its `swin-train` command."""
import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

MAX_PARAMETERS = 8    # outside models/, whose constructors keep the official signatures
MAX_LINES = 450       # outside models/ and tests/


def source_files(skip):
    for folder, dirs, files in os.walk(ROOT):
        # shared/ holds other projects' files for the GPU check (the official model), never ours
        dirs[:] = [d for d in dirs
                   if not d.startswith('.') and d not in ('output', 'datasets', '__pycache__', 'shared')]
        rel = os.path.relpath(folder, ROOT)
        if rel.split(os.sep)[0] in skip:
            continue
        yield from (os.path.join(folder, name) for name in files if name.endswith('.py'))


def parameter_count(function):
    args = function.args
    names = args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]
    return len([a for a in names if a.arg not in ('self', 'cls')])


def test_no_function_has_more_than_8_parameters():
    too_many = []
    for path in source_files(skip={'models'}):
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and parameter_count(node) > MAX_PARAMETERS:
                too_many.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} "
                                f"({parameter_count(node)} parameters)")
    assert not too_many, too_many


def test_no_source_file_is_over_450_lines():
    long_files = []
    for path in source_files(skip={'models', 'tests'}):
        with open(path) as f:
            lines = sum(1 for _ in f)
        if lines > MAX_LINES:
            long_files.append(f"{os.path.relpath(path, ROOT)} ({lines} lines)")
    assert not long_files, long_files


def test_packaging_lists_every_core_module():
    """pyproject.toml's py-modules / packages name exactly the importable modules of the repository root."""
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        setuptools = tomllib.load(f)['tool']['setuptools']
    entries = os.listdir(ROOT)
    modules = {name[:-3] for name in entries if name.endswith('.py')}
    packages = {name for name in entries if os.path.isfile(os.path.join(ROOT, name, '__init__.py'))}
    assert set(setuptools['py-modules']) == modules
    assert set(setuptools['packages']) == packages


@pytest.mark.slow
def test_editable_install_gives_the_swin_train_command(tmp_path):
    """`pip install -e .` in a fresh virtual environment (dependencies from this one), then `swin-train --help`."""
    venv = tmp_path / 'venv'
    # without its own pip and setuptools: this environment's (a venv seeds old ones) build and install
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip', str(venv)], check=True)
    bin_dir = venv / ('Scripts' if os.name == 'nt' else 'bin')
    install = subprocess.run([sys.executable, '-m', 'pip', '--python', str(bin_dir / 'python'), 'install', '--no-deps',
                              '--no-build-isolation', '--no-index', '-q', '-e', ROOT], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    result = subprocess.run([str(bin_dir / 'swin-train'), '--help'], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert '--cfg' in result.stdout and '--resume' in result.stdout
