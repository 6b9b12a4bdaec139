"""Packaging for the Comfy Registry and ComfyUI-Manager.

Mirrors what `comfy node validate` (comfy-cli 1.23, comfy_cli/registry/config_parser.py and
command/custom_nodes/command.py) and the Registry's published rules (docs.comfy.org/registry/
specifications) check in ``pyproject.toml``, plus what keeps an install safe: ``requirements.txt``
(what ComfyUI-Manager installs) and ``[project] dependencies`` (what the Registry publishes) agree,
neither can replace the user's torch, and no Python file runs eval/exec, pip or remote code.
comfy-cli's security step is `ruff check --select S102,S307,E702` (exec, eval, semicolons); the
source checks below cover the same rules with the standard library so CI needs no ruff.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
COMFY = PYPROJECT.get("tool", {}).get("comfy", {})
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", "node_modules", "build", "dist"}

#: comfy-cli's accepted classifier values (validate_and_extract_*_classifiers).
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal"}
#: comfy-cli's validate_version pattern for requires-comfyui and the frontend range.
COMFY_VERSION = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
#: Packages ComfyUI ships as a matching set for the user's GPU; a requirement on them can swap the build.
GPU_BUILDS = {"torch", "torchaudio", "xformers", "triton"}


def python_files() -> list[Path]:
    files = []
    for path in REPO.rglob("*.py"):
        if not SKIP_DIRS & set(path.relative_to(REPO).parts):
            files.append(path)
    return sorted(files)


def requirement_lines(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def normalized(requirement: str) -> str:
    """A requirement in canonical form: `Diffusers >= 0.37` and `diffusers>=0.37` compare equal."""
    req = Requirement(requirement)
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return f"{canonicalize_name(req.name)}{extras}{req.specifier}{marker}"


# -- [project] -------------------------------------------------------------------------------------


def test_name_follows_the_registry_rules():
    name = PROJECT["name"]
    assert len(name) < 100
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name), (
        f"{name!r}: letters, digits and single - _ . between them, starting with a letter")
    assert name == name.lower(), "the Registry compares names case-insensitively; keep it lowercase"
    assert "comfyui" not in name.lower() and not name.lower().startswith("comfy"), (
        "the Registry asks for names without 'ComfyUI' (comfy-cli strips comfy prefixes)")


def test_version_is_static_semver():
    assert "version" not in PROJECT.get("dynamic", [])
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), "X.Y.Z, as the Registry requires"


def test_description_license_and_python():
    assert PROJECT["description"].strip() and "\n" not in PROJECT["description"]
    license_ = PROJECT["license"]
    assert isinstance(license_, dict) and ("file" in license_ or "text" in license_), (
        'license = {file = "LICENSE"} or {text = "..."}: comfy-cli rejects a bare string')
    if "file" in license_:
        assert (REPO / license_["file"]).is_file()
    assert PROJECT.get("requires-python", "").startswith(">=")


def test_urls():
    urls = PROJECT["urls"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", urls["Repository"])
    unknown = set(urls) - {"Repository", "Homepage", "Documentation", "Issues"}
    assert not unknown, f"the Registry reads only Repository/Homepage/Documentation/Issues, not {sorted(unknown)}"
    for value in urls.values():
        assert value.startswith("https://")


def test_classifiers_are_ones_the_registry_understands():
    for classifier in PROJECT.get("classifiers", []):
        if classifier.startswith("Operating System :: "):
            assert classifier.removeprefix("Operating System :: ").startswith(OS_PREFIXES), classifier
        if classifier.startswith("Environment ::"):
            assert classifier.removeprefix("Environment :: ") in ACCELERATORS, classifier
    if "requires-comfyui" in COMFY:
        for part in COMFY["requires-comfyui"].split(","):
            assert COMFY_VERSION.match(part.strip()), COMFY["requires-comfyui"]


# -- [tool.comfy] ----------------------------------------------------------------------------------


def test_tool_comfy():
    assert re.fullmatch(r"[a-z][a-z0-9-]*", COMFY["PublisherId"]), "publisher ids are lowercase, digits and -"
    assert COMFY["DisplayName"].strip()
    for include in COMFY.get("includes", []):
        assert (REPO / include).exists(), f"[tool.comfy] includes {include}, which does not exist"


def test_icon_is_in_the_repository_and_square():
    from PIL import Image

    icon = COMFY["Icon"]
    repo = PROJECT["urls"]["Repository"].removeprefix("https://github.com/")
    match = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(repo)}/[\w.-]+/(.+)", icon)
    assert match, f"Icon should be a raw URL of this repository ({repo}), got {icon}"
    path = REPO / match.group(1)
    assert path.is_file(), f"Icon points at {match.group(1)}, which is not in the repository"
    with Image.open(path) as image:
        assert image.format in ("PNG", "JPEG", "GIF", "WEBP")
        assert image.width == image.height >= 200, f"icon is {image.size}; the Registry shows a square"


# -- dependencies ----------------------------------------------------------------------------------


def test_requirements_and_dependencies_agree():
    """ComfyUI-Manager installs requirements.txt; the Registry publishes [project] dependencies."""
    assert "dependencies" not in PROJECT.get("dynamic", []), "the Registry needs static dependencies"
    from_pyproject = {normalized(r) for r in PROJECT["dependencies"]}
    from_requirements = {normalized(r) for r in requirement_lines(REPO / "requirements.txt")}
    assert from_pyproject == from_requirements, (
        f"only in pyproject: {sorted(from_pyproject - from_requirements)}; "
        f"only in requirements.txt: {sorted(from_requirements - from_pyproject)}"
    )


def test_requirements_cannot_replace_the_users_torch():
    for source, lines in (("requirements.txt", requirement_lines(REPO / "requirements.txt")),
                          ("pyproject dependencies", PROJECT["dependencies"])):
        for line in lines:
            assert not line.startswith(("-", "git+", "http:", "https:")), (
                f"{source}: {line!r}: no pip options, indexes, URLs or nested files (Manager runs pip install -r)")
            try:
                req = Requirement(line)
            except InvalidRequirement as exc:
                pytest.fail(f"{source}: {line!r} is not a requirement: {exc}")
            name = canonicalize_name(req.name)
            assert name not in GPU_BUILDS, f"{source}: {line!r} could replace ComfyUI's CUDA/ROCm/MPS torch"
            if name == "torchvision":
                assert not str(req.specifier), f"{source}: pin torchvision and pip swaps torch with it"
            assert req.url is None


def test_diffusers_floor_runs_edit_2511():
    """diffusers < 0.37 ignores 2511's zero_cond_t (silently wrong edits): the floor must stay."""
    [req] = [Requirement(r) for r in PROJECT["dependencies"] if canonicalize_name(Requirement(r).name) == "diffusers"]
    assert not req.specifier.contains("0.36.0") and req.specifier.contains("0.37.0")


