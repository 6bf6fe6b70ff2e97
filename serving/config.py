"""Typed settings of the Serve app: what ``build_app`` takes (deploy/serve.yaml ``args``) and
the run-time batching settings of shards and the tower (their ``user_config``).

Both reject unknown keys and validate on construction.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# How requests' data moves between router, shards and tower:
# "direct" = the project's data plane (serving/engine/channel.py, serving/app/dataplane.py): numpy
#            frames over a TCP connection per replica, Serve handles only as the fallback (a
#            replica not registered yet, or none reachable); the pooled embeddings pass through the
#            router's socket, never its pickling path;
# "reference" = Serve handles, Ray actor calls, results through the object store (shard results
#            are handed to the tower as DeploymentResponses, so the router never copies them);
# "grpc" = Serve's inter-deployment gRPC (handle.options(_by_reference=False)); Serve resolves
#            the shard responses in the router and sends them on by value.
# The default is "direct": on 2 cores a Serve handle call cost ~1-3 ms of Python on each side, a
# frame ~0.1 ms (docs/dataplane.md, benchmarks/results/direct-2core). On the H200 "reference" had
# been the faster of the two handle transports (benchmarks/dataplane.py, dlrmv2).
Transport = Literal["direct", "reference", "grpc"]
WireDtype = Literal["float32", "float16"]
TowerDtype = Literal["float32", "float16", "bfloat16"]
# How pooled embeddings go from a shard to the dense tower over the data plane (fanout "tower"):
# "host": D2H into the shard's pinned buffer, the frame, the tower's H2D;
# "ipc":  on one GPU, the shard copies them into a ring of device buffers the tower shares through
#         CUDA IPC (serving/engine/ipc.py); a shard on another GPU or host answers by the host path;
# "auto": "ipc" when shards and tower run on CUDA with the direct transport and fanout "tower",
#         else "host" (docs/dataplane.md: pooled embeddings on the GPU).
PooledTransport = Literal["auto", "ipc", "host"]
MonolithDoor = Literal["fixed", "adaptive"]
# Who calls the shards (where the pooled embeddings flow; never through the router's pickling path):
# "router": the router calls the shards and hands their responses to the tower (transport
#           "reference": by reference, shard -> node's shared-memory object store -> tower;
#           "direct": through the router's data-plane sockets);
# "tower":  the router sends the split ids to the dense tower, which calls the shards (Lui et al.'s
#           main shard); works over either transport;
# "auto":   "tower" with the "direct" and "grpc" transports, "router" with "reference".
# With "direct", "tower" keeps the pooled embeddings out of the router (one hop, shard -> tower):
# 2 cores, criteo-kaggle, 2 shards: closed loop 149.7 req/s against 114.6 with "router"; H100,
# dlrmv2: P99 at 100 req/s 84 ms against 91-124 ms (docs/dataplane.md).
# On the H200 (dlrmv2, 2 shards, benchmarks/dataplane.py) router + reference served 62k examples/s
# at p99 43 ms against 40-43k for the tower fan-out, whose single process became the hub of every
# shard response (82% of a core in Serve's handle and serialization code).
Fanout = Literal["auto", "router", "tower"]
DEFAULT_TRANSPORT: Transport = "direct"


class BatchingConfig(BaseModel):
    """Batching of one deployment's calls (serving/engine/coalesce.py); changeable at run time via user_config.

    Adaptive by default: a call that finds the deployment idle runs at once; calls arriving
    while a batch runs go together when it returns (or when ``max_batch_size`` is reached).
    ``batch_wait_timeout_s`` bounds how long a call waits for the batch in flight (None: until
    it returns); with ``fixed_wait`` every batch waits that long for others, even when idle
    (Serve's @serve.batch behaviour)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(512, gt=0, description="examples per batched call (sum of request batch sizes)")
    batch_wait_timeout_s: float | None = Field(
        None, ge=0, description="longest wait for the batch in flight before a call's own batch goes, seconds "
                                "(None: until it returns)")
    fixed_wait: bool = Field(False, description="wait batch_wait_timeout_s for every batch, even on an idle "
                                                "deployment (Serve's @serve.batch; for tests of slow shards)")

    @model_validator(mode="after")
    def _fixed_needs_a_wait(self) -> BatchingConfig:
        if self.fixed_wait and self.batch_wait_timeout_s is None:
            raise ValueError("fixed_wait: needs a batch_wait_timeout_s")
        return self


def own_addresses(port: int, count: int) -> list[str]:
    """The loopback addresses a Router replica picks its own from (``127.0.1.1:PORT`` ..
    ``127.0.1.COUNT:PORT``; Linux routes all of 127/8 to the loopback device), in the order it
    tries them. A front balances over these lines; one nobody holds is simply down there."""
    if not 1 <= count <= 254:
        raise ValueError(f"own addresses: 1 to 254 of them (got {count})")
    return [f"127.0.1.{i}:{port}" for i in range(1, count + 1)]


class AppArgs(BaseModel):
    """Arguments of :func:`serving.app.builder.build_app` (the ``args:`` of deploy/serve.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    package: str = Field("default", description="model package directory, or 'default' for artifacts/default "
                                                "(built by `recserve default-package`)")
    transport: Transport = Field(DEFAULT_TRANSPORT, description="how request data moves between deployments: 'direct' "
                                      "(the data plane's frames; Serve handles as the fallback), 'reference' or "
                                      "'grpc' (Serve handles)")
    max_batch_size: int = Field(4096, gt=0, description="largest batch (examples) one request may carry")
    default_timeout_s: float = Field(10.0, gt=0, description="deadline for requests that carry none, seconds")
    shard_down_after_s: float = Field(
        1.0, gt=0, description="a shard call not answered after this long triggers a liveness check; "
                               "a shard with no running replica fails the request with UNAVAILABLE")
    device: str = Field("cpu", description="torch device of shards and tower: cpu, cuda, or auto")
    feature_filter: str | None = Field(
        None, description="import path 'module:factory' of the feature filter (fading); "
                          "factory(manifest) -> callable(Batch) -> Batch; None = identity")
    log_rate: float = Field(0.0, ge=0, le=1, description="fraction of requests whose served examples are logged "
                                                         "(seeded hash of the request id; 0 = off)")
    log_dir: str = Field("", description="where the example log goes: a directory or a pyarrow filesystem URL "
                                         "(s3://..., gs://...); required when log_rate > 0")
    log_flush_s: float = Field(10.0, gt=0, description="longest time a logged example waits before its file is "
                                                       "written, seconds")
    log_rows_per_file: int = Field(65_536, gt=0, description="rows per example-log file")
    log_max_queued: int = Field(65_536, gt=0, description="examples waiting for the log writer at most; beyond it "
                                                          "requests are served but not logged (counted as dropped)")
    fanout: Fanout = Field("auto", description="who calls the shards: 'router' (shard responses passed to the "
                                               "tower by reference), 'tower' (the router sends it the ids), or "
                                               "'auto' (tower with transport direct or grpc, router with reference)")
    wire_dtype: WireDtype = Field(
        "float16", description="dtype of the pooled embeddings that shards hand the dense tower: float16 "
                               "halves the bytes between processes (the tower accumulates in float32)")
    pooled_transport: PooledTransport = Field(
        "auto", description="how pooled embeddings go from the shards to the tower: 'ipc' (one GPU: into the "
                            "tower's ring of device buffers, shared through CUDA IPC), 'host' (pinned host "
                            "memory and the frame), 'auto' (ipc on CUDA with transport direct and fanout tower)")
    pooled_ring_slots: int = Field(16, gt=0, description="with pooled_transport ipc: batches a tower replica's ring "
                                                         "holds at once (one slot each); more go by the host path")
    max_in_flight: int = Field(32, gt=0, description="requests the stack's routers (or the monolith) work on at once, "
                               "together: each router replica's door takes its share (router_door: divided by the "
                               "replicas, the most when the router autoscales, rounded up), since they all wait on "
                               "the same shards and tower; a request that cannot be answered within its deadline "
                               "is answered RESOURCE_EXHAUSTED at once (serving/engine/admission.py)")
    max_queued: int = Field(32, gt=0, description="requests that wait at the routers' doors for one of the "
                            "max_in_flight slots, shared among the replicas the same way; beyond them the "
                            "request is answered RESOURCE_EXHAUSTED before any decoding, so an overload costs "
                            "little (docs/reliability.md: past the maximum)")
    adaptive_door: bool = Field(True, description="with grpc_listen: a router replica's door works on as many "
                                "requests at once as its throughput needs (the knee of its throughput, up to "
                                "max_in_flight; serving/engine/concurrency.py), a quarter as many wait, and the "
                                "rest are refused at once (behind the front, by HAProxy); --no-adaptive-door: max_in_flight "
                                "working and max_queued waiting, fixed")
    monolith_door: MonolithDoor = Field(
        "fixed", description="the monolith's door: 'fixed' (max_in_flight in gRPC's core, none waiting) or "
                             "'adaptive' (the routers' door at the knee of the throughput, a quarter as many "
                             "waiting; serving/engine/door.py). Fixed by default: on 2 cores it answered more "
                             "and faster under overload (benchmarks/results/overload-monolith-door)")
    max_latency_factor: float | None = Field(
        None, ge=1.0, description="a router replica also sheds a request whose estimated latency exceeds this "
                                 "multiple of its latency on an idle stack (None: the deadline only)")
    front_socket: str = Field("", description="set by recserve serve with --front haproxy and adaptive_door: "
                                              "the front's control socket, where each Router replica tells how many "
                                              "requests its door takes now, so that the front refuses past them; '' = none")
    router_replicas: int = Field(1, ge=1, description="replicas of the Router (the gRPC ingress); the proxy "
                                                      "or the shared port spreads requests over them")
    router_max_replicas: int = Field(0, ge=0, description="above router_replicas: the Router autoscales between "
                                     "the two by requests in flight, half a replica's door (router_door) each (Serve's "
                                     "autoscaler; with grpc_listen the replicas report their own, "
                                     "serving/app/autoscaling.py's InFlightPolicy); 0 = fixed at router_replicas")
    grpc_listen: str = Field("", description="HOST:PORT every Router replica serves gRPC on itself, the port "
                                             "shared (SO_REUSEPORT: the kernel spreads connections over them; "
                                             "serving/app/grpc_ingress.py); '' = Serve's ingress answers")
    grpc_own_addresses: int = Field(0, ge=0, le=254, description="with grpc_listen: N > 0 gives each Router replica "
                                    "an address of its own on grpc_listen's port instead of the shared one, the first "
                                    "free of the loopback addresses 127.0.1.1 .. 127.0.1.N (recserve serve --front "
                                    "haproxy balances over them); 0 = the port shared")
    shard_replicas: int = Field(1, ge=1, description="replicas of every shard deployment at start "
                                                     "(recserve scale changes one shard's later)")
    tower_replicas: int = Field(1, ge=1, description="replicas of the DenseTower at start")
    tower_dtype: TowerDtype = Field(
        "float32", description="compute dtype of the dense tower: float16/bfloat16 stay within "
                               "serving.engine.tower.LOWP_SCORE_BOUND of float32 scores (tested)")
    gpus: int = Field(0, ge=0, description="GPUs of the host to spread the replicas over through Ray's GPU "
                                           "resources (serving/app/placement.py): each shard replica takes a share of "
                                           "one GPU, at most ceil(shards x shard_replicas / gpus) per GPU; "
                                           "0 = no GPU reservation, every replica on 'device' as it finds it "
                                           "(with device 'cpu' the shares are reserved but unused: a placement check)")
    tower_gpu: Literal["shared", "own"] = Field(
        "shared", description="with gpus > 0: the dense tower beside the shards (a 1% share) or on a GPU of its own")
    place_on_hosts: bool = Field(
        False, description="place the shard replicas on the Ray nodes labelled recserve-host=NAME, each within its "
                           "node's Ray memory (ray start --memory BYTES; serving/app/nodes.py); a package that does not "
                           "fit is refused naming the table")
    router_host: str = Field("", description="with place_on_hosts: the host (recserve-host label) of the router "
                                            "replicas ('' = any node)")
    tower_host: str = Field("", description="with place_on_hosts: the host (recserve-host label) of the dense "
                                           "tower replicas ('' = any node)")
    coalesce_max_examples: int = Field(
        4096, gt=0, description="examples a router replica coalesces into one split, one call per shard and one "
                                "tower call (serving/engine/coalesce.py); 1 = every request alone")
    coalesce_wait_s: float | None = Field(
        0.05, ge=0, description="longest a request waits in the router for the batch in flight before its own "
                                "batch goes, seconds ('none': until it returns); an idle router sends at once "
                                "(2 cores, criteo-kaggle closed loop: 0.005 s gave 44.9 req/s, none 57.9)")
    coalesce_pipeline: int = Field(
        1, ge=1, description="coalesced batches a router replica keeps in flight per version before requests wait "
                             "for one to return (2: the shards look up the next batch while the tower scores this "
                             "one)")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads of each serving process (the monolith, each shard and "
                                "tower replica); none: the monolith keeps torch's one per core, a tower replica "
                                "takes the node's cores over the tower replicas, a shard Ray's OMP_NUM_THREADS=1. "
                                "1 keeps the monolith's tail steady on a busy machine, 2 gave it +46% closed-loop "
                                "throughput on a quiet one (docs/dataplane.md)")
    shard_batching: BatchingConfig = BatchingConfig()
    tower_batching: BatchingConfig = BatchingConfig()

    @model_validator(mode="after")
    def _log_dir_when_logging(self) -> AppArgs:
        if self.log_rate > 0 and not self.log_dir:
            raise ValueError("log_dir: required when log_rate > 0")
        if self.fanout == "router" and self.transport == "grpc":
            raise ValueError("fanout 'router' hands shard responses to the tower by reference or over the data "
                             "plane: it needs transport 'direct' or 'reference' (with 'grpc' the pooled "
                             "embeddings would pass through the router's pickling path)")
        if self.pooled_transport == "ipc" and (self.transport != "direct" or self.resolved_fanout() != "tower"
                                               or self.device == "cpu"):
            raise ValueError("pooled_transport 'ipc': the shards write into the tower's GPU ring over the data "
                             "plane, so it needs transport 'direct', fanout 'tower' and device 'cuda' or 'auto' "
                             f"(got {self.transport!r}, {self.fanout!r}, {self.device!r})")
        if (self.router_host or self.tower_host) and not self.place_on_hosts:
            raise ValueError("router_host/tower_host: need place_on_hosts")
        if 0 < self.router_max_replicas < self.router_replicas:
            raise ValueError(f"router_max_replicas: {self.router_max_replicas} is below router_replicas "
                             f"{self.router_replicas} (the fewest the Router scales down to); 0 = fixed")
        if self.grpc_own_addresses and not self.grpc_listen:
            raise ValueError("grpc_own_addresses: needs grpc_listen (its port)")
        if self.grpc_own_addresses and self.grpc_own_addresses < max(self.router_replicas, self.router_max_replicas):
            raise ValueError(f"grpc_own_addresses: {self.grpc_own_addresses} is fewer than the Router's "
                             f"{max(self.router_replicas, self.router_max_replicas)} replicas")
        return self

    def router_listen(self) -> str | list[str]:
        """What each Router replica binds: grpc_listen, or with grpc_own_addresses the addresses it
        picks its own from."""
        if not self.grpc_own_addresses:
            return self.grpc_listen
        return own_addresses(int(self.grpc_listen.rsplit(":", 1)[1]), self.grpc_own_addresses)

    def router_door(self) -> tuple[int, int]:
        """(working, waiting) at one router replica's door: max_in_flight and max_queued shared among
        the router replicas (the most there may be when it autoscales), rounded up. Every router
        waits on the same shards and tower: a door of max_in_flight each admitted four times what
        one router does, and four routers on 2 cores collapsed at their capacity (120 req/s: 16-70
        OK/s in 3 of 3 runs; 106-115 with the door shared, 3 of 3;
        benchmarks/results/door-4routers-2core)."""
        routers = max(self.router_replicas, self.router_max_replicas)
        return -(-self.max_in_flight // routers), -(-self.max_queued // routers)

    def router_autoscaling(self) -> dict | None:
        """Serve's autoscaling_config of the Router, or None (router_replicas, fixed)."""
        if self.router_max_replicas <= self.router_replicas:
            return None
        return {"min_replicas": self.router_replicas, "max_replicas": self.router_max_replicas,
                "target_ongoing_requests": max(1, self.router_door()[0] // 2),
                "upscale_delay_s": 5, "downscale_delay_s": 60,
                "policy": {"policy_function": "serving.app.autoscaling:InFlightPolicy"}}

    def resolved_fanout(self) -> str:
        """``fanout`` with "auto" decided by the transport."""
        if self.fanout != "auto":
            return self.fanout
        return "router" if self.transport == "reference" else "tower"

    @property
    def pooled_ring_examples(self) -> int:
        """Examples in one slot of a tower's ring: the largest batch a router sends it (the tower
        allocates the ring by this, the GPU planner counts it)."""
        return max(self.coalesce_max_examples, self.max_batch_size)

    @property
    def wire_bytes(self) -> int:
        """Bytes of one pooled-embedding element between shards and tower (``wire_dtype``)."""
        return {"float32": 4, "float16": 2}[self.wire_dtype]

    def resolved_pooled_transport(self, device: str) -> str:
        """``pooled_transport`` with "auto" decided (``device``: the resolved one)."""
        if self.pooled_transport != "auto":
            return self.pooled_transport
        direct_to_tower = self.transport == "direct" and self.resolved_fanout() == "tower"
        return "ipc" if direct_to_tower and device.startswith("cuda") else "host"

    def tower_threads(self, cores: int | None = None) -> int:
        """torch intra-op threads of a tower replica: ``torch_threads``, else the node's cores
        shared by the tower replicas (the tower's MLPs are the compute that threads speed up,
        as the monolith, which keeps torch's one per core; a shard's gathers stay at Ray's 1)."""
        if self.torch_threads is not None:
            return self.torch_threads
        import os

        return max(1, (cores or os.cpu_count() or 1) // max(1, self.tower_replicas))

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


# The default for servers built without AppArgs (LocalRanker, the monolith): AppArgs' own.
DEFAULT_MAX_BATCH_SIZE: int = AppArgs.model_fields["max_batch_size"].default


SMALL_MACHINE_CORES = 8  # below this, replicas reserve no CPU


def replica_num_cpus(cores: int | None = None) -> float:
    """CPU reserved per replica (``ray_actor_options.num_cpus``), from the cores of the smallest
    node Ray has (serving/app/builder.py's ``ray_node_cpus``; default: this machine's).

    A reservation only decides where Ray may place a replica; it never limits what the
    replica uses. On a small machine (fewer than 8 cores) it is 0: every replica, the scaled
    and autoscaled ones included, must fit, and 4 deployments x 0.5 CPU already filled 2 cores
    (a second shard-0 replica stayed STARTING). On a larger one, 1 core per replica."""
    import os

    cores = cores if cores is not None else (os.cpu_count() or 1)
    return 0.0 if cores < SMALL_MACHINE_CORES else 1.0
