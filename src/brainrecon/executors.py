"""Executors for independent decoding tasks: in this process, local processes, or Dask.

An executor is anything with ``map(fn, *iterables)`` returning the results in order.
:func:`make_executor` builds one from a short spec (the ``executor`` key of a run config):

- ``local`` (default): tasks run one after the other in this process (BLAS uses all cores);
- ``processes:N``: a pool of N local processes;
- ``dask``: a ``dask.distributed.LocalCluster`` on this machine;
- ``dask:ADDRESS``: an existing Dask scheduler, e.g. ``dask:tcp://10.0.0.5:8786``;
- ``dask-jobqueue:CLASS`` with ``options``: a dask-jobqueue cluster, e.g. ``dask-jobqueue:SLURMCluster``
  with ``{"cores": 8, "memory": "32GB", "jobs": 10}`` (``jobs``: how many to start).

Tasks read their inputs from and write their results to files, so the run folder must be on a
file system the workers share.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor


class DaskExecutor:
    """``map`` over a ``dask.distributed.Client``; results yielded in task order."""

    def __init__(self, client, owns_cluster=None):
        self.client = client
        self._cluster = owns_cluster

    def map(self, fn, *iterables):
        futures = self.client.map(fn, *iterables, pure=False)
        for fut in futures:
            yield fut.result()

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


class ProcessExecutor:
    """``map`` over a pool of local processes."""

    def __init__(self, workers: int):
        self.pool = ProcessPoolExecutor(workers)

    def map(self, fn, *iterables):
        return self.pool.map(fn, *iterables)

    def close(self) -> None:
        self.pool.shutdown()


def _dask():
    try:
        import dask.distributed as dd
    except ImportError as err:
        raise ValueError("the Dask executor needs dask.distributed: pip install 'brainrecon[dask]'") from err
    return dd


EXECUTOR_SPECS = "local, processes:N, dask, dask:ADDRESS or dask-jobqueue:CLASS"


def check_spec(spec: str | None) -> str:
    """``spec`` if it names an executor whose packages are installed; raises ValueError (saying
    what to write or install) otherwise. Starts nothing: runs check this before any work."""
    import importlib.util

    kind, sep, arg = (spec or "local").partition(":")
    if kind == "local" and not sep:
        return spec or "local"
    if kind == "processes":
        if not (arg.isdigit() and int(arg) >= 1) and arg:
            raise ValueError(f"executor {spec!r}: write processes:N with N the number of processes (1 or more)")
        return spec
    if kind in ("dask", "dask-jobqueue"):
        if importlib.util.find_spec("dask") is None or importlib.util.find_spec("distributed") is None:
            raise ValueError(f"executor {spec!r} needs dask.distributed: pip install 'brainrecon[dask]'")
        if kind == "dask-jobqueue":
            if not arg:
                raise ValueError(f"executor {spec!r}: name the cluster class, e.g. dask-jobqueue:SLURMCluster")
            if importlib.util.find_spec("dask_jobqueue") is None:
                raise ValueError(f"executor {spec!r} needs dask-jobqueue: pip install dask-jobqueue")
        return spec
    raise ValueError(f"unknown executor {spec!r}: use {EXECUTOR_SPECS}")


def make_executor(spec: str | None = "local", options: dict | None = None):
    """An executor for ``spec`` (see the module docstring); None means in-process."""
    options = dict(options or {})
    check_spec(spec)
    kind, _, arg = (spec or "local").partition(":")
    if kind == "local":
        return None
    if kind == "processes":
        return ProcessExecutor(int(arg or 2))
    if kind == "dask":
        dd = _dask()
        if arg:
            return DaskExecutor(dd.Client(arg))
        cluster = dd.LocalCluster(n_workers=options.pop("n_workers", 2), threads_per_worker=options.pop("threads", 1),
                                  processes=options.pop("processes", True), dashboard_address=None, **options)
        return DaskExecutor(dd.Client(cluster), owns_cluster=cluster)
    if kind == "dask-jobqueue":
        dd = _dask()
        try:
            import dask_jobqueue
        except ImportError as err:
            raise ValueError("executor dask-jobqueue needs dask-jobqueue: pip install dask-jobqueue") from err
        cls = getattr(dask_jobqueue, arg, None)
        if cls is None:
            raise ValueError(f"dask-jobqueue has no cluster class {arg!r} (e.g. SLURMCluster, PBSCluster, SGECluster)")
        jobs = options.pop("jobs", 1)
        cluster = cls(**options)
        cluster.scale(jobs=jobs)
        return DaskExecutor(dd.Client(cluster), owns_cluster=cluster)
    raise ValueError(f"unknown executor {spec!r}: use {EXECUTOR_SPECS}")