# -- source ----------------------------------------------------------------------------------------


def _pip_in_strings(node: ast.AST) -> bool:
    strings = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    joined = " ".join(strings)
    return bool(re.search(r"\bpip\b", joined) and re.search(r"\binstall\b", joined)) or \
        any(s == "pip" for s in strings) and any(s == "-m" for s in strings)


def source_problems(path: Path) -> list[str]:
    """eval/exec (S307/S102), `;` between statements (E702), running pip, trust_remote_code=True."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    where = path.relative_to(REPO)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                problems.append(f"{where}:{node.lineno}: {func.id}()")
            dotted = ast.unparse(func)
            runs_process = dotted.split(".")[0] in ("subprocess", "os") and dotted.split(".")[-1] in (
                "run", "call", "check_call", "check_output", "Popen", "system", "popen", "execv", "execvp", "spawnv")
            if runs_process and _pip_in_strings(node):
                problems.append(f"{where}:{node.lineno}: runs pip ({dotted})")
            if dotted in ("pip.main", "pip._internal.main"):
                problems.append(f"{where}:{node.lineno}: {dotted}()")
            for keyword in node.keywords:
                if keyword.arg == "trust_remote_code" and not (
                        isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                    problems.append(f"{where}:{node.lineno}: trust_remote_code={ast.unparse(keyword.value)}")
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and not (
                        isinstance(value, ast.Constant) and value.value is False):
                    problems.append(f"{where}:{node.lineno}: 'trust_remote_code': {ast.unparse(value)}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m == "pip" or m.startswith("pip.") for m in modules):
                problems.append(f"{where}:{node.lineno}: imports pip")
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.OP and token.string == ";":
            problems.append(f"{where}:{token.start[0]}: ';' between statements (ruff E702)")
    return problems


def test_no_eval_exec_pip_or_remote_code_anywhere():
    files = python_files()
    assert REPO / "cli.py" in files and REPO / "__init__.py" in files
    problems = [p for path in files for p in source_problems(path)]
    assert problems == []


def test_the_source_check_catches_what_it_should(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import subprocess, sys\n"
        "eval('1')\n"
        "exec('x = 1')\n"
        "subprocess.run([sys.executable, '-m', 'pip', 'install', 'foo'])\n"
        "subprocess.check_call('pip install foo', shell=True)\n"
        "f(trust_remote_code=True)\n"
        "kwargs = {'trust_remote_code': True}\n"
        "a = 1; b = 2\n"
    )
    found = "\n".join(source_problems(bad))
    for needle in ("eval()", "exec()", "runs pip (subprocess.run)", "runs pip (subprocess.check_call)",
                   "trust_remote_code=True", "'trust_remote_code': True", "';' between statements"):
        assert needle in found, needle
    good = tmp_path / "good.py"
    good.write_text(
        "import subprocess, sys\n"
        "message = 'Run: pip install -U diffusers'\n"
        "spec.loader.exec_module(module)\n"
        "subprocess.run([sys.executable, '-c', 'print(1)'])\n"
        "f(trust_remote_code=False)\n"
        "code = 'a = 1; b = 2'\n"
    )
    assert source_problems(good) == []


@pytest.mark.slow
def test_bitsandbytes_optional_kernel_warning_is_silenced_once_the_pack_is_loaded():
    """bitsandbytes warns at import that it cannot fetch an optional CPU kernel: noise on every path."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, '.'); from cli import load_pack; import importlib; "
            "p = load_pack(); importlib.import_module(p.__name__ + '.loaders.pipeline'); import bitsandbytes")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "kernels-community" not in result.stderr
