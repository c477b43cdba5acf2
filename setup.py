"""Which packages the distribution holds; everything else about it is in pyproject.toml.

The packages are found, not listed: a subpackage added under sagan_dist/ or launcher/ (with or
without an ``__init__.py``) ships without anyone remembering to name it. configs/ ships inside the
package as ``sagan_dist.configs``, so a regular (non-editable) install finds the shipped YAML files
(config.CONFIG_DIR). tests/test_install.py builds the wheel and checks both.
"""
from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["sagan_dist", "sagan_dist.*", "launcher", "launcher.*"]),
              "sagan_dist.configs"],
    package_dir={"sagan_dist.configs": "configs"},
    package_data={"sagan_dist.configs": ["*.yaml"]},
)
