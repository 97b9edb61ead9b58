"""Build of the optional compiled fast path of ingest (everything else is in pyproject.toml).

``npcalls.ingest._scan`` is a small C extension (plain CPython API, no numpy
headers).  It is optional: without a C compiler or Python headers the build
goes on without it and ``npcalls.ingest.acc`` uses its numpy path, which gives
the same results, more slowly.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "npcalls.ingest._scan",
            sources=["npcalls/ingest/_scan.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
    ],
)
