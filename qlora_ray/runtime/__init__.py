"""The runtime: a spec's trial plan as a Ray Tune grid of one-worker Ray Train runs. The only
package that imports ``ray.tune`` and ``ray.train``; importing it changes no environment.

    submit      run or resume an experiment in the foreground (returns a SubmitOutcome)
    connect     an embedded local Ray (loopback only) or --address
    capacity    does a trial fit, how many at once (pure arithmetic over node resources)
    experiment  the folder's plan and spec, and every trial's status.json (its only writer)
    baseline    the base model measured once, as a Ray task beside the trials
    trial       the Tune trial function, its TorchTrainer and the worker loop (typed TrialConfig)
    grid        the Tune grid over the unfinished trials
    placement   a stopped trial's resources given back; bounded waits for the driver's own tasks
    progress    the terminal display (render only)
    jobs        --detach as a Ray Job; status and logs of one
    ray_compat  every touch of Ray's private surface, with the Ray version it was written for
    faults      test-only fault injection (a plan a test installs; never read from the environment)

File names of an experiment are in ``qlora_ray.layout``; reading one without Ray in
``qlora_ray.storage``.
"""

from qlora_ray.runtime.capacity import Cluster, check_resources, concurrency, slots
from qlora_ray.runtime.connect import ConnectOptions, connect
from qlora_ray.runtime.experiment import spec_changes
from qlora_ray.runtime.jobs import job_logs, job_status, submit_detached
from qlora_ray.runtime.ray_compat import LOCAL_RAY_ENV
from qlora_ray.runtime.submit import SubmitOutcome, submit

__all__ = ["Cluster", "ConnectOptions", "LOCAL_RAY_ENV", "SubmitOutcome", "check_resources", "concurrency",
           "connect", "job_logs", "job_status", "slots", "spec_changes", "submit", "submit_detached"]
