"""RoI Align in JAX: under jax.jit, differentiated with jax.grad and batched
with jax.vmap (on the CPU here, or on the GPU that holds the arrays).

Run: python examples/jax_roi_align.py   (needs curoi and jax)

Features are a ramp f(y, x) = y + 10 x, on which bilinear interpolation is
exact, so each pooled value is the ramp at its bin's centre.
"""

import jax
import jax.numpy as jnp

import curoi.jax

height, width = 16, 20
ys, xs = jnp.mgrid[0:height, 0:width].astype(jnp.float32)
features = (ys + 10 * xs)[None, None]  # [N=1, C=1, H, W]
boxes = jnp.array([[0, 2.0, 3.0, 10.0, 11.0]])  # (batch index, x1, y1, x2, y2)


@jax.jit
def pool(features, boxes):
    return curoi.jax.roi_align(features, boxes, output_size=2, spatial_scale=1.0,
                               sampling_ratio=2, aligned=True)


pooled = pool(features, boxes)
print("roi_align under jit, 2x2 bins of box (2, 3)-(10, 11):")
print(pooled[0, 0])
# aligned=True shifts the box by half a pixel: x from 1.5 to 9.5 and y from
# 2.5 to 10.5, so the bin centres are x = 3.5, 7.5 and y = 4.5, 8.5.
expected = jnp.array([[4.5 + 35, 4.5 + 75], [8.5 + 35, 8.5 + 75]])
print("by hand:", expected.tolist(), "match:", bool(jnp.allclose(pooled[0, 0], expected)))

# Each output is an average whose weights sum to one, so the gradient of the
# sum of the 4 outputs sums to 4. JAX computes the gradient of the arguments
# asked for: here the boxes' too. On the ramp each output is y + 10 x at its
# bin's centre; moving x1 moves the left centres by 3/4 and the right ones by
# 1/4 of it (x2 the other way round), so the sum moves by 2 x 10 per unit of
# x1 or x2 and by 2 per unit of y1 or y2; the batch index gets 0.
grad_features, grad_boxes = jax.grad(lambda f, b: pool(f, b).sum(), argnums=(0, 1))(
    features, boxes)
print("grad of the sum w.r.t. features sums to", float(grad_features.sum()),
      "(4 bins); w.r.t. boxes:", grad_boxes.tolist(), "(by hand: [0, 20, 2, 20, 2])")
assert jnp.allclose(grad_boxes, jnp.array([[0.0, 20.0, 2.0, 20.0, 2.0]]), atol=1e-4)

# vmap over a batch of (features, boxes) pairs: one kernel launch for all.
batch_features = jnp.stack([features, 2 * features, 3 * features])
batch_boxes = jnp.stack([boxes, boxes, boxes])
batched = jax.jit(jax.vmap(pool))(batch_features, batch_boxes)
print("vmap over 3 scaled copies, top-left bin:", batched[:, 0, 0, 0, 0].tolist(),
      "(39.5 times 1, 2, 3)")
