"""One process of a two-process run that only checks its workdir, as the training loop does at start-up.

    python tests/shared_workdir_worker.py PORT PROCESS_ID WORKDIR

Joins the other process through jax.distributed on localhost (CPU collectives over gloo), calls
multihost.check_shared_workdir(WORKDIR) and prints "shared" if it passes; WorkdirNotShared is left
to stop the process, as it stops a training run.
"""
import sys

import jax

from segguided_jax.parallel import multihost

port, process_id, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           initialization_timeout=60)
multihost.check_shared_workdir(workdir)
print(f"process {process_id}: shared", flush=True)
