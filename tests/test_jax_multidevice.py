"""curoi.jax on two devices: jax.shard_map (forward, grad, vmap) and jax.jit
with a batch-sharded feature array.

JAX fixes its device count when it starts, so the checks run in one child
Python with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (the CPU
split into two host devices), which reports what it measured as JSON; each
test here asserts one entry. Expected values come from the NumPy reference in
tests/reference.py on the whole, unsharded data.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("jax")

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 240

CHILD = r'''
import json, os, sys
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")
os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import curoi.jax as cj
from curoi import _ops
import reference as ref

results = {"devices": len(jax.devices())}
mesh = jax.make_mesh((2,), ("data",))
sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

N, C, H, W, K = 4, 3, 9, 11, 5   # 2 images and K boxes per device
SCALE, OUT = 0.5, (3, 2)
rng = np.random.default_rng(7)
x = rng.standard_normal((N, C, H, W)).astype(np.float32)
# Each device's boxes index its own 2 images (local batch indices 0 and 1);
# the single-device reference sees the same boxes with indices 0..3.
local = [ref.random_boxes(rng, N // 2, H, W, SCALE, K, dtype=np.float32)
         for _ in range(2)]
local_boxes = np.concatenate(local)
global_boxes = local_boxes.copy()
global_boxes[K:, 0] += N // 2
gy = rng.standard_normal((2 * K, C) + OUT).astype(np.float32)


def err(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)))


def on_mesh(f, in_specs, out_specs):
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs,
                                 out_specs=out_specs))


def put(a, sharding):
    return jax.device_put(jnp.asarray(a), sharding)


align = lambda x, b: cj.roi_align(x, b, OUT, SCALE, 2, True)
pool = lambda x, b: cj.roi_pool(x, b, OUT, SCALE)
ref_align = ref.roi_align(x, global_boxes, OUT, SCALE, 2, True)
ref_align_grad = ref.roi_align_backward(gy, global_boxes, x.shape, OUT, SCALE,
                                        2, True)
ref_pool, ref_argmax = ref.roi_pool(x, global_boxes, OUT, SCALE)
ref_pool_grad = ref.roi_pool_backward(gy, ref_argmax, global_boxes, x.shape)

xs, bs, gs = put(x, sharded), put(local_boxes, sharded), put(gy, sharded)
spec = P("data")

# 1. shard_map: features, boxes (local indices) and cotangents on the batch.
for name, op, want_y, want_g in [("align", align, ref_align, ref_align_grad),
                                 ("pool", pool, ref_pool, ref_pool_grad)]:
    forward = on_mesh(op, (spec, spec), spec)
    results[f"shard_map {name} forward"] = err(forward(xs, bs), want_y)
    grad = on_mesh(lambda x, b, g, op=op: jax.grad(
        lambda x: (op(x, b) * g).sum())(x), (spec, spec, spec), spec)
    results[f"shard_map {name} grad"] = err(grad(xs, bs, gs), want_g)

    # 2. vmap inside shard_map: each device maps over its 2 images, one
    # image with its own K boxes (batch index 0) per mapped element.
    per_image = np.full((N, K, 5), np.nan, np.float32)  # padding reads nothing
    in_image = np.zeros(per_image.shape[:2], bool)
    for d in range(2):
        for i in range(2):
            rows = local[d][:, 0] == i
            per_image[2 * d + i, :rows.sum()] = local[d][rows]
            per_image[2 * d + i, :rows.sum(), 0] = 0
            in_image[2 * d + i, :rows.sum()] = True
    order = [np.flatnonzero(global_boxes[:, 0] == n) for n in range(N)]
    want_vy = np.zeros(per_image.shape[:2] + (C,) + OUT)
    want_vg = np.zeros_like(x, np.float64)
    gv = np.zeros(per_image.shape[:2] + (C,) + OUT, np.float32)
    for n in range(N):
        count = len(order[n])
        want_vy[n, :count] = want_y[order[n]]
        gv[n, :count] = gy[order[n]]
    for n in range(N):
        count = len(order[n])
        one = global_boxes[order[n]].copy()
        one[:, 0] = 0
        if name == "align":
            want_vg[n] = ref.roi_align_backward(gv[n, :count], one,
                                                (1, C, H, W), OUT, SCALE,
                                                2, True)[0]
        else:
            _, am = ref.roi_pool(x[n:n + 1], one, OUT, SCALE)
            want_vg[n] = ref.roi_pool_backward(gv[n, :count], am, one,
                                               (1, C, H, W))[0]

    def mapped(x, b, op=op):
        return jax.vmap(lambda xi, bi: op(xi[None], bi))(x, b)

    vforward = on_mesh(mapped, (spec, spec), spec)
    vgrad = on_mesh(lambda x, b, g: jax.grad(
        lambda x: (mapped(x, b) * g).sum())(x), (spec, spec, spec), spec)
    vb, vg = put(per_image, sharded), put(gv, sharded)
    got = np.asarray(vforward(xs, vb))
    results[f"shard_map vmap {name} forward"] = err(got[in_image],
                                                    want_vy[in_image])
    results[f"shard_map vmap {name} grad"] = err(vgrad(xs, vb, vg), want_vg)

    # 3. Features the same on every device, boxes split: the gradient of
    # the replicated features sums every device's share, as for JAX's ops.
    everywhere = put(x, replicated)
    rforward = on_mesh(lambda x, b, op=op: op(x, b), (P(), spec), spec)
    results[f"replicated features {name} forward"] = err(
        rforward(everywhere, put(global_boxes, sharded)), want_y)
    rgrad = on_mesh(lambda x, b, g, op=op: jax.grad(
        lambda x: (op(x, b) * g).sum())(x), (P(), spec, spec), P())
    results[f"replicated features {name} grad"] = err(
        rgrad(everywhere, put(global_boxes, sharded), gs), want_g)

    # 4. Plain jit on batch-sharded features with all boxes (global indices).
    jforward = jax.jit(op)
    jgrad = jax.jit(lambda x, b, g, op=op: jax.grad(
        lambda x: (op(x, b) * g).sum())(x))
    gb = put(global_boxes, replicated)
    results[f"jit sharded {name} forward"] = err(jforward(xs, gb), want_y)
    results[f"jit sharded {name} grad"] = err(jgrad(xs, gb, put(gy, replicated)),
                                              want_g)

# Where the kernel runs: the feature shapes it gets (once per device), and
# whether the jit program gathers the features first. A configuration not
# used above, so that each program is traced and its callbacks run afresh.
seen = []
original = _ops.roi_align_forward
_ops.roi_align_forward = lambda x, *a, **k: (seen.append(list(x.shape)),
                                             original(x, *a, **k))[1]
fresh = on_mesh(lambda x, b: cj.roi_align(x, b, OUT, SCALE, 1, False),
                (spec, spec), spec)
fresh(xs, bs).block_until_ready()
results["shard_map kernel shapes"], seen[:] = sorted(seen), []
fresh = jax.jit(lambda x, b: cj.roi_align(x, b, OUT, SCALE, 1, False))
y = fresh(xs, gb)
y.block_until_ready()
_ops.roi_align_forward = original
results["jit sharded kernel shapes"] = sorted(seen)
results["jit sharded all-gather"] = (
    "all-gather" in fresh.lower(xs, gb).compile().as_text())
results["jit sharded output replicated"] = bool(y.sharding.is_fully_replicated)
print("RESULTS " + json.dumps(results))
'''


@pytest.fixture(scope="module")
def measured():
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests")]
                           + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, PYTHONPATH=path)
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    line = [s for s in done.stdout.splitlines() if s.startswith("RESULTS ")]
    assert line, done.stdout[-2000:]
    results = json.loads(line[-1][len("RESULTS "):])
    assert results["devices"] == 2
    return results


CASES = [f"{where} {op} {direction}"
         for where in ("shard_map", "shard_map vmap", "replicated features",
                       "jit sharded")
         for op in ("align", "pool") for direction in ("forward", "grad")]


@pytest.mark.parametrize("case", CASES)
def test_two_devices_give_the_single_device_numbers(measured, case):
    assert measured[case] <= 2e-5, (case, measured[case])


def test_shard_map_runs_the_kernel_on_each_device_shard(measured):
    assert measured["shard_map kernel shapes"] == [[2, 3, 9, 11]] * 2


def test_jit_gathers_sharded_features_and_runs_the_kernel_on_each_device(measured):
    # The README says so: XLA cannot split a callback, so the batch-sharded
    # features are all-gathered and every device runs the whole batch.
    assert measured["jit sharded all-gather"] is True
    assert measured["jit sharded kernel shapes"] == [[4, 3, 9, 11]] * 2
    assert measured["jit sharded output replicated"] is True


def test_data_parallel_example_averages_gradients_and_trains():
    path = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, PYTHONPATH=path)
    env.pop("XLA_FLAGS", None)  # the example splits the CPU into 2 devices itself
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "jax_data_parallel.py")],
                          capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert out.startswith("2 devices"), out
    difference = float(re.search(r"max difference (\S+)", out).group(1))
    assert difference <= 1e-6, out
    losses = [float(v) for v in re.findall(r"step \d+: loss (\S+)", out)]
    assert len(losses) == 8, out
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] / 10, losses
