"""How many processes a job has and how many sit on each node, from the launcher's environment
(torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE, Slurm's SLURM_NNODES / SLURM_GPUS_ON_NODE) or the
explicit --world-size / --nproc-per-node fields."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from megatron_code.errors import ConfigError
from megatron_code.training.config import LaunchConfig


@dataclass(frozen=True)
class JobWorld:
    """The processes of one job as a dry run plans them."""

    world_size: int
    """Processes in the job."""
    nproc_per_node: int
    """Processes per node (torchrun gives node n the global ranks n x this ... (n + 1) x this - 1)."""
    source: str
    """Where the two numbers came from, for the dry run's printout."""

    @property
    def nnodes(self) -> int:
        return self.world_size // self.nproc_per_node


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: expected a positive integer.") from None
    if number < 1:
        raise ConfigError(f"environment variable {name}={value!r}: expected a positive integer.")
    return number


def _check_positive(launch: LaunchConfig) -> None:
    for name in ("world_size", "nproc_per_node"):
        value = getattr(launch, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")


def launched_world_size(launch: LaunchConfig, environ: Mapping[str, str]) -> int:
    """World size of a real run: torchrun's WORLD_SIZE (1 without torchrun). An explicit
    --world-size or --nproc-per-node must agree with what the launcher started."""
    _check_positive(launch)
    world_size = _env_int(environ, "WORLD_SIZE") or 1
    local = _env_int(environ, "LOCAL_WORLD_SIZE") or world_size
    for name, given, actual in (("world-size", launch.world_size, world_size),
                                ("nproc-per-node", launch.nproc_per_node, local)):
        if given is not None and given != actual:
            raise ConfigError(
                f"--{name} {given} but the launcher started {actual} "
                f"({'$WORLD_SIZE' if name == 'world-size' else '$LOCAL_WORLD_SIZE'}); these flags "
                "plan a layout with --dry-run. Drop the flag or launch that many processes."
            )
    return world_size


def planned_world(launch: LaunchConfig, environ: Mapping[str, str]) -> JobWorld:
    """World size and processes per node for a dry run. Precedence: the explicit fields, then
    torchrun's variables, then Slurm's (nodes x GPUs per node); a lone count puts every process
    on one node, and nothing at all means one process."""
    _check_positive(launch)
    nproc, nproc_from = launch.nproc_per_node, "--nproc-per-node"
    if nproc is None:
        nproc, nproc_from = _env_int(environ, "LOCAL_WORLD_SIZE"), "$LOCAL_WORLD_SIZE"
    if nproc is None:
        nproc, nproc_from = _env_int(environ, "SLURM_GPUS_ON_NODE"), "$SLURM_GPUS_ON_NODE"
    world, world_from = launch.world_size, "--world-size"
    if world is None:
        world, world_from = _env_int(environ, "WORLD_SIZE"), "$WORLD_SIZE"
    nnodes = _env_int(environ, "SLURM_NNODES")
    if world is None and nnodes is not None and nproc is not None:
        world, world_from = nnodes * nproc, f"$SLURM_NNODES ({nnodes}) x {nproc_from}"
    if world is None:
        world, world_from = nproc or 1, f"{nproc_from} (one node)" if nproc else "default (one process)"
    if nproc is None:
        nproc, nproc_from = world, "one node"
    if world % nproc:
        raise ConfigError(
            f"world size {world} ({world_from}) is not a multiple of {nproc} processes per node "
            f"({nproc_from}); torchrun starts the same number of processes on every node."
        )
    return JobWorld(world, nproc, f"world size from {world_from}, processes per node from {nproc_from}")
