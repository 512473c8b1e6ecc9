"""The codebase's own rules: small functions and files, and an install that claims no generic top-level names."""
import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from conftest import ROOT

MAX_PARAMETERS = 8    # outside models/, whose constructors keep the official signatures
MAX_LINES = 450       # outside models/ and tests/


def git_files():
    """The repository's files as git sees them (tracked, and untracked ones it does not ignore): a `build/` or
    `output/` left by pip or a run is not the codebase."""
    listed = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split('\0')
    return [rel for rel in listed if rel and os.path.isfile(os.path.join(ROOT, rel))]


def source_files(skip):
    # shared/ holds other projects' files for the GPU check (the official model), never ours
    for rel in git_files():
        if rel.endswith('.py') and rel.split('/')[0] not in set(skip) | {'shared'}:
            yield os.path.join(ROOT, rel)


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


def top_level_names():
    """The importable names the repository root holds: its modules and packages."""
    entries = os.listdir(ROOT)
    return sorted({name[:-3] for name in entries if name.endswith('.py')}
                  | {name for name in entries if os.path.isfile(os.path.join(ROOT, name, '__init__.py'))})


def copy_of_the_tree(destination):
    """The repository's files copied elsewhere, so that a build leaves the repository as it is."""
    for rel in git_files():
        os.makedirs(os.path.dirname(os.path.join(destination, rel)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(destination, rel))
    return destination


@pytest.mark.slow
@pytest.mark.parametrize('editable', [False, True], ids=['install', 'editable'])
def test_installing_the_project_claims_no_top_level_names(tmp_path, editable):
    """`pip install .` and `pip install -e .` into a fresh virtual environment: from another folder, `import utils`,
    `import config`, `import models`, ... find nothing of this project (the repository is what users run)."""
    source = copy_of_the_tree(tmp_path / 'swin-train')
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    python = str(venv / ('Scripts' if os.name == 'nt' else 'bin') / 'python')
    # pip and setuptools come from this environment (requirements-dev.txt), on PYTHONPATH for the install only:
    # nothing from outside the project's requirements, and no index needed
    tools = sysconfig.get_paths()['purelib']
    install = subprocess.run([python, '-m', 'pip', 'install', '--no-deps', '--no-build-isolation', '--no-index', '-q',
                              *(['-e'] if editable else []), str(source)],
                             env={**os.environ, 'PYTHONPATH': tools}, capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    probe = ("import importlib.metadata, importlib.util, json, sys\n"
             "names = json.loads(sys.argv[1])\n"
             "found = {n: getattr(importlib.util.find_spec(n), 'origin', None) for n in names}\n"
             "print(json.dumps({'version': importlib.metadata.version('swin-train'),\n"
             "                  'found': {n: o for n, o in found.items() if importlib.util.find_spec(n)}}))")
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    result = subprocess.run([python, '-c', probe, json.dumps(top_level_names())], cwd=elsewhere, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report['version']  # the distribution is installed ...
    assert report['found'] == {}, report['found']  # ... and none of utils, config, models, data, ... resolves


def readme_commands():
    """The commands of the README's fenced bash blocks, in order."""
    with open(os.path.join(ROOT, 'README.md')) as f:
        blocks = f.read().split('```bash\n')[1:]
    return [block.split('```')[0].strip() for block in blocks]


def test_ci_runs_exactly_the_readmes_test_command_in_a_fresh_venv():
    with open(os.path.join(ROOT, '.ci', 'run')) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    test_command = readme_commands()[1]
    assert test_command.startswith('pip install -r requirements.txt -r requirements-dev.txt && ')
    assert lines[-1] == test_command  # the last thing CI does, word for word
    venv = lines.index('python3 -m venv "$scratch/venv"')
    assert lines[venv + 1] == '. "$scratch/venv/bin/activate"'  # ... with the new environment's pip and python
    assert 'scratch="$(mktemp -d)"' in lines[:venv]
