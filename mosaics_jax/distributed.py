"""Joining a multi-process (multi-host) run: `jax.distributed` set up before any JAX backend starts.

Every process of a run executes the same program on its own devices; together they form one mesh.
`initialize` connects them, from the first of these that applies:

1. Explicit values, from arguments (`mosaics-train --coordinator-address HOST:PORT
   --num-processes N --process-id I`) or else the environment variables
   MOSAICS_COORDINATOR_ADDRESS, MOSAICS_NUM_PROCESSES and MOSAICS_PROCESS_ID. Values left out
   are taken from the cluster environment by JAX, as in 2. A process count of 1 means a
   single-process run: nothing is initialised.
2. A detected cluster environment: a Cloud TPU VM (a pod slice, or a single host), a Slurm step
   with more than one task, or an Open MPI job with more than one process. JAX's own cluster
   detection then supplies the coordinator, the process count and this process's id.
3. Otherwise the run is a single process, and nothing is initialised.

On CPU, the processes' collectives go over Gloo (TCP).
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax

from mosaics_jax import config as config_lib

ENV_COORDINATOR_ADDRESS = "MOSAICS_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MOSAICS_NUM_PROCESSES"
ENV_PROCESS_ID = "MOSAICS_PROCESS_ID"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
  """Joins this process to its multi-process run (the module docstring); call before any JAX use.

  Args:
    coordinator_address: HOST:PORT of process 0's coordinator service, the same for every process.
    num_processes: the processes of the run.
    process_id: this process, in [0, num_processes).

  Returns:
    Whether `jax.distributed` was initialised (by this call or before it).

  Raises:
    config_lib.ConfigError: an environment variable that is not an integer, or values that do not
      fit together.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR_ADDRESS) or None
  num_processes = _int_or_env(num_processes, ENV_NUM_PROCESSES)
  process_id = _int_or_env(process_id, ENV_PROCESS_ID)
  explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
  if num_processes == 1 or not (explicit or cluster_detected()):
    return False
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise config_lib.ConfigError(
        f"need 0 <= process id < number of processes, got {process_id} and {num_processes}"
    )
  # Gloo gives CPU devices cross-process collectives; the setting is ignored by other platforms.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


def cluster_detected() -> bool:
  """Whether this process runs where JAX finds its peers itself: TPU VM, Slurm or Open MPI."""
  env = os.environ
  slurm = "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1")) > 1
  mpi = int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
  return slurm or mpi or _on_cloud_tpu_vm()


def _on_cloud_tpu_vm() -> bool:
  """A TPU VM: libtpu is installed and TPU chips are attached (checked without starting JAX)."""
  chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def _int_or_env(value: int | None, name: str) -> int | None:
  if value is not None:
    return value
  text = os.environ.get(name)
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise config_lib.ConfigError(f"{name} must be an integer, got {text!r}") from None
