"""Carries the C++/CUDA sources of `custom_ops/` into the wheel.

`custom_ops/` is the repository's home of the op sources. A regular (non-editable) build
copies its sources into the package as `tf_proxynorm/fused/custom_ops/`, where the first use
of the fused op (or `python -m tf_proxynorm.build`) compiles them into the per-user cache.
An editable install builds from the checkout's `custom_ops/` directly. The sdist carries
`custom_ops/` through MANIFEST.in. Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SOURCES = ROOT / "custom_ops"
SUFFIXES = {".cc", ".h", ".cu", ".cuh", ".py", ".md"}
TARGET = Path("tf_proxynorm", "fused", "custom_ops")


def _op_sources():
    return sorted(p for p in SOURCES.rglob("*")
                  if p.is_file() and (p.suffix in SUFFIXES or p.name == "Makefile")
                  and "__pycache__" not in p.parts)


class BuildPyWithOpSources(build_py):
    """build_py that also copies the op sources into the built package."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        if not SOURCES.is_dir():
            raise RuntimeError(f"the op sources are missing: {SOURCES}")
        for path in _op_sources():
            target = Path(self.build_lib) / TARGET / path.relative_to(SOURCES)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs += [str(Path(self.build_lib) / TARGET / p.relative_to(SOURCES))
                        for p in _op_sources()]
        return outputs


setup(cmdclass={"build_py": BuildPyWithOpSources})
