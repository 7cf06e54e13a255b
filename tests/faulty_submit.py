"""``qlora-ray submit`` with a test-only fault plan installed, for tests that break trials.

    python tests/faulty_submit.py '{"kill_at_step": 5}' SPEC [KEY=VALUE ...] [--options]

The plan (``qlora_ray.runtime.faults.FaultPlan`` fields as JSON) is installed in this driver
process, which ships it to its trials; production code never reads one from the environment.
"""

import json
import sys

from qlora_ray.cli import main
from qlora_ray.runtime import faults

if __name__ == "__main__":
    faults.install(faults.FaultPlan(**json.loads(sys.argv[1])))
    sys.argv = ["qlora-ray", "submit", *sys.argv[2:]]
    main()
