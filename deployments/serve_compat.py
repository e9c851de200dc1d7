"""Ray Serve's private API, in one place: what deployments/ uses that Serve does not promise to keep.

Written for ray[serve]>=2.60,<2.61 (pyproject.toml's pin); tests/test_compat.py checks each use
against the installed Ray without starting it, so an upgrade that drops or changes one fails there.

- `ray.serve.context._set_request_context`: Serve has no public setter for a request's id.
- `DeploymentResponse._to_object_ref`: Serve's documented way to pass a call's result on unresolved.
- the "serve" namespace: where Serve names its replica actors (`ray.serve._private.constants.SERVE_NAMESPACE`).
"""

from __future__ import annotations

import ray
from ray.serve import context

SUPPORTED_VERSIONS = "ray[serve]>=2.60,<2.61"

SERVE_ACTOR_NAMESPACE = "serve"  # a replica's own namespace is the driver's, not this one


def set_request_id(request_id: str) -> None:
    """Give the running task `request_id`, as Serve's proxy does for an HTTP request.

    Work done outside any request (a job runner) would otherwise get fresh ids for its handle calls.
    Serve passes the id from its request context along with every handle call, and its log formatter
    writes it on every line logged within the call, in every replica the call reaches.
    `_set_request_context` is the setter Serve's own proxy path uses.
    """
    context._set_request_context(request_id=request_id)


async def object_ref(response) -> ray.ObjectRef:
    """The ObjectRef behind a `DeploymentResponse`, to hand a call's result to another call unresolved.

    Awaiting the reference instead would unpickle the result in the caller, on Ray's core-worker I/O
    thread; for torch tensors that once deadlocked a whole process on the GIL (torch 2.11,
    tests/test_gateway_stall.py).
    """
    return await response._to_object_ref()


def get_replica_actor(actor_name: str) -> ray.actor.ActorHandle:
    """The Serve replica actor named `actor_name`; ValueError when no such actor exists (anymore).

    Serve replicas are named actors that Ray never restarts, so a name that no longer resolves means
    the replica is gone for good.
    """
    return ray.get_actor(actor_name, namespace=SERVE_ACTOR_NAMESPACE)
