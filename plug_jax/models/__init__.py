"""The model families PPlug needs, as Flax Linen modules.

Linen rather than NNX: parameters stay plain pytrees, so the frozen LLM is one argument of a pure
update function and the trainable plug another; `jax.eval_shape(model.init, ...)` gives abstract
shapes to load pretrained weights into; and `nn.with_logical_partitioning` carries the logical axis
names that the config's rules map onto a device mesh.
"""
