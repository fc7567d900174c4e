"""kopf handlers: thin, typed, keyword-only. Each builds or takes the domain objects and
calls one step of memsnap_operator.migration or .checkpoint; the work and its rules live there."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from . import metrics
from .checkpoint.restore import FromCheckpoint
from .checkpoint.run import Checkpointing
from .clients.agents import AgentError, Agents
from .clients.kube import Kube, load_config
from .config import OperatorConfig
from .constants import ANNOTATION_PREFIX, CHECKPOINTS, FINAL, FINALIZER, GROUP, MIGRATIONS, VERSION
from .migration.flow import Migration, Services

REGISTRY = kopf.OperatorRegistry()
CHECKPOINT_DELETE_TRIES = 4  # 5 s apart: then a PodCheckpoint whose node is gone is deleted anyway


@kopf.on.startup(registry=REGISTRY)
async def configure(*, settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    config: OperatorConfig = memo["config"]
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # our own Events say what happened; kopf's only on trouble
    settings.watching.server_timeout = 300
    memo["services"] = Services(Kube(load_config(config.kubeconfig)),
                                Agents(config.agent_tls, config.agent_port), config)
    memo["locks"] = {}  # PodMigration uid -> asyncio.Lock: its daemon and its deletion take turns
    if config.metrics_listen:
        metrics.serve(config.metrics_listen)
        logger.info("metrics on http://%s/metrics", config.metrics_listen)


@kopf.on.login(registry=REGISTRY)
def login(*, memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """The same identity as the operator's own API client (kubeconfig or service account)."""
    kube: Kube = memo["services"].kube
    c = kube.config
    return kopf.ConnectionInfo(server=c.host, ca_path=c.ssl_ca_cert, insecure=not c.verify_ssl,
                               token=kube.bearer_token(), certificate_path=c.cert_file,
                               private_key_path=c.key_file)


@kopf.on.cleanup(registry=REGISTRY)
async def close(*, memo: kopf.Memo, **_: Any) -> None:
    services: Services = memo["services"]
    await services.agents.close()
    await services.kube.close()


class _KopfStop:
    """kopf's stop flag, as the domain's Stop."""

    def __init__(self, stopped: kopf.DaemonStopped):
        self.stopped = stopped

    def is_set(self) -> bool:
        return self.stopped.is_set()

    async def sleep(self, seconds: float) -> bool:
        await self.stopped.wait(seconds)
        return self.stopped.is_set()


def _lock(memo: kopf.Memo, uid: str) -> asyncio.Lock:
    return memo["locks"].setdefault(uid, asyncio.Lock())


# No `when` filter on the phase: kopf would cancel the daemon the moment it writes a final phase,
# before its last Events are out. A finished PodMigration's daemon returns at once instead.
@kopf.daemon(GROUP, VERSION, MIGRATIONS, id="migrate", cancellation_timeout=60, registry=REGISTRY)
async def migrate(*, body: kopf.Body, uid: str, memo: kopf.Memo, stopped: kopf.DaemonStopped, **_: Any) -> None:
    """One per PodMigration in flight: runs it, or resumes it after an operator restart."""
    if (body.get("status") or {}).get("phase") in FINAL:
        return
    async with _lock(memo, uid):
        if stopped.is_set():
            return
        if (body.get("spec") or {}).get("fromCheckpoint"):
            await FromCheckpoint(memo["services"], dict(body)).run(_KopfStop(stopped))
        else:
            await Migration(memo["services"], dict(body)).run(_KopfStop(stopped))


@kopf.on.delete(GROUP, VERSION, MIGRATIONS, id="roll-back", registry=REGISTRY)
async def deleted(*, body: kopf.Body, uid: str, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """A PodMigration deleted mid-flight rolls back before its finalizer goes."""
    services: Services = memo["services"]
    async with _lock(memo, uid):
        fresh = await services.kube.get_migration(namespace, name) or dict(body)
        if (fresh.get("spec") or {}).get("fromCheckpoint"):
            await FromCheckpoint(services, fresh).deleted()
        else:
            await Migration(services, fresh).deleted()
    memo["locks"].pop(uid, None)


# ---- PodCheckpoint ---------------------------------------------------------------------------

@kopf.daemon(GROUP, VERSION, CHECKPOINTS, id="checkpoint", cancellation_timeout=30, registry=REGISTRY)
async def checkpoint(*, body: kopf.Body, uid: str, memo: kopf.Memo, stopped: kopf.DaemonStopped, **_: Any) -> None:
    """One per PodCheckpoint: a checkpoint every spec.schedule (restarted by kopf on spec changes)."""
    async with _lock(memo, uid):
        if stopped.is_set():
            return
        await Checkpointing(memo["services"], dict(body)).run(_KopfStop(stopped))


@kopf.on.delete(GROUP, VERSION, CHECKPOINTS, id="remove-checkpoints", registry=REGISTRY)
async def checkpoint_deleted(*, body: kopf.Body, uid: str, namespace: str, name: str, memo: kopf.Memo,
                             retry: int, logger: kopf.Logger, **_: Any) -> None:
    """The images go with the PodCheckpoint; an agent that cannot be reached is tried a few
    times, then the PodCheckpoint goes anyway (a Warning Event says what was left)."""
    services: Services = memo["services"]
    async with _lock(memo, uid):
        fresh = await services.kube.get_checkpoint(namespace, name) or dict(body)
        ckpt = Checkpointing(services, fresh)
        try:
            logger.info(await ckpt.deleted())
        except AgentError as exc:
            if retry < CHECKPOINT_DELETE_TRIES - 1:
                raise kopf.TemporaryError(f"cannot remove the checkpoints yet: {exc}", delay=5)
            await services.kube.post_event(ckpt.ref, "Warning", "CheckpointsLeft",
                                           f"could not remove the checkpoints on {ckpt.status.get('node')}: {exc}")
    memo["locks"].pop(uid, None)
