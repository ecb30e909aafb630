"""Data-parallel training through curoi.jax.roi_align with jax.shard_map:
each device holds its own images and the boxes on them, with batch indices
local to the device (0 .. images per device - 1), computes its gradient, and
the gradients are averaged across devices with jax.lax.pmean.

Run: python examples/jax_data_parallel.py   (needs curoi and jax)

On a machine without several accelerators it splits the CPU into 2 host
devices (XLA_FLAGS must be set before JAX starts, hence before the import).

A small RoI head (a 1x1 convolution, roi_align to 2x2, a linear layer) learns
to predict the mean intensity inside each box. The first step's averaged
gradient is checked against the gradient of the same loss computed on one
device over all the data (global batch indices).
"""

import os

DEVICES = 2
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={DEVICES}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import curoi.jax  # noqa: E402

AXIS = "data"
IMAGES_PER_DEVICE, BOXES_PER_IMAGE, CHANNELS, SIZE = 2, 4, 3, 16
OUTPUT = (2, 2)

mesh = jax.make_mesh((DEVICES,), (AXIS,), devices=jax.devices()[:DEVICES])
rng = np.random.default_rng(0)

# Per device: IMAGES_PER_DEVICE images and their boxes, batch index local to
# the device. Stacked along the first axis, then split by shard_map.
images = rng.uniform(size=(DEVICES * IMAGES_PER_DEVICE, CHANNELS, SIZE, SIZE))
boxes = []
for device in range(DEVICES):
    for image in range(IMAGES_PER_DEVICE):
        for _ in range(BOXES_PER_IMAGE):
            x1, y1 = rng.uniform(0, SIZE / 2, size=2)
            w, h = rng.uniform(2, SIZE / 2, size=2)
            boxes.append([image, x1, y1, x1 + w, y1 + h])
boxes = np.array(boxes)
images, boxes = images.astype(np.float32), boxes.astype(np.float32)

# Target: the mean intensity inside each box (over all channels), what the
# head has to learn from the pooled features.
global_boxes = boxes.copy()
per_device = IMAGES_PER_DEVICE * BOXES_PER_IMAGE
for device in range(DEVICES):
    global_boxes[device * per_device:(device + 1) * per_device, 0] += \
        device * IMAGES_PER_DEVICE
targets = curoi.jax.roi_align(jnp.asarray(images), jnp.asarray(global_boxes),
                              8, aligned=True).mean(axis=(1, 2, 3))


def model(params, images, boxes):
    features = jnp.einsum("oc,nchw->nohw", params["conv"], images)
    pooled = curoi.jax.roi_align(features, boxes, OUTPUT, spatial_scale=1.0,
                                 sampling_ratio=2, aligned=True)
    return pooled.reshape(pooled.shape[0], -1) @ params["head"]


def loss_fn(params, images, boxes, targets):
    return jnp.mean((model(params, images, boxes) - targets) ** 2)


def local_step(params, images, boxes, targets):
    # Inside shard_map the parameters are the same on every device; marked
    # as varying, each device's gradient is its own (unmarked, JAX would
    # already sum the devices' gradients of the replicated parameters).
    if hasattr(jax.lax, "pcast"):
        own = jax.lax.pcast(params, AXIS, to="varying")
    else:  # JAX before 0.10
        own = jax.lax.pvary(params, AXIS)
    loss, grads = jax.value_and_grad(loss_fn)(own, images, boxes, targets)
    # Every device holds as many boxes, so the mean of the devices' mean
    # losses is the mean loss over all the data, and likewise the gradients.
    return jax.lax.pmean(loss, AXIS), jax.lax.pmean(grads, AXIS)


data_parallel_grad = jax.jit(jax.shard_map(
    local_step, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
    out_specs=(P(), P())))

split = NamedSharding(mesh, P(AXIS))
images_d = jax.device_put(images, split)
boxes_d = jax.device_put(boxes, split)
targets_d = jax.device_put(targets, split)

params = {
    "conv": jnp.asarray(rng.normal(0, 0.5, (4, CHANNELS)), jnp.float32),
    "head": jnp.asarray(rng.normal(0, 0.1, (4 * OUTPUT[0] * OUTPUT[1],)),
                        jnp.float32),
}

# The averaged gradient is the gradient of the mean loss over all the data,
# computed on one device with global batch indices.
_, grads = data_parallel_grad(params, images_d, boxes_d, targets_d)
single = jax.grad(loss_fn)(params, jnp.asarray(images),
                           jnp.asarray(global_boxes), targets)
difference = max(float(jnp.max(jnp.abs(grads[k] - single[k]))) for k in grads)
print(f"{len(mesh.devices.flat)} devices, {IMAGES_PER_DEVICE} images and "
      f"{per_device} boxes each")
print(f"data-parallel gradient vs one device on all the data: max difference "
      f"{difference:.1e}")

learning_rate = 0.5
for step in range(8):
    loss, grads = data_parallel_grad(params, images_d, boxes_d, targets_d)
    params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
    print(f"step {step}: loss {float(loss):.6f}")
