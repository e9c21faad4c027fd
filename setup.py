"""Builds the C++ extension ``fastopd._C`` (batched ragged BIC scan) with pybind11."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "fastopd._C",
        ["csrc/bic_scan.cpp"],
        cxx_std=17,
        # -ffp-contract=off: no fused multiply-add, so the scan is bit-for-bit the Python reference.
        extra_compile_args=["-O3", "-ffp-contract=off", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
