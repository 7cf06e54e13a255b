"""A real multi-node Ray cluster on loopback, for tests: a head and worker nodes as Ray processes.

The cluster (``ray.cluster_utils.Cluster``) lives in a child process that the test drives over
JSON lines (add a node, remove one, quit), so the pytest process never holds Ray state and a
test can kill a worker node while a sweep runs against it. The child gets its own RAY_TMPDIR:
the cluster's sessions and its ``ray_current_cluster`` file stay out of /tmp/ray, where other
Ray programs on the machine would otherwise find it with ``ray.init()`` or ``address="auto"``.

Every node's address is 127.0.0.1 (``node_ip_address``, the ``--node-ip-address`` of ``ray start``,
which Ray keeps as given here), so the cluster listens on loopback only and ``address`` is
``127.0.0.1:<port>``; clients keep that address (``qlora_ray.cluster.loopback_node_ip``).

Token auth is on (``RAY_AUTH_MODE=token`` with a token made for this cluster) unless
``token=None``; clients reach it with ``env()``. Ray's session logs live under ``tmp_dir``
and are deleted on exit unless QLORA_RAY_KEEP_CLUSTER_LOGS is set.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

# A T4 worker as the runtime/ configs declare it; the GPU is a logical label on a CPU machine.
T4_WORKER = {"num_cpus": 2, "num_gpus": 1, "resources": {"accelerator_type:T4": 1, "t4_worker": 1}}


class LoopbackCluster:
    """``with LoopbackCluster(head={...}, workers=[T4_WORKER, T4_WORKER]) as cluster: ...``"""

    def __init__(self, head: Dict[str, Any], workers: List[Dict[str, Any]],
                 token: Optional[str] = "generate", log_path: Optional[Path] = None):
        self.head_args = head
        self.worker_args = workers
        self.token = secrets.token_hex(16) if token == "generate" else token
        # Unix socket paths are capped near 107 bytes: keep the temp dir short.
        self.tmp_dir = tempfile.mkdtemp(prefix="qlr", dir="/tmp")
        self.log_path = log_path or Path(self.tmp_dir) / "cluster.log"
        self.address: Optional[str] = None
        self.nodes: Dict[int, str] = {}   # index -> node id of alive nodes (0 is the head)
        self.every_node: Dict[int, str] = {}  # ... and of removed ones
        self._proc: Optional[subprocess.Popen] = None

    def env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """Environment for a client of this cluster: its token, and no RAY_ADDRESS from outside."""
        env = dict(os.environ if base is None else base)
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_MODE", None)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        if self.token:
            env["RAY_AUTH_TOKEN"] = self.token
        else:
            env.pop("RAY_AUTH_TOKEN", None)
            env["RAY_AUTH_MODE"] = "disabled"
        return env

    def __enter__(self) -> "LoopbackCluster":
        env = self.env()
        env["RAY_TMPDIR"] = self.tmp_dir
        if self.token:
            env["RAY_AUTH_MODE"] = "token"
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, env=env, text=True, bufsize=1)
        try:
            reply = self._call({"op": "start", "head": self.head_args, "workers": self.worker_args},
                               timeout=240)
        except Exception:
            self.__exit__(None, None, None)
            raise
        self.address = reply["address"]
        self.nodes = {int(k): v for k, v in reply["nodes"].items()}
        self.every_node = dict(self.nodes)
        self.started_s = reply["seconds"]
        return self

    def add_node(self, args: Dict[str, Any]) -> int:
        reply = self._call({"op": "add", "args": args}, timeout=120)
        self.nodes[reply["index"]] = self.every_node[reply["index"]] = reply["node_id"]
        return reply["index"]

    def actors(self, class_name: Optional[str] = None) -> List[Dict[str, Any]]:
        """The cluster's actors (alive and dead): class_name, pid, state, node_id, start/end ms."""
        return self._call({"op": "actors", "class": class_name}, timeout=60)["actors"]

    def node_index(self, node_id: str) -> Optional[int]:
        return next((i for i, n in self.every_node.items() if n == node_id), None)

    def remove_node(self, index: int, graceful: bool = False) -> float:
        """Kill every process of worker node ``index`` (SIGKILL unless graceful); seconds it took."""
        reply = self._call({"op": "remove", "index": index, "graceful": graceful}, timeout=120)
        self.nodes.pop(index)
        return reply["seconds"]

    def __exit__(self, *exc) -> None:
        if self._proc and self._proc.poll() is None:
            try:
                self._call({"op": "quit"}, timeout=60)
            except Exception:
                pass
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        if not os.environ.get("QLORA_RAY_KEEP_CLUSTER_LOGS"):
            shutil.rmtree(self.tmp_dir, ignore_errors=True)  # Ray's session logs of this cluster

    def _call(self, message: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        assert self._proc and self._proc.stdin and self._proc.stdout
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self._proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"cluster helper gave no answer to {message['op']} in {timeout}s; "
                               f"see {self.log_path}")
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"cluster helper exited ({self._proc.poll()}); see {self.log_path}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"cluster helper: {reply['error']}")
        return reply


