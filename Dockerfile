# sagan-dist: one image for the trainers (k8s/overlays, `sagan-launch k8s`) and the MLflow server
# (k8s/platform).
#
#   docker build -t REGISTRY/sagan-dist:0.1.0 .
#   docker run --rm REGISTRY/sagan-dist:0.1.0 train demo train.steps=20 train.run_dir=/tmp/demo
#
# Base: PyTorch's own CUDA runtime image, at the torch version pyproject.toml pins (2.14.1), so
# the CUDA build of torch comes from the base and pip never has to fetch one. CUDA 12.6 runs on
# older drivers than CUDA 13 (>= 525 with minor-version compatibility, versus >= 580); on
# Blackwell GPUs build with --build-arg BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.2-cudnn9-runtime.
# For reproducible builds pin the digest too (BASE_IMAGE=pytorch/pytorch:<tag>@sha256:...).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/etc/sagan-dist/constraints.txt \
    DS_BUILD_OPS=0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Keep the base image's torch. Its versions (torch, torchvision, triton, the nvidia-* CUDA
# wheels) become pip constraints, applied to every pip install below and after (PIP_CONSTRAINT):
# a requirement that wanted another torch now fails the build, instead of pip quietly replacing
# the CUDA build with a different wheel from PyPI. This also makes a base whose torch differs
# from pyproject's pin fail here, with pip naming both versions.
RUN mkdir -p /etc/sagan-dist \
 && python -c "import importlib.metadata as m; \
keep = lambda n: n in {'torch', 'torchvision', 'torchaudio', 'triton'} or n.startswith('nvidia-'); \
pins = sorted({f\"{d.metadata['Name']}=={d.version}\" for d in m.distributions() if keep(d.metadata['Name'].lower())}); \
print('\n'.join(pins))" > /etc/sagan-dist/constraints.txt \
 && grep -q '^torch==' /etc/sagan-dist/constraints.txt

WORKDIR /opt/sagan-dist

# Dependencies first, from pyproject.toml alone, so that code changes do not reinstall them.
# DS_BUILD_OPS=0: DeepSpeed's CUDA ops are not compiled (the runtime image has no nvcc).
# psycopg2 lets the MLflow server use Postgres (k8s/platform-postgres).
# (README.md stays out: setuptools builds without it, and the image has no use for it.)
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt psycopg2-binary==2.9.13 \
 && rm /tmp/requirements.txt

# The package itself, installed the way users install it: pip builds a wheel from the sources
# and installs it into site-packages (configs/ inside it, as sagan_dist.configs); the sources are
# then deleted, so the image runs exactly what the wheel holds. --no-deps: everything is installed
# above; nothing here may touch torch.
COPY setup.py ./
COPY configs ./configs
COPY launcher ./launcher
COPY sagan_dist ./sagan_dist
RUN pip install --no-cache-dir --no-deps /opt/sagan-dist \
 && find /opt/sagan-dist -mindepth 1 -delete

# Non-root; the manifests run as this uid/gid (runAsUser/fsGroup 10001), which is not taken by
# the base image's users (Ubuntu images ship uid 1000).
RUN groupadd --gid 10001 sagan \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin sagan
USER 10001:10001
ENV HOME=/home/sagan
# Relative run directories (runs/demo) land in the user's home, which is writable.
WORKDIR /home/sagan
# As that user, outside any source tree: the installed package, its shipped configs, the CUDA torch.
RUN python -c "import torch, sagan_dist.cli, launcher.cli; from sagan_dist.config import CONFIG_DIR; \
assert 'site-packages' in str(CONFIG_DIR) and (CONFIG_DIR / 'demo.yaml').is_file(), CONFIG_DIR; \
assert torch.version.cuda, 'torch is not the CUDA build of the base image'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'configs', CONFIG_DIR)"

ENTRYPOINT ["sagan-dist"]
CMD ["--help"]
