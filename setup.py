"""The one compiled part of rlsubnet: the 16-bit probe pass (``src/rlsubnet/analysis/_native.c``).

Everything else is in pyproject.toml. The extension is optional: where it cannot be built (no C compiler), rlsubnet
installs without it and uses its numpy probes, with the same answers.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rlsubnet.analysis._native",
            ["src/rlsubnet/analysis/_native.c"],
            extra_compile_args=["-O3", "-fno-strict-aliasing", "-Wall"],
            optional=True,
        )
    ]
)
