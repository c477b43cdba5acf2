"""A regular install, as a user makes one: the sdist and the wheel built from the checkout, the wheel
installed (not editable) into a fresh venv, and the commands run from a folder outside the checkout.

The fresh venv gets the wheel and nothing else of ours; its third-party dependencies (torch,
DeepSpeed, MLflow: minutes and gigabytes to install again) come from the venv running the tests,
through a ``.pth`` line that puts that venv's site-packages on ``sys.path`` *after* the fresh one's.
That line does not run the ``.pth`` files it finds there, so the editable install of the test venv
(a meta-path finder started from a ``.pth``) stays out: every ``sagan_dist`` and ``launcher``
module must come from the wheel, which each test checks. PYTHONPATH is removed for the same reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=8",
        "train.log_every=1", "train.sample_every=2", "train.checkpoint_every=2", "train.steps=2"]

pytestmark = pytest.mark.slow


def checkout_files() -> list[str]:
    """What a clone holds (tracked, plus new files not yet committed that git does not ignore)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode()
    return sorted(f for f in out.split("\0") if f and (ROOT / f).is_file())


def shipped(files: list[str]) -> set[str]:
    """Where each module and shipped config of the checkout belongs inside the wheel."""
    wanted = {f for f in files if f.endswith(".py") and f.split("/")[0] in ("sagan_dist", "launcher")}
    return wanted | {"sagan_dist/" + f for f in files if f.startswith("configs/") and f.endswith(".yaml")}


@dataclass
class Install:
    files: list[str]  # the checkout's
    sdist: Path
    wheel: Path
    venv: Path
    outside: Path  # the working directory of every command: no checkout in it or above it

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return {**env, "PATH": f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}

    def run(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin" / argv[0]), *argv[1:]], cwd=self.outside, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def install(tmp_path_factory) -> Install:
    root = tmp_path_factory.mktemp("install")
    files = checkout_files()
    src = root / "src"  # a copy: building writes build/ and *.egg-info into the source tree
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    # python -m build: the sdist first, then the wheel from the unpacked sdist (so a file the sdist
    # forgets fails the wheel too); --no-isolation builds with this venv's setuptools, offline.
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(root / "dist"), str(src)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [sdist], [wheel] = sorted((root / "dist").glob("*.tar.gz")), sorted((root / "dist").glob("*.whl"))

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    fresh = subprocess.run([str(venv / "bin" / "python"), "-c", purelib], capture_output=True, text=True,
                           check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(fresh) / "test-venv-dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                                "--no-deps", "--no-index", "--no-cache-dir", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    outside = root / "elsewhere"
    outside.mkdir()
    return Install(files, sdist, wheel, venv, outside)


def test_the_wheel_and_the_sdist_hold_every_module_and_the_shipped_configs(install):
    in_wheel = set(zipfile.ZipFile(install.wheel).namelist())
    want = shipped(install.files)
    assert {"sagan_dist/tracking/tracker.py", "sagan_dist/evaluation/command.py",
            "sagan_dist/configs/demo.yaml"} <= want  # the two subpackages a hand-written list forgot
    assert not want - in_wheel, sorted(want - in_wheel)
    with tarfile.open(install.sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert not {f for f in install.files if f.split("/")[0] in ("sagan_dist", "launcher", "configs")} - in_sdist


def test_every_installed_module_imports_from_the_wheel_outside_the_checkout(install):
    modules = sorted(f.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                     for f in shipped(install.files) if f.endswith(".py"))
    code = ("import importlib, sys\n"
            f"site = {str(install.venv)!r}\n"
            "for name in sys.argv[1:]:\n"
            "    path = importlib.import_module(name).__file__\n"
            "    assert path.startswith(site), (name, path)\n"
            "from sagan_dist.config import CONFIG_DIR\n"
            "assert str(CONFIG_DIR).startswith(site) and (CONFIG_DIR / 'demo.yaml').is_file(), CONFIG_DIR\n"
            "print(len(sys.argv) - 1, 'modules from', site)\n")
    result = install.run("python", "-c", code, *modules)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(modules)} modules from" in result.stdout


def test_the_installed_commands_train_the_demo_and_start_the_launcher_outside_the_checkout(install):
    run_dir = install.outside / "runs" / "demo"
    train = install.run("sagan-dist", "train", "demo", *TINY, f"train.run_dir={run_dir}",
                        f"tracking.uri=sqlite:///{install.outside / 'mlflow.db'}")
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "step 2/2" in train.stdout
    assert (run_dir / "checkpoints" / "step-00000002" / "state.pt").is_file()
    for argv in (["sagan-launch", "--help"], ["sagan-dist", "evaluate", "--help"], ["sagan-dist", "sync", "--help"],
                 ["sagan-dist", "make-shards", "--help"]):
        result = install.run(*argv, timeout=300)
        assert result.returncode == 0 and "usage:" in result.stdout, (argv, result.stderr[-3000:])
