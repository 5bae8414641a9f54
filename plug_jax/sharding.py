"""Device mesh from config, and logical axis names -> shardings through the config's rules table."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from plug_jax.models.layers import unboxed

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """{'data': -1, 'fsdp': 2, 'tensor': 1} on 8 devices -> (4, 2, 1); -1 takes the rest."""
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(mesh_config)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh {dict(mesh_config)} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"config.mesh {dict(mesh_config)} uses {int(np.prod(sizes))} devices, "
                         f"but {num_devices} are present")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def abstract_with_axes(init_fn: Callable, *args, **kwargs) -> tuple[Any, Any]:
    """Abstract params (ShapeDtypeStructs) and their logical PartitionSpecs, with no FLOPs."""
    boxed = jax.eval_shape(init_fn, *args, **kwargs)["params"]
    return unboxed(boxed), nn.get_partition_spec(boxed)


def logical_to_shardings(logical_specs: Any, mesh: Mesh, rules) -> Any:
    """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, [tuple(r) for r in rules])


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Sharding of a host batch array: leading axis over the 'batch' rule, the rest replicated."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), [tuple(r) for r in rules])
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
