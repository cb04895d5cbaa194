"""The one compiled part: svcproxy/ipvs/_nlfast.c, the netlink encoder's hot loop.

Metadata stays in setup.cfg. The extension is optional: where it does not build (no C
compiler), the package installs without it and nlcodec encodes in Python, slower
(tests/test_nlfast.py says which one is in use).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "svcproxy.ipvs._nlfast",
            ["svcproxy/ipvs/_nlfast.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ],
)
