"""Packaging shim for Apache Beam workers and containers: ``--setup_file=./setup.py``.

All metadata and dependencies live in ``pyproject.toml``; this file only adds
the shipped YAML configs (``configs/``) as the data-only package
``drivevla_configs`` so a wheel -- and hence a Dataflow / Flink worker, which
installs this project from the sdist Beam builds with
``python setup.py sdist`` -- finds ``extract``'s default configs
(``pipelines/resources.py``). See README "Running on a cluster".
"""

from setuptools import find_namespace_packages, find_packages, setup

PACKAGES = find_packages(include=["pipelines*", "tokenizer*", "annotators*", "schemas*", "training*"])
# configs/ and its sub-folders (extract/, train/) as drivevla_configs[.extract|.train]
CONFIG_PACKAGES = ["drivevla_configs"] + [f"drivevla_configs.{p}" for p in find_namespace_packages(where="configs")]

setup(
    packages=PACKAGES + CONFIG_PACKAGES,
    package_dir={"drivevla_configs": "configs"},
    package_data={"": ["*.yaml", "*.json", "*.txt"]},
    include_package_data=True,
)
