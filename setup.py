"""Build the bridge's per-push bookkeeping with Cython where possible; everything else is in pyproject.toml.

``rsd_toolkit/bridges/_compiled.py`` lists the modules. Each ``.py`` stays the one source (Cython compiles
the Python as it is; the ``.pxd`` beside it types attributes, a few locals and small helpers), and a failed
build is not an error: the package then runs the Python (about 1.6x the CPU per push at batch 64:
``benchmarks/bench_compiled.py``). The build records the SHA-256 of each source it compiled, so that an
edited checkout that was not rebuilt runs its source, never a stale build.
"""

import json
import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
BRIDGES = HERE / "rsd_toolkit" / "bridges"
compiled = runpy.run_path(str(BRIDGES / "_compiled.py"))  # standard library only: no package import here


class BuildExtRecordingSources(build_ext):
    """``build_ext`` that writes, beside the built modules, the digest of the source each was built from."""

    def run(self):
        self._built = {}
        super().run()  # setuptools builds in build/ and then copies in place (editable installs)
        folders = {Path(self.get_ext_fullpath(name)).parent for name in self._built}  # where they are now
        digests = {name.rsplit(".", 1)[-1]: digest for name, digest in self._built.items()}
        for folder in folders:
            (folder / compiled["MANIFEST"]).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")

    def build_extension(self, ext):
        super().build_extension(ext)  # an optional extension that fails raises here and is not recorded
        self._built[ext.name] = compiled["source_digest"](BRIDGES / f"{ext.name.rsplit('.', 1)[-1]}.py")


def extensions():
    try:
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError as e:
        print(f"rsd_toolkit: Cython cannot be imported ({e}); the bridge runs as Python")
        return []
    exts = [Extension(f"rsd_toolkit.bridges.{m}", [f"rsd_toolkit/bridges/{m}.py"]) for m in compiled["MODULES"]]
    try:
        built = cythonize(
            exts,
            build_dir="build/cython",  # generated C stays out of the source tree
            # annotations are documentation here: typing from them would make `x: int` refuse a numpy integer
            compiler_directives={"language_level": 3, "annotation_typing": False},
            quiet=True,
        )
    except Exception as e:  # a Cython that cannot compile this source: the Python runs
        print(f"rsd_toolkit: Cython could not compile the bridge ({type(e).__name__}: {e}); it runs as Python")
        return []
    for ext in built:
        ext.optional = True  # a C compiler that fails: a warning, and the Python runs (cythonize drops the flag)
    return built


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtRecordingSources})