def _serve() -> None:
    """The child: owns the Cluster, answers one JSON line per request on the saved stdout."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything Ray prints goes to the log, not into the protocol
    from ray.cluster_utils import Cluster

    def retry(make, tries=3):
        # Ray gives a raylet 30 s (fixed) to register; on a loaded 2-core machine that is not
        # always enough, and a second try usually is.
        for attempt in range(tries):
            try:
                return make()
            except Exception as e:
                if "timed out during startup" not in str(e) or attempt == tries - 1:
                    raise
                print(f"node start timed out, retrying ({e})", file=sys.stderr, flush=True)

    # Every node registers 127.0.0.1 (Ray would otherwise take this machine's network address and
    # listen there): the cluster is reachable from this machine only. Node() keeps the address
    # as given; clients connecting to 127.0.0.1:port keep it too (qlora_ray.cluster.loopback_node_ip).
    loopback = {"node_ip_address": "127.0.0.1"}

    def start_head(args):
        return Cluster(initialize_head=True, head_node_args={"include_dashboard": False, **loopback, **args})

    cluster, nodes, removed_max = None, {}, 0
    for line in sys.stdin:
        message = json.loads(line)
        start = time.time()
        try:
            if message["op"] == "start":
                cluster = retry(lambda: start_head(message["head"]))
                nodes[0] = cluster.head_node
                for args in message["workers"]:
                    nodes[len(nodes)] = retry(lambda: cluster.add_node(**loopback, **args))
                cluster.wait_for_nodes(timeout=120)
                reply = {"address": cluster.address,
                         "nodes": {i: n.node_id for i, n in nodes.items()}}
            elif message["op"] == "add":
                # Never an index a removed node had: tests tell attempts apart by node index.
                index = max(max(nodes), removed_max) + 1
                nodes[index] = retry(lambda: cluster.add_node(**loopback, **message["args"]))
                reply = {"index": index, "node_id": nodes[index].node_id}
            elif message["op"] == "remove":
                removed_max = max(removed_max, message["index"])
                cluster.remove_node(nodes.pop(message["index"]), allow_graceful=message["graceful"])
                reply = {}
            elif message["op"] == "actors":
                # Straight from the GCS actor table (no dashboard needed); dead actors included.
                table = cluster.global_state.actor_table(None)
                reply = {"actors": [
                    {"class_name": a["ActorClassName"], "pid": a["Pid"], "state": a["State"],
                     "node_id": a["Address"]["NodeID"], "start_ms": a["StartTime"], "end_ms": a["EndTime"]}
                    for a in table.values() if message.get("class") in (None, a["ActorClassName"])]}
            elif message["op"] == "quit":
                if cluster is not None:
                    cluster.shutdown()
                out.write(json.dumps({"seconds": time.time() - start}) + "\n")
                return
            else:
                reply = {"error": f"unknown op {message['op']}"}
        except Exception as e:  # reported to the test, which fails with it
            reply = {"error": f"{type(e).__name__}: {e}"}
        reply["seconds"] = round(time.time() - start, 2)
        out.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    _serve()
