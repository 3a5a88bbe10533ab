"""Fault injection into Ray Train workers, from outside the library.

plora_ray has no hook for tests. A test that must stop or kill a worker at a known step wraps
``plora_ray.run.loop.fit`` inside the worker processes, so that ``fault(rec, rank)`` runs after
every step, before the run's own step callback (rank 0's MLflow logger). It gets in through
Python's or Ray's own start-up mechanisms:

* a local cluster: ``ray.init(runtime_env={"worker_process_setup_hook": partial(install, fault)})``
* the nodes of tests/multinode.py: their ``PYTHONPATH`` names ``tests/faults_site``, whose
  ``sitecustomize`` installs ``$PLORA_TEST_STEP_FAULT`` (``module:function``) in every process
  the node starts.

Until ``plora_ray.run.loop`` is imported nothing is loaded: a finder waits for it, wraps ``fit``
right after the module runs (before ``from plora_ray.run.loop import fit`` binds it) and leaves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys

LOOP = "plora_ray.run.loop"
ENV = "PLORA_TEST_STEP_FAULT"


def _wrap(loop, fault) -> None:
    fit = loop.fit

    def fit_with_fault(run, on_step=None, **kwargs):
        def step(rec):
            fault(rec, run.rank)
            if on_step:
                on_step(rec)

        return fit(run, on_step=step, **kwargs)

    loop.fit = fit_with_fault


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, fault):
        self.fault = fault

    def find_spec(self, name, path, target=None):
        if name != LOOP:
            return None
        sys.meta_path.remove(self)  # once: the next lookup is the real one
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_then_wrap(module):
            exec_module(module)
            _wrap(module, self.fault)

        spec.loader.exec_module = exec_then_wrap
        return spec


def install(fault) -> None:
    """``fault(rec, rank)`` after every step of every run this process trains."""
    if LOOP in sys.modules:
        _wrap(sys.modules[LOOP], fault)
    else:
        sys.meta_path.insert(0, _AfterImport(fault))


def install_from_env() -> None:
    spec = os.environ.get(ENV)
    if spec:
        module, _, name = spec.partition(":")
        install(getattr(importlib.import_module(module), name))
