"""The optional C part of netprobe: the echo server's raw echo (netprobe/_pump.c, Linux).

Everything else is in pyproject.toml. Without a C compiler (or off Linux) the build goes on
without it and the echo server keeps its portable path (netprobe/server.py, _PUMP).
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform == "linux":
    ext_modules.append(
        Extension(
            "netprobe._pump",
            ["netprobe/_pump.c"],
            optional=True,  # a failed compile is a warning: the portable path serves
            extra_compile_args=["-O2"],
        )
    )

setup(ext_modules=ext_modules)
