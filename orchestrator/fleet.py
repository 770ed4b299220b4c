"""The draft and verify replicas this orchestrator sees: found through discovery.py, described, health-checked, and
picked for new sequences by load.

A replica's state:
    STARTING  found, its Describe not answered yet (model loading): takes no sequences
    SERVING   takes new sequences
    DRAINING  reports NOT_SERVING (its SIGTERM grace period): takes none, and its sequences move elsewhere
    DOWN      a call or health check failed, or DNS no longer names it: its sequences move; back to SERVING when a
              health check says so
A replica whose vocabulary differs from the tokenizer's is never used (REFUSED).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from enum import Enum

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cast.v1 import common_pb2
from cast_runtime.wire import cost_table_from_proto
from orchestrator.clients import DraftClient, VerifyClient
from orchestrator.costs import ReplicaCosts
from orchestrator.discovery import Target, resolve

log = logging.getLogger("cast.orchestrator")


class State(Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    DOWN = "down"
    REFUSED = "refused"


@dataclass(eq=False)
class Replica:
    role: str  # "draft" or "verify"
    address: str
    client: DraftClient | VerifyClient
    state: State = State.STARTING
    description: common_pb2.ReplicaDescription | None = None
    costs: ReplicaCosts | None = None  # its table and the online corrections, shared by every pairing
    level_costs: dict[str, ReplicaCosts] = field(default_factory=dict)  # a draft replica's levels, the same way
    sequences: int = 0                 # live sequences this orchestrator pinned to it
    failed_checks: int = 0
    listed: bool = True                # named by its target's latest resolution

    @property
    def slots(self) -> int:
        """How many sequences it can hold at once (a verify replica's KV slots; 0: not said)."""
        return self.description.max_sequences if self.description is not None else 0

    @property
    def serving(self) -> bool:
        return self.state is State.SERVING


@dataclass
class Fleet:
    draft_target: Target
    verify_target: Target
    vocab_hash: str
    refresh_s: float = 5.0     # DNS and health checks this often
    check_timeout_s: float = 2.0
    credentials: grpc.ChannelCredentials | None = None  # TLS to the replicas (None: plaintext)
    replicas: dict[tuple[str, str], Replica] = field(default_factory=dict)  # (role, address) -> replica
    listeners: list = field(default_factory=list)  # called with no arguments after a replica changes state

    def of(self, role: str) -> list[Replica]:
        return [r for (r_role, _), r in self.replicas.items() if r_role == role]

    def serving(self, role: str) -> list[Replica]:
        return [r for r in self.of(role) if r.serving]

    def pick_verify(self, waiting: dict[Replica, int] | None = None) -> Replica | None:
        """The serving verify replica with the most free room: live and queued sequences over its slots. Spreading
        by load keeps every replica's batch small (latency per token grows with the batch) and leaves headroom
        for the requests each one is already running."""
        waiting = waiting or {}
        candidates = self.serving("verify")
        if not candidates:
            return None
        return min(candidates, key=lambda r: ((r.sequences + waiting.get(r, 0)) / max(r.slots, 1), r.sequences))

    def pick_draft(self) -> Replica | None:
        """The serving draft replica with the fewest live sequences: a draft's Expand costs grow with its batch, and
        sequences of one verify step on different drafts expand in parallel."""
        candidates = self.serving("draft")
        return min(candidates, key=lambda r: r.sequences) if candidates else None

    def report_failure(self, replica: Replica, error: BaseException) -> None:
        """A call to the replica failed at the transport or lost its state: no new sequences until a health check
        says it serves again."""
        if replica.state in (State.SERVING, State.DRAINING, State.STARTING):
            log.warning("%s replica %s is down: %s", replica.role, replica.address, _describe(error))
            self._set(replica, State.DOWN)

    # --- discovery and health ---------------------------------------------------------------------------------

    async def start(self, timeout_s: float) -> None:
        """Find and describe the replicas; returns once a verify and a draft replica serve (model loading can take
        minutes), or raises RuntimeError after timeout_s."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            await self.refresh()
            if self.serving("verify") and self.serving("draft"):
                return
            if asyncio.get_running_loop().time() > deadline:
                states = ", ".join(f"{r.role} {r.address}: {r.state.value}" for r in self.replicas.values())
                raise RuntimeError(f"no serving draft and verify replica after {timeout_s:.0f} s ({states or 'none found'})")
            await asyncio.sleep(0.5)

    async def watch(self) -> None:
        """Refresh every refresh_s until cancelled."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # a bad answer must not end discovery
                log.exception("replica refresh failed")

    async def refresh(self) -> None:
        """Resolve the targets (new replicas start, vanished ones go down), then check every listed replica."""
        for role, target in (("draft", self.draft_target), ("verify", self.verify_target)):
            try:
                addresses = set(await resolve(target))
            except OSError as exc:
                log.warning("resolving %s replicas (%s) failed: %s", role, target, exc)
                continue  # keep what we had
            for address in addresses - {r.address for r in self.of(role)}:
                client = (DraftClient if role == "draft" else VerifyClient)(address, self.credentials)
                self.replicas[role, address] = Replica(role, address, client)
                log.info("%s replica %s found", role, address)
            for replica in self.of(role):
                replica.listed = replica.address in addresses
                if not replica.listed and replica.state is not State.DOWN:
                    log.info("%s replica %s is gone from %s", role, replica.address, target)
                    self._set(replica, State.DOWN)
                if not replica.listed and replica.sequences == 0:
                    del self.replicas[role, replica.address]
                    await replica.client.close()
        listed = [r for r in self.replicas.values() if r.listed and r.state is not State.REFUSED]
        await asyncio.gather(*(self._check(r) for r in listed))

    async def _check(self, replica: Replica) -> None:
        try:
            reply = await health_pb2_grpc.HealthStub(replica.client.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.check_timeout_s)
            if replica.description is None and reply.status == health_pb2.HealthCheckResponse.SERVING:
                self._describe(replica, await replica.client.describe(timeout=self.check_timeout_s))
        except grpc.aio.AioRpcError as exc:
            replica.failed_checks += 1
            # One slow answer under load is not a death; two in a row, or a refused connection, are.
            if replica.failed_checks >= 2 or exc.code() == grpc.StatusCode.UNAVAILABLE:
                if replica.state is not State.STARTING:
                    self.report_failure(replica, exc)
            return
        replica.failed_checks = 0
        if replica.state is State.REFUSED or replica.description is None:
            return
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        if serving and replica.state is not State.SERVING:
            log.info("%s replica %s serves (%s)", replica.role, replica.address, replica.description.device)
            self._set(replica, State.SERVING)
        elif not serving and replica.state is State.SERVING:
            log.info("%s replica %s is draining", replica.role, replica.address)
            self._set(replica, State.DRAINING)

    def _describe(self, replica: Replica, description: common_pb2.ReplicaDescription) -> None:
        if description.vocab_hash != self.vocab_hash:
            log.error("%s replica %s serves another vocabulary (%s, the tokenizer's is %s): not used", replica.role,
                      replica.address, description.vocab_hash, self.vocab_hash)
            replica.state = State.REFUSED
            return
        replica.description = description
        table = cost_table_from_proto(description.cost_table)
        replica.costs = ReplicaCosts.for_replica(replica.role, table)
        replica.level_costs = {level.name: ReplicaCosts.for_replica(replica.role, cost_table_from_proto(level.cost_table))
                               for level in description.draft_levels}

    def _set(self, replica: Replica, state: State) -> None:
        replica.state = state
        for listener in self.listeners:
            listener()

    async def close(self) -> None:
        await asyncio.gather(*(r.client.close() for r in self.replicas.values()), return_exceptions=True)


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return repr(error)
