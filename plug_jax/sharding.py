"""Device mesh from config, and logical axis names -> shardings through the config's rules table."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from plug_jax import errors
from plug_jax.models.layers import unboxed

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """{'data': -1, 'fsdp': 2, 'tensor': 1} on 8 devices -> (4, 2, 1); -1 takes the rest."""
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise errors.ConfigError(f"config.mesh: at most one axis may be -1, got {dict(mesh_config)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise errors.ConfigError(f"config.mesh {dict(mesh_config)} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise errors.ConfigError(f"config.mesh {dict(mesh_config)} uses {int(np.prod(sizes))} devices, "
                         f"but {num_devices} are present")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def without_activation_constraints():
    """A context with no logical axis rules, so activation constraints are no-ops.

    Model inits run dummy batches of one row, which a batch axis sharded over the mesh cannot
    divide; parameters' logical axis names do not depend on the rules.
    """
    return nn.logical_axis_rules(())


def abstract_with_axes(init_fn: Callable, *args, **kwargs) -> tuple[Any, Any]:
    """Abstract params (ShapeDtypeStructs) and their logical PartitionSpecs, with no FLOPs."""
    with without_activation_constraints():
        boxed = jax.eval_shape(init_fn, *args, **kwargs)["params"]
    return unboxed(boxed), nn.get_partition_spec(boxed)


def logical_to_shardings(logical_specs: Any, mesh: Mesh, rules) -> Any:
    """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, [tuple(r) for r in rules])


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Sharding of a host batch array: leading axis over the 'batch' rule, the rest replicated."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), [tuple(r) for r in rules])
    return NamedSharding(mesh, spec)


def process_rows(batch: NamedSharding, batch_size: int) -> slice:
    """The rows of a global batch that this process's devices hold: a block of them, or all rows
    where the batch axes do not span the processes (a tensor-only mesh, say)."""
    shards = int(np.prod([batch.mesh.shape[axis] for axis in jax.tree.leaves(batch.spec[0])]))
    if batch_size % shards:
        raise errors.ConfigError(f"config.optim.batch_size {batch_size} does not divide over the {shards} "
                         f"batch shards of mesh {dict(batch.mesh.shape)}")
    held = sorted({row for index in batch.addressable_devices_indices_map((batch_size,)).values()
                   for row in range(batch_size)[index[0]]})
    if held != list(range(held[0], held[-1] + 1)):
        raise ValueError(f"this process's devices hold rows {held} of each batch, not a block: "
                         "order the mesh's devices by process")
    return slice(held[0], held[-1] + 1)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def optimizer_state_shardings(opt_state: Any, params: Any, param_shardings: Any,
                              mesh: Mesh) -> Any:
    """Shardings of an optax state: a moment sharded as its parameter, the rest replicated.

    A state leaf follows the parameter whose key path ends its own and whose shape it has (the
    moments of adam inside chain/multi_transform/masked); counts and other leaves are replicated.
    Matching by path works where optax.tree_map_params cannot: its placeholder params break
    label functions that look into the params (train.make_optimizer's).
    """
    flat_params, _ = jax.tree_util.tree_flatten_with_path(params)
    by_path = {tuple(path): (leaf.shape, sharding) for (path, leaf), sharding in
               zip(flat_params, jax.tree.leaves(param_shardings))}

    def pick(path, leaf):
        for start in range(len(path)):
            shape, sharding = by_path.get(tuple(path[start:]), (None, None))
            if shape is not None and tuple(shape) == tuple(leaf.shape):
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def train_state_shardings(optimizer_state: Any, params: Any, param_logical_specs: Any, mesh: Mesh,
                          rules) -> dict:
    """Shardings of plug_jax.train's state {'params', 'opt', 'step'}, params by logical axes."""
    param_shardings = logical_to_shardings(param_logical_specs, mesh, rules)
    return {"params": param_shardings,
            "opt": optimizer_state_shardings(optimizer_state, params, param_shardings, mesh),
            "step": replicated(mesh)}
