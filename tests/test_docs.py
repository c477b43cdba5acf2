"""The commands of README.md and docs/*.md cannot rot: every ```bash block is run here.

A fenced block is either ```text (output, layout: no commands) or ```bash. A ```bash block runs,
line by line in one bash script (`set -e`), in a fresh directory per page, unless the line above
its fence says what it needs that a test machine lacks: ``<!-- needs: gpu -->`` (one of NEEDS).
Any other fence fails `test_every_block_is_run_or_says_what_it_needs`.

What the run changes, and nothing else (so a command that stops working fails here):
- tiny sizes: TINY_TRAIN is appended to every `sagan-dist train` / `sagan-launch local` run,
  TINY_EVAL to the overrides of every `evaluate` (e.g. 2 steps instead of 600);
- placeholders: the Inception file becomes a random network in torch-fidelity's format (no
  internet here), the MLflow addresses a real `mlflow server` on 127.0.0.1 started by the test
  (the documented `mlflow server ... &` line is that server), /tmp/ the page's directory, and fixed
  rendezvous ports free ones;
- a served model: `mlflow models serve ... &` gets a free port and its own session, which is ended
  with its block; `curl` retries until the server answers (it takes a while to start);
- `runs/demo`, which pages take from the demo, is a demo run made once (TINY_TRAIN) and copied in.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow_server import MlflowServer, free_port
from test_evaluation import inception_weights  # noqa: F401 - a fixture: random Inception weights

from sagan_dist import config_reference

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# What a ```bash block may need instead of being run here.
NEEDS = {
    "gpu": "a CUDA GPU (and, for the ImageNet configs, the shards)",
    "imagenet": "the ImageNet train tree or its shards",
    "hosts": "several hosts on one network",
    "cluster": "a Kubernetes cluster (kubectl, kustomize)",
    "docker": "a Docker daemon and a registry",
    "bench": "minutes of a quiet machine: a benchmark, whose figures BENCHMARKS.md records",
    "ci": "README's set-up commands: run by .ci/run, checked by test_the_setup_block_is_what_ci_runs",
}
TINY_TRAIN = "train.steps=2 train.batch_size=16 train.log_every=1 train.sample_every=2 train.checkpoint_every=2"
# 60 real images: enough of each class for `evaluate --classes` (it needs 2 of a class for its FID).
TINY_EVAL = ("eval.num_samples=12 eval.reference_samples=60 eval.batch_size=6 eval.class_samples=4 "
             "eval.isc_splits=2 eval.kid_subsets=2")
DEMO = ".venv/bin/sagan-dist train demo"  # what README's first command trains, after the set-up
INCEPTION = "/models/weights-inception-2015-12-05-6726825d.pth"
MLFLOW_URIS = ("http://127.0.0.1:5000", "https://mlflow.example.org")
NEEDS_MARK = re.compile(r"^<!-- needs: (\S+) -->$")
SERVE = re.compile(r"mlflow models serve .*--port (\d+).*&$")
CURL_WAIT = "curl --retry 300 --retry-connrefused --retry-delay 1 --retry-max-time 400 --fail "


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    info: str
    needs: str
    code: str

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, with the needs mark of the line above each."""
    lines, out, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            mark = NEEDS_MARK.match(lines[i - 1].strip()) if i else None
            out.append(Block(page, i + 1, fence[3:].strip(), mark.group(1) if mark else "",
                             "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return out


def commands(code: str) -> list[str]:
    """A block's commands: continuation lines joined, comments after a command removed."""
    joined = re.sub(r"\\\n\s*", "", code)
    return [re.sub(r"\s+#\s.*$", "", line).rstrip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def runnable(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.info == "bash" and not b.needs]


# ---- what every block is ------------------------------------------------------------------
def test_every_block_is_run_or_says_what_it_needs():
    bad = []
    for page in PAGES:
        for b in blocks(page):
            if b.info not in ("bash", "text"):
                bad.append(f"{b.where()}: fence '```{b.info}' is neither ```bash (a command, run by this test) "
                           "nor ```text (no command)")
            elif b.needs and (b.info != "bash" or b.needs not in NEEDS):
                bad.append(f"{b.where()}: 'needs: {b.needs}' must mark a ```bash block, with one of {sorted(NEEDS)}")
        stray = [n for n, line in enumerate(page.read_text().splitlines(), 1)
                 if line.strip().startswith("<!-- needs") and not NEEDS_MARK.match(line.strip())]
        bad += [f"{page.relative_to(REPO)}:{n}: malformed needs mark" for n in stray]
    assert not bad, "\n".join(bad)


def test_the_block_checker_catches_an_unmarked_fence_and_a_wrong_mark(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("```\nls\n```\n<!-- needs: gpu -->\n```bash\nnvidia-smi\n```\n<!-- needs: moon -->\n"
                    "```bash\nx\n```\n```text\nout\n```\n")
    found = [(b.info, b.needs) for b in blocks(page)]
    assert found == [("", ""), ("bash", "gpu"), ("bash", "moon"), ("text", "")]
    assert [b.line for b in runnable(page)] == []  # the marked ones are not run; "" is refused above


def test_the_setup_block_is_what_ci_runs():
    """README's two set-up commands: the second is .ci/run's line, the first its install and the demo."""
    (setup,) = [b for b in blocks(REPO / "README.md") if b.needs == "ci"]
    first, second = setup.code.splitlines()
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert second in ci_lines
    install = "python3.11 -m venv .venv && .venv/bin/pip install -q -e . && "
    assert second.startswith(install.replace("-e . ", "-e '.[test]' "))
    assert first == install + DEMO  # the demo itself runs (with TINY_TRAIN) in the page tests


def test_configuration_reference_is_generated_from_the_schema():
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == config_reference.reference(), \
        "docs/configuration.md is stale: python -m sagan_dist.config_reference > docs/configuration.md"


def test_the_reference_names_every_key_with_its_comment():
    from sagan_dist import config

    page = config_reference.reference()
    assert "| `train.collective_timeout_s` | `float` | `600.0` | Deadline of every collective:" in page
    assert "| `model.init` | `str` | `ortho` | ortho \\| normal \\| xavier |" in page
    assert "| `eval.metrics` | `list[str]` | `[isc, fid, kid, prc]` |" in page
    assert "| `engine` | `str` | `ddp` |" in page
    assert "&lt;run_dir&gt;" not in page and "&lt;run_dir>" in page  # a bare <run_dir> would vanish as HTML
    for section in ("model", "data", "train", "deepspeed", "tracking", "eval"):
        for key in getattr(config.Config(), section).__dataclass_fields__:
            assert f"| `{section}.{key}` |" in page


# ---- running the blocks ---------------------------------------------------------------------
def rewrite(command: str, subs: dict[str, str]) -> str:
    """One documented command as this test runs it: placeholders replaced, tiny sizes added."""
    if subs:  # in one pass: a replacement (a path under /tmp/) is not replaced again
        pattern = "|".join(re.escape(k) for k in sorted(subs, key=len, reverse=True))
        command = re.sub(pattern, lambda m: subs[m.group(0)], command)
    background = command.endswith("&")
    command = command.rstrip("& ")
    if command.startswith("curl "):  # a documented query of a server started just above: wait for it
        command = CURL_WAIT + command[len("curl "):]
    if re.search(r"sagan-dist train |sagan-launch local ", command) and "--print-command" not in command:
        command += " " + TINY_TRAIN
    elif " evaluate " in command:
        words = command.split(" ")
        at = words.index("evaluate")
        options = [i for i, w in enumerate(words) if i > at + 1 and w.startswith("--")]
        words.insert(options[0] if options else len(words), TINY_EVAL)
        command = " ".join(words)
    return command + (" &" if background else "")


def test_rewrite_adds_tiny_sizes_where_each_command_takes_them():
    subs = {INCEPTION: "/tmp/w.pth", "/tmp/": "/t/"}
    assert rewrite(".venv/bin/sagan-dist train demo train.run_dir=/tmp/a &", subs) == \
        f".venv/bin/sagan-dist train demo train.run_dir=/t/a {TINY_TRAIN} &"
    assert rewrite(f"sagan-dist evaluate runs/demo eval.inception_weights={INCEPTION} --classes 0,3", subs) == \
        f"sagan-dist evaluate runs/demo eval.inception_weights=/tmp/w.pth {TINY_EVAL} --classes 0,3"
    assert rewrite("sagan-dist evaluate runs/demo", {}) == f"sagan-dist evaluate runs/demo {TINY_EVAL}"
    printed = ".venv/bin/sagan-launch local --nproc 2 --print-command demo"
    assert rewrite(printed, {}) == printed
    sample = "sagan-dist sample runs/demo --out /tmp/s --n 2"
    assert rewrite(sample, subs) == sample.replace("/tmp/", "/t/")
    assert rewrite("curl -s http://127.0.0.1:5001/invocations", {}) == CURL_WAIT + "-s http://127.0.0.1:5001/invocations"


def test_a_served_model_gets_its_own_session_ended_with_its_block(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "REPO", tmp_path)  # where() names pages relative to it
    page = tmp_path / "p.md"
    page.write_text("```bash\nmlflow models serve -m m --port 5001 &\ncurl -s http://127.0.0.1:5001/ping\n```\n"
                    "```bash\necho next\n```\n")
    lines = script(page, {}).splitlines()
    serve = lines.index("setsid mlflow models serve -m m --port 5001 &")
    curl = CURL_WAIT + "-s http://127.0.0.1:5001/ping"
    assert lines[serve + 1:serve + 5] == ["server_0=$!", f"echo {shlex.quote('$ ' + curl)} | cut -c1-300", curl,
                                          "kill -- -$server_0; wait $server_0 || true"]
    assert lines.count("kill -- -$server_0; wait $server_0 || true") == 1  # the next block has no server


def script(page: Path, subs: dict[str, str]) -> str:
    lines, servers = ["set -euo pipefail"], []
    for b in runnable(page):
        lines.append(f"echo '>>> {b.where()}'")
        for c in commands(b.code):
            if re.search(r"mlflow server .*&$", c):  # the test's server stands in for this one
                continue
            lines += [f"echo {shlex.quote('$ ' + rewrite(c, subs))} | cut -c1-300", rewrite(c, subs)]
            if SERVE.search(c):  # a server never finishes: its own session, ended after the block
                lines[-1] = "setsid " + lines[-1]
                servers.append(f"server_{len(servers)}")
                lines.append(f"{servers[-1]}=$!")
        lines += [f"kill -- -${server}; wait ${server} || true" for server in servers]
        servers.clear()
        # A block's background commands (a second node) must finish, and succeed, with it.
        lines.append("for job in $(jobs -p); do wait $job; done")
    return "\n".join(lines) + "\n"


def env() -> dict[str, str]:
    # The repository on PYTHONPATH: `python -m launcher.export` and friends from any directory.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    # No MLFLOW_TRACKING_URI of the caller's: the pages say where their runs are tracked.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": path, "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1"}


def workdir(path: Path) -> Path:
    """A directory in which `.venv/bin/...` is this interpreter's environment, as in a checkout."""
    path.mkdir(parents=True, exist_ok=True)
    (path / ".venv").symlink_to(sys.prefix)
    (path / "tmp").mkdir()
    (path / "docs").mkdir()  # where sampling.md's record copies its picture
    return path


def run(cmd: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """README's demo with TINY_TRAIN: runs/demo and its MLflow store, copied into each page's directory."""
    cwd = workdir(tmp_path_factory.mktemp("demo"))
    done = run(f"{DEMO} {TINY_TRAIN}", cwd, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return cwd


RUN_PAGES = [p for p in PAGES if runnable(p)]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES, ids=[p.name for p in RUN_PAGES])
def test_the_commands_of_each_page_run(page, tmp_path, request, inception_weights):  # noqa: F811
    cwd = workdir(tmp_path / "page")
    text = "\n".join(c for b in runnable(page) for c in commands(b.code))
    first_demo = re.search(r"sagan-dist train demo(?![^\n]*train\.run_dir)", text)
    if "runs/demo" in text and (not first_demo or text.index("runs/demo") < first_demo.start()):
        demo = request.getfixturevalue("demo_run")
        shutil.copytree(demo / "runs", cwd / "runs")
        shutil.copy(demo / "mlflow.db", cwd / "mlflow.db")
    subs = {INCEPTION: str(inception_weights), "/tmp/": f"{cwd / 'tmp'}/"}
    for port in sorted(set(re.findall(r"127\.0\.0\.1:(29\d\d\d)", text))):
        subs[f"127.0.0.1:{port}"] = f"127.0.0.1:{free_port()}"
    for port in sorted({m.group(1) for m in map(SERVE.search, text.splitlines()) if m}):
        served = free_port()
        subs.update({f"127.0.0.1:{port}": f"127.0.0.1:{served}", f"--port {port}": f"--port {served}"})
    server = None
    if any(uri in text for uri in MLFLOW_URIS):
        server = MlflowServer(tmp_path / "mlflow").start()
        subs.update({uri: server.uri for uri in MLFLOW_URIS})
    try:
        done = run(script(page, subs), cwd, timeout=900)
    finally:
        if server is not None:
            server.stop()
    assert done.returncode == 0, f"{page.name}: a command failed\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
